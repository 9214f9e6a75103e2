"""Voice actions through the job runner, with real speech as reference audio."""

import base64
import io

import pytest
import torch

from chatterbox_worker.config import load_settings
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.voices import VoiceStore, voice_file_bytes
from tests.speech import SENTENCES, long_speech_wav, speech_wav


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def runner(engine, tmp_path):
    settings = load_settings({"VOICES_DIR": str(tmp_path / "voices")})
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant="original")
    return JobRunner(settings, engine, store)


def job(runner, **job_input):
    items = list(runner.run({"id": "v", "input": job_input}))
    assert len(items) == 1, items
    return items[0]


def upload(runner, voice_id, text=SENTENCES[0], **extra):
    return job(runner, action="upload_voice", voice_id=voice_id, audio_base64=b64(speech_wav(text)),
               **extra)


def test_upload_from_speech_then_generate_with_it(runner, engine):
    meta = upload(runner, "joe")
    assert set(meta) == {"voice_id", "created_at", "reference_s", "model", "size_bytes"}
    assert meta["voice_id"] == "joe" and meta["model"] == engine.model.signature
    assert 3.0 < meta["reference_s"] < 8.0
    mine = job(runner, text="Hello there.", voice_id="joe", seed=1)
    builtin = job(runner, text="Hello there.", seed=1)
    assert mine["type"] == "result" and mine["audio_base64"] != builtin["audio_base64"]


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
    assert a["audio_base64"] == c["audio_base64"]  # same conditionals, same audio
    assert job(runner, action="delete_voice", voice_id="a-voice") == {"deleted": "a-voice"}
    assert job(runner, text="Gone.", voice_id="a-voice")["error"] == \
        "voice_not_found: Voice 'a-voice' not found."
    assert job(runner, action="delete_voice", voice_id="a-voice")["error"].startswith("voice_not_found")


@pytest.mark.parametrize("source,needle", [
    ({"audio_base64": b64(b"not audio at all" * 50)}, "invalid_audio: audio_base64 cannot be decoded"),
    ({"audio_base64": "%%%not-base64"}, "invalid_audio: audio_base64 is not valid base64"),
    ({"audio_base64": b64(speech_wav("Hi."))}, "at least 3 s"),
    ({"audio_base64": b64(long_speech_wav(65))}, "at most 60 s"),
    ({"voice_base64": b64(b"garbage")}, "invalid_voice_file:"),
    ({"audio_url": "http://127.0.0.1:9/a.wav"}, "invalid_input: audio_url host '127.0.0.1' is a private"),
])
def test_bad_reference_is_refused_and_nothing_is_written(runner, source, needle):
    error = job(runner, action="upload_voice", voice_id="bad", **source)["error"]
    assert needle in error
    assert not runner.voices.exists("bad")
    assert list(runner.voices.directory.glob("*")) == [] if runner.voices.directory.exists() else True


def test_voice_for_another_model_is_refused_then_rebuilt(runner, engine):
    upload(runner, "orig")
    exported = job(runner, action="get_voice", voice_id="orig", export=True)
    raw = torch.load(io.BytesIO(base64.b64decode(exported["voice_base64"])), weights_only=True)
    foreign = voice_file_bytes("orig", engine.voice_from_clips([raw["reference_audio"].numpy() / 32767.0]),
                               model="chatterbox-original-0123456789abcdef", variant="original",
                               reference_audio=raw["reference_audio"].numpy() / 32767.0,
                               reference_sample_rate=raw["reference_sample_rate"])
    error = job(runner, action="upload_voice", voice_id="ported", voice_base64=b64(foreign))["error"]
    assert error.startswith("invalid_voice_file:")
    assert "chatterbox-original-0123456789abcdef" in error and engine.model.signature in error
    assert "rebuild: true" in error
    rebuilt = job(runner, action="upload_voice", voice_id="ported", voice_base64=b64(foreign),
                  rebuild=True)
    assert rebuilt["model"] == engine.model.signature
    assert job(runner, text="Rebuilt.", voice_id="ported", seed=1)["type"] == "result"


def test_unwritable_voices_directory_is_storage_unavailable(engine, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    settings = load_settings({"VOICES_DIR": str(blocked)})
    store = VoiceStore(blocked, model_signature=engine.model.signature, variant="original")
    runner = JobRunner(settings, engine, store)
    error = upload(runner, "nowhere")["error"]
    assert error.startswith("storage_unavailable:")
    assert "/" not in error.split(":", 1)[1].replace(str(blocked), "")  # names no other host path
