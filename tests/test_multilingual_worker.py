"""A multilingual worker through the job runner: languages, its defaults, voices of other models."""

import base64

import numpy as np
import pytest
import torch

from chatterbox_worker.config import load_settings
from chatterbox_worker.engine.variants import MULTILINGUAL_LANGUAGES
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.schemas import GenerateRequest
from chatterbox_worker.voices import VoiceStore, parse_voice_file
from tests.speech import SENTENCES, speech_wav


def make_runner(engine, voices_dir, **env):
    settings = load_settings({"VOICES_DIR": str(voices_dir), "CHATTERBOX_VARIANT": engine.model.variant,
                              **env})
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant=engine.model.variant)
    return JobRunner(settings, engine, store)


@pytest.fixture
def runner(multilingual_engine, tmp_path):
    return make_runner(multilingual_engine, tmp_path / "voices")


def job(runner, **job_input):
    items = list(runner.run({"id": "m", "input": job_input}))
    assert len(items) == 1, items
    return items[0]


def test_every_language_is_spoken_and_the_language_changes_the_take(runner):
    takes = {lang: job(runner, text="Hola, buenos días.", language=lang, seed=3)
             for lang in ("es", "it", "pt")}
    assert all(t["type"] == "result" and t["duration_s"] > 0 for t in takes.values())
    assert len({t["audio_base64"] for t in takes.values()}) == 3
    # Case and spaces around the code do not matter.
    again = job(runner, text="Hola, buenos días.", language=" ES ", seed=3)
    assert again["audio_base64"] == takes["es"]["audio_base64"]


def test_an_unknown_language_is_refused_listing_the_23(runner):
    error = job(runner, text="Hallo.", language="xx")["error"]
    assert error.startswith("invalid_input: language: 'xx' is not spoken by the multilingual model")
    assert error.endswith(", ".join(MULTILINGUAL_LANGUAGES))
    assert len(MULTILINGUAL_LANGUAGES) == 23


def test_sampling_defaults_are_the_multilingual_models(runner):
    """Left out, repetition_penalty is upstream's multilingual 2.0 (the original model's is 1.2)."""
    made = runner.service.synthesis_request(GenerateRequest(text="Bonjour.", language="fr"))
    assert made.sampling.repetition_penalty == 2.0 and made.language == "fr"
    given = runner.service.synthesis_request(GenerateRequest(text="Bonjour.", language="fr",
                                                             repetition_penalty=1.3))
    assert given.sampling.repetition_penalty == 1.3
    error = job(runner, text="Bonjour.", language="fr", top_k=40)["error"]
    assert error == "invalid_input: top_k: the multilingual model does not use it; omit it or send 0"


def test_an_original_voice_is_refused_naming_both_models_then_rebuilt(runner, engine,
                                                                      multilingual_engine, tmp_path):
    """A voice made by the original (English) model's worker, imported into a multilingual one."""
    english = make_runner(engine, tmp_path / "english-voices")
    audio = base64.b64encode(speech_wav(SENTENCES[0])).decode()
    assert job(english, action="upload_voice", voice_id="narrator", audio_base64=audio)["model"] \
        == engine.model.signature
    exported = job(english, action="get_voice", voice_id="narrator", export=True)["voice_base64"]
    original = parse_voice_file(base64.b64decode(exported))
    assert original.variant == "original"

    error = job(runner, action="upload_voice", voice_id="narrator", voice_base64=exported)["error"]
    assert error.startswith("invalid_voice_file:")
    assert "chatterbox-original-" in error and "chatterbox-multilingual-" in error
    assert engine.model.signature in error and multilingual_engine.model.signature in error

    rebuilt = job(runner, action="upload_voice", voice_id="narrator", voice_base64=exported,
                  rebuild=True)
    assert rebuilt["model"] == multilingual_engine.model.signature
    stored = runner.voices.load("narrator")
    assert stored.variant == "multilingual"
    here = multilingual_engine.voice_from_clips(
        [original.reference_audio.numpy().astype(np.float32) / 32767.0])
    for name, tensor in here.tensors().items():
        assert torch.equal(stored.conditionals.tensors()[name], tensor), name
    spoken = job(runner, text="Guten Tag.", language="de", voice_id="narrator", seed=1)
    assert spoken["voice_id"] == "narrator" and spoken["duration_s"] > 0

    # And the other way round: the English worker refuses the multilingual voice.
    back = job(runner, action="get_voice", voice_id="narrator", export=True)["voice_base64"]
    error = job(english, action="upload_voice", voice_id="back", voice_base64=back)["error"]
    assert "chatterbox-multilingual-" in error and engine.model.signature in error


def test_switching_an_endpoint_to_multilingual_rebuilds_its_voices_in_one_job(engine,
                                                                            multilingual_engine,
                                                                            tmp_path):
    """The voices directory of an English endpoint, served by a multilingual worker."""
    voices = tmp_path / "voices"
    english = make_runner(engine, voices)
    audio = base64.b64encode(speech_wav(SENTENCES[2])).decode()
    job(english, action="upload_voice", voice_id="anna", audio_base64=audio)
    switched = make_runner(multilingual_engine, voices)
    assert job(switched, text="Hej.", language="sv", voice_id="anna")["error"].startswith(
        "invalid_voice_file:")
    answer = job(switched, action="rebuild_voices")
    assert answer["model"] == multilingual_engine.model.signature and answer["rebuilt"] == ["anna"]
    assert job(switched, text="Hej.", language="sv", voice_id="anna", seed=1)["duration_s"] > 0


def test_chinese_is_estimated_at_its_own_speaking_rate(multilingual_engine, tmp_path):
    """Up-front size checks count a Chinese character as more speech than a Latin letter."""
    from chatterbox_worker.jobs import estimated_audio_bytes

    text = "你好，今天天气真不错。" * 6  # 66 characters: ~15 s of Mandarin, ~6 s at Latin rates
    limit = 500_000  # 24 kHz 16-bit WAV: about 10 s
    assert estimated_audio_bytes(text, "wav", 24000, "de") < limit < estimated_audio_bytes(
        text, "wav", 24000, "zh")
    runner = make_runner(multilingual_engine, tmp_path / "voices", INLINE_MAX_BYTES=str(limit))
    error = job(runner, text=text, language="zh")["error"]
    assert error.startswith("output_too_large: about ")


def test_health_names_the_multilingual_model(runner):
    health = job(runner, action="health")
    assert health["model"]["variant"] == "multilingual"
    assert health["model"]["signature"].startswith("chatterbox-multilingual-")


def test_server_mode_speaks_the_requested_language(multilingual_engine, tmp_path):
    """The HTTP routes take ``language`` too (OpenAI's route as an extra field)."""
    import io

    import httpx
    import soundfile

    from tests.http_server import ServedApp, service_loader

    app = ServedApp({"VOICES_DIR": str(tmp_path / "voices"), "API_KEY": "k",
                     "CHATTERBOX_VARIANT": "multilingual"}, service_loader(multilingual_engine))
    try:
        app.wait_ready()
        with httpx.Client(base_url=app.url, headers={"X-API-Key": "k"}, timeout=120) as client:
            said = {}
            for language in ("zh", "ja"):
                r = client.post("/v1/audio/speech", json={
                    "model": "multilingual", "input": "你好。", "voice": "alloy",
                    "response_format": "wav", "language": language, "seed": 2})
                assert r.status_code == 200, r.text
                samples, rate = soundfile.read(io.BytesIO(r.content))
                assert rate == 24000 and len(samples) > 0
                said[language] = r.content
            assert said["zh"] != said["ja"]
            r = client.post("/tts/generate", json={"text": "Γειά σου.", "language": "el",
                                                   "format": "wav", "seed": 2})
            assert r.status_code == 200 and len(r.content) > 44
            r = client.post("/tts/generate", json={"text": "Hi.", "language": "xx"})
            assert r.status_code == 400 and r.json()["code"] == "invalid_input"
            assert "zh" in r.json()["detail"]
    finally:
        app.stop()
