"""Voice actions through the job runner, with real speech as reference audio."""

import base64
import io
import os

import numpy as np
import pytest
import torch

from chatterbox_worker.audio import encode_audio
from chatterbox_worker.config import load_settings
from chatterbox_worker.engine import SynthesisRequest
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.tiny_model import write_checkpoint
from chatterbox_worker.voices import VoiceStore, parse_voice_file
from tests.speech import SENTENCES, long_speech_wav, speech_wav


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_runner(engine, voices_dir):
    settings = load_settings({"VOICES_DIR": str(voices_dir)})
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant="original")
    return JobRunner(settings, engine, store)


@pytest.fixture
def runner(engine, tmp_path):
    return make_runner(engine, tmp_path / "voices")


@pytest.fixture(scope="module")
def foreign_engine(tmp_path_factory):
    """The same model on other weights: a tiny checkpoint written with another seed."""
    from chatterbox_worker.engine import load_engine

    directory = write_checkpoint(tmp_path_factory.mktemp("tiny-seed1"), seed=1)
    return load_engine(load_settings({"CHATTERBOX_MODEL_DIR": str(directory),
                                      "CHATTERBOX_WARMUP": "0", "CHATTERBOX_WATERMARK": "0"}))


def job(runner, **job_input):
    items = list(runner.run({"id": "v", "input": job_input}))
    assert len(items) == 1, items
    return items[0]


def upload(runner, voice_id, text=SENTENCES[0], **extra):
    return job(runner, action="upload_voice", voice_id=voice_id, audio_base64=b64(speech_wav(text)),
               **extra)


def spoken_with(runner, voice_id, text, seed):
    """The WAV the engine makes of ``text`` with the conditionals stored for ``voice_id``."""
    voice = runner.voices.load(voice_id).conditionals
    take = runner.engine.synthesize(SynthesisRequest(text=text, voice=voice, seed=seed))
    return b64(encode_audio(take.audio, take.sample_rate, "wav", 24000))


def test_upload_from_speech_then_generate_with_it(runner, engine):
    meta = upload(runner, "joe")
    assert set(meta) == {"voice_id", "created_at", "reference_s", "model", "size_bytes"}
    assert meta["voice_id"] == "joe" and meta["model"] == engine.model.signature
    assert 3.0 < meta["reference_s"] < 8.0
    mine = job(runner, text="Hello there.", voice_id="joe", seed=1)
    builtin = job(runner, text="Hello there.", seed=1)
    assert mine["type"] == "result" and mine["voice_id"] == "joe"
    assert mine["audio_base64"] == spoken_with(runner, "joe", "Hello there.", seed=1)
    assert mine["audio_base64"] != builtin["audio_base64"]


def test_several_clips_make_one_voice(runner):
    meta = job(runner, action="upload_voice", voice_id="multi",
               audio_base64=[b64(speech_wav(s)) for s in SENTENCES[:3]])
    single = upload(runner, "single")
    assert meta["reference_s"] > 2 * single["reference_s"]


def test_existing_id_needs_overwrite(runner):
    upload(runner, "taken")
    error = upload(runner, "taken", text=SENTENCES[1])["error"]
    assert error == "voice_exists: voice 'taken' already exists; pass overwrite: true to replace it"
    before = job(runner, action="get_voice", voice_id="taken", export=True)["voice_base64"]
    assert upload(runner, "taken", text=SENTENCES[1], overwrite=True)["voice_id"] == "taken"
    after = job(runner, action="get_voice", voice_id="taken", export=True)["voice_base64"]
    assert after != before  # replaced: other reference audio, other file


def test_an_upload_answers_what_it_wrote_even_if_a_delete_comes_right_after(runner, monkeypatch):
    """Another worker deletes the voice between this upload's write and its answer: the
    answer is still the stored voice's metadata, not voice_not_found for a voice it saved."""
    store = runner.voices
    save = store.save

    def save_then_deleted(voice_id, data, **kwargs):
        save(voice_id, data, **kwargs)
        store.delete(voice_id)

    monkeypatch.setattr(store, "save", save_then_deleted)
    answer = upload(runner, "fleeting")
    assert "error" not in answer, answer
    assert answer["voice_id"] == "fleeting" and answer["size_bytes"] > 0


def test_list_get_export_import_delete(runner):
    upload(runner, "b-voice")
    upload(runner, "a-voice", text=SENTENCES[2])
    listed = job(runner, action="list_voices")["voices"]
    assert [v["voice_id"] for v in listed] == ["a-voice", "b-voice"]
    exported = job(runner, action="get_voice", voice_id="a-voice", export=True)
    data = base64.b64decode(exported["voice_base64"])
    assert torch.load(io.BytesIO(data), weights_only=True)["voice_id"] == "a-voice"
    imported = job(runner, action="upload_voice", voice_id="copy", voice_base64=exported["voice_base64"])
    assert imported["voice_id"] == "copy" and imported["reference_s"] == exported["reference_s"]
    a = job(runner, text="Same words.", voice_id="a-voice", seed=4)
    c = job(runner, text="Same words.", voice_id="copy", seed=4)
    assert (a["voice_id"], c["voice_id"]) == ("a-voice", "copy")
    assert a["audio_base64"] == spoken_with(runner, "a-voice", "Same words.", seed=4)
    assert a["audio_base64"] == c["audio_base64"]  # same conditionals, same audio
    assert job(runner, action="delete_voice", voice_id="a-voice") == {"deleted": "a-voice"}
    assert job(runner, text="Gone.", voice_id="a-voice")["error"] == \
        "voice_not_found: Voice 'a-voice' not found."
    assert job(runner, action="delete_voice", voice_id="a-voice")["error"].startswith("voice_not_found")


@pytest.mark.parametrize("source,needle", [
    ({"audio_base64": b64(b"not audio at all" * 50)}, "invalid_audio: audio_base64 is not a wav, flac, mp3 or ogg file"),
    ({"audio_base64": "%%%not-base64"}, "invalid_audio: audio_base64 is not valid base64"),
    ({"audio_base64": b64(speech_wav("Hi."))}, "at least 3 s"),
    ({"audio_base64": b64(long_speech_wav(65))}, "at most 60 s"),
    ({"voice_base64": b64(b"garbage")}, "invalid_voice_file:"),
    ({"audio_url": "http://127.0.0.1:9/a.wav"}, "invalid_input: audio_url host '127.0.0.1' is a private"),
])
def test_bad_reference_is_refused_and_nothing_is_written(runner, source, needle):
    runner.voices.directory.mkdir(parents=True)
    error = job(runner, action="upload_voice", voice_id="bad", **source)["error"]
    assert needle in error
    assert not runner.voices.exists("bad")
    assert os.listdir(runner.voices.directory) == []  # no voice file, no temporary file


def test_voice_from_other_weights_is_refused_then_rebuilt_for_these(runner, engine, foreign_engine,
                                                                     tmp_path):
    foreign_runner = make_runner(foreign_engine, tmp_path / "foreign-voices")
    upload(foreign_runner, "orig")
    exported = job(foreign_runner, action="get_voice", voice_id="orig", export=True)["voice_base64"]
    foreign = parse_voice_file(base64.b64decode(exported))
    assert foreign.model == foreign_engine.model.signature != engine.model.signature

    error = job(runner, action="upload_voice", voice_id="ported", voice_base64=exported)["error"]
    assert error.startswith("invalid_voice_file:")
    assert foreign.model in error and engine.model.signature in error and "rebuild: true" in error
    assert not runner.voices.exists("ported")

    rebuilt = job(runner, action="upload_voice", voice_id="ported", voice_base64=exported,
                  rebuild=True)
    assert rebuilt["model"] == engine.model.signature
    stored = runner.voices.load("ported")
    assert torch.equal(stored.reference_audio, foreign.reference_audio)  # kept for the next rebuild
    # Remade by these weights from the file's reference audio, not the foreign tensors kept.
    here = engine.voice_from_clips([foreign.reference_audio.numpy().astype(np.float32) / 32767.0])
    for name, tensor in here.tensors().items():
        assert torch.equal(stored.conditionals.tensors()[name], tensor), name
    for name in ("speaker_emb", "cond_prompt_speech_tokens", "prompt_token", "embedding"):
        assert not torch.equal(stored.conditionals.tensors()[name],
                               foreign.conditionals.tensors()[name]), name
    spoken = job(runner, text="Rebuilt.", voice_id="ported", seed=1)
    assert spoken["voice_id"] == "ported"
    assert spoken["audio_base64"] == spoken_with(runner, "ported", "Rebuilt.", seed=1)


def test_unwritable_voices_directory_is_storage_unavailable(engine, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    settings = load_settings({"VOICES_DIR": str(blocked)})
    store = VoiceStore(blocked, model_signature=engine.model.signature, variant="original")
    runner = JobRunner(settings, engine, store)
    error = upload(runner, "nowhere")["error"]
    assert error.startswith("storage_unavailable:")
    assert "/" not in error.split(":", 1)[1].replace(str(blocked), "")  # names no other host path


def test_rebuild_voices_remakes_every_foreign_voice_once_and_reports_the_rest(engine, foreign_engine,
                                                                              tmp_path):
    """An endpoint that switched models: one job remakes all voices for the model it serves now."""
    shared = tmp_path / "volume-voices"
    before = make_runner(foreign_engine, shared)  # the endpoint's old model
    upload(before, "anna")
    upload(before, "ben", text=SENTENCES[1])
    after = make_runner(engine, shared)  # the same volume, the new model
    upload(after, "cleo")
    (shared / "dora.pth").write_bytes(b"not a voice file")
    cleo_bytes = (shared / "cleo.pth").read_bytes()
    anna_reference = after.voices.export("anna")[1].reference_audio

    result = job(after, action="rebuild_voices")
    assert result["model"] == engine.model.signature
    assert (result["rebuilt"], result["current"]) == (["anna", "ben"], ["cleo"])
    assert [f["voice_id"] for f in result["failed"]] == ["dora"]
    assert result["failed"][0]["error"].startswith("invalid_voice_file:")
    assert (shared / "dora.pth").read_bytes() == b"not a voice file"  # left as it was
    assert (shared / "cleo.pth").read_bytes() == cleo_bytes  # already current: untouched
    anna = after.voices.load("anna")  # no longer refused
    assert anna.model == engine.model.signature
    assert torch.equal(anna.reference_audio, anna_reference)  # kept for the next switch
    here = engine.voice_from_clips([anna_reference.numpy().astype(np.float32) / 32767.0])
    assert torch.equal(anna.conditionals.speaker_emb, here.speaker_emb)
    assert job(after, text="Hi.", voice_id="ben", seed=2)["voice_id"] == "ben"

    again = job(after, action="rebuild_voices")
    assert (again["rebuilt"], again["current"]) == ([], ["anna", "ben", "cleo"])
