"""Jobs in, items out: results, the error contract, health, and a worker that stays healthy."""

import base64
import io

import pytest
import soundfile

from chatterbox_worker.audio import encode_audio
from chatterbox_worker.config import load_settings
from chatterbox_worker.engine import StreamSchedule, SynthesisRequest
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.tiny_model import synthetic_reference
from chatterbox_worker.voices import VoiceStore, voice_file_bytes


@pytest.fixture
def runner(engine, tmp_path):
    def make(**env):
        settings = load_settings({"VOICES_DIR": str(tmp_path / "voices"), **env})
        store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                           variant="original")
        return JobRunner(settings, engine, store)
    return make


def run(runner, job_input, job_id="job-1"):
    return list(runner.run({"id": job_id, "input": job_input}))


def only(items):
    assert len(items) == 1, items
    return items[0]


def test_generate_returns_one_result_item_with_a_wav(runner):
    item = only(run(runner(), {"text": "Hello there.", "seed": 5}))
    assert item["type"] == "result" and item["format"] == "wav" and item["seed"] == 5
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(item["audio_base64"])))
    assert rate == 24000 and samples.ndim == 1
    assert item["duration_s"] == pytest.approx(len(samples) / rate, abs=0.001)
    assert set(item["timings"]) == {"ttfa_s", "total_s", "rtf"}
    assert item["voice_id"] is None


def test_same_seed_gives_the_same_bytes_and_no_seed_is_reported(runner):
    r = runner()
    a = only(run(r, {"text": "Same again.", "seed": 1}))
    b = only(run(r, {"text": "Same again.", "seed": 1}))
    assert a["audio_base64"] == b["audio_base64"]
    # Without a seed the worker picks one and reports it: that seed gives the same take again.
    c = only(run(r, {"text": "Same again."}))
    d = only(run(r, {"text": "Same again."}))
    assert c["seed"] != d["seed"]  # picked afresh per job (a clash has odds 2**-31)
    again = only(run(r, {"text": "Same again.", "seed": c["seed"]}))
    assert again["audio_base64"] == c["audio_base64"] != d["audio_base64"]


def test_generate_with_a_stored_voice(runner, engine, tmp_path):
    r = runner()
    voice = engine.voice_from_clips([synthetic_reference(seconds=5, seed=9)])
    r.voices.directory.mkdir(parents=True, exist_ok=True)
    r.voices.path_for("deep").write_bytes(voice_file_bytes(
        "deep", voice, model=engine.model.signature, variant="original",
        reference_audio=synthetic_reference(seconds=5, seed=9), reference_sample_rate=24000))
    mine = only(run(r, {"text": "Hello there.", "voice_id": "deep", "seed": 2}))
    builtin = only(run(r, {"text": "Hello there.", "seed": 2}))
    assert mine["voice_id"] == "deep"
    take = engine.synthesize(SynthesisRequest(text="Hello there.", voice=voice, seed=2))
    assert base64.b64decode(mine["audio_base64"]) == encode_audio(take.audio, 24000, "wav", 24000)
    assert mine["audio_base64"] != builtin["audio_base64"]


@pytest.mark.parametrize("job_input,expected", [
    ({"text": "hi", "voice_id": "ghost"}, "voice_not_found: Voice 'ghost' not found."),
    ({"text": ""}, "invalid_input: text: must not be empty"),
    ({"text": "hi", "volume": 11}, "invalid_input: volume: unknown field"),
    ({"action": "sing"}, "invalid_input: unknown action 'sing'"),
    ({"text": "hi", "language": "fr"}, "invalid_input: language: 'fr' is not spoken by the original "
     "(English) model this worker serves; use one of: en (other languages need the multilingual "
     "model)"),
    ({"text": "hi", "top_k": 50}, "invalid_input: top_k: the original (English) model does not use "
     "it; omit it or send 0"),
    ({"text": "hi", "exaggeration": 0.1}, "invalid_input: exaggeration: must be a number from 0.25 "
     "to 2 for the original (English) model"),
    ({"text": "hi", "output": "s3"}, "storage_unavailable: output 's3' needs S3 storage"),
])
def test_failures_are_one_error_item(runner, job_input, expected):
    item = only(run(runner(), job_input))
    assert set(item) == {"error"}
    assert item["error"].startswith(expected)


def test_missing_input_is_invalid(runner):
    assert only(list(runner().run({"id": "x"})))["error"].startswith("invalid_input")


def test_too_large_for_inline_says_what_to_do(runner):
    r = runner(INLINE_MAX_BYTES="1000")
    for output in ("auto", "inline"):
        error = only(run(r, {"text": "Hello there.", "output": output}))["error"]
        assert error.startswith("output_too_large:") and "opus" in error


def test_an_unexpected_failure_is_an_internal_error_and_the_worker_recovers(runner, monkeypatch, caplog):
    r = runner()

    def broken(*args, **kwargs):
        raise RuntimeError("secret path /root/weights exploded")

    monkeypatch.setattr(r.engine, "synthesize", broken)
    item = only(run(r, {"text": "Hello."}, job_id="boom"))
    assert item["error"].startswith("internal_error:")
    assert "/root" not in item["error"] and "secret" not in item["error"]
    assert "job=boom" in caplog.text
    monkeypatch.undo()
    assert only(run(r, {"text": "Hello.", "seed": 1}))["type"] == "result"


def test_each_job_logs_one_summary_line(runner, caplog):
    caplog.set_level("INFO", logger="chatterbox_worker.jobs")
    run(runner(), {"text": "Hello.", "seed": 1}, job_id="sum-1")
    lines = [r.message for r in caplog.records if "job=sum-1" in r.message]
    assert len(lines) == 1
    for field in ("action=generate", "voice=builtin", "audio_s=", "ttfa_s=", "rtf=", "outcome=ok"):
        assert field in lines[0]


def test_health_reports_model_storage_and_versions(runner, engine, tmp_path):
    item = only(run(runner(), {"action": "health"}))
    assert item["status"] == "ok" and item["device"] == "cpu"
    assert item["model"]["signature"] == engine.model.signature
    assert item["storage"] == {"voices": "ok", "s3": "not configured"}
    assert set(item["versions"]) >= {"worker", "chatterbox", "torch", "runpod"}
    assert item["versions"]["chatterbox"] == "0.1.7"

    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    item = only(run(runner(VOICES_DIR=str(blocked)), {"action": "health"}))
    assert item["status"] == "degraded" and "not a directory" in item["storage"]["voices"]


def decode_any(data: bytes) -> float:
    """Seconds of audio in a complete file, as FFmpeg decodes it."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate


@pytest.mark.parametrize("fmt,rate", [("wav", 24000), ("opus", 48000), ("mp3", 16000)])
def test_stream_yields_chunks_then_a_result(runner, fmt, rate):
    items = run(runner(), {"text": "Hello there, streaming now.", "stream": True, "seed": 4,
                           "format": fmt, "sample_rate": rate})
    chunks, result = items[:-1], items[-1]
    assert len(chunks) >= 3
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["type"] == "chunk" and c["format"] == fmt and c["sample_rate"] == rate
               for c in chunks)
    import json

    assert max(len(json.dumps(c)) for c in chunks) < 1_000_000
    assert result["type"] == "result" and "audio_base64" not in result and "audio_url" not in result
    assert result["chunks"] == len(chunks) and result["seed"] == 4
    assert result["timings"]["ttfa_s"] <= result["timings"]["total_s"]
    data = b"".join(base64.b64decode(c["audio_base64"]) for c in chunks)
    # MP3 decoders add the encoder's delay and last-frame padding (up to ~0.15 s).
    assert decode_any(data) == pytest.approx(result["duration_s"], abs=0.15 if fmt == "mp3" else 0.01)


def test_stream_items_stay_under_runpods_1_mb_at_the_largest_chunks(runner):
    """RunPod drops a stream item over 1 MB. Chunks may hold up to 500 tokens (20 s; 1.9 MB
    as 48 kHz 16-bit PCM): here the whole take, about 10 s, is one vocoder chunk of about
    1 MB of audio, which must go out as several items, each under the limit."""
    import json

    r = runner(STREAM_CHUNK_TOKENS="500")
    text = "A take of about ten seconds, vocoded as one single chunk of the largest size there is."
    items = run(r, {"text": text, "stream": True, "seed": 4, "format": "pcm_s16le",
                    "sample_rate": 48000})
    chunks, result = items[:-1], items[-1]
    assert result["type"] == "result" and result["chunks"] == len(chunks)
    sizes = [len(json.dumps(c)) for c in chunks]
    assert max(sizes) < 1_000_000
    pcm = b"".join(base64.b64decode(c["audio_base64"]) for c in chunks)
    assert len(pcm) == round(result["duration_s"] * 48000) * 2
    # The test is not vacuous: the take is one vocoder chunk whose audio would not fit
    # one item, and the items it was split into are filled close to the limit.
    assert len(pcm) * 4 / 3 > 1_000_000
    assert max(sizes) > 650_000


def test_streaming_uses_the_engines_schedule_by_default(runner):
    """The closeness of streamed to one-shot audio is measured on the engine's schedule
    (tests/engine/test_streaming.py); the worker's defaults must be that schedule."""
    assert runner().schedule == StreamSchedule()


def test_stream_and_one_shot_have_the_same_length(runner):
    r = runner()
    job = {"text": "Same take either way.", "seed": 8, "format": "pcm_s16le"}
    whole = only(run(r, job))
    streamed = run(r, {**job, "stream": True})
    pcm = b"".join(base64.b64decode(c["audio_base64"]) for c in streamed[:-1])
    assert len(pcm) == len(base64.b64decode(whole["audio_base64"]))


def test_stream_too_large_is_refused_before_it_starts(runner):
    error = only(run(runner(AGGREGATE_MAX_BYTES="20000"),
                     {"text": "A long text. " * 40, "stream": True}))["error"]
    assert error.startswith("output_too_large:") and "opus" in error


def test_stream_that_outgrows_the_limit_ends_with_the_error(runner):
    # The estimate assumes 12 characters a second; a random model speaks to its
    # token budget (7 a second), so its audio outgrows an estimate that fitted.
    text = "A sentence of about one hundred characters, which the estimate expects to be short."
    items = run(runner(AGGREGATE_MAX_BYTES="600000"), {"text": text, "stream": True, "seed": 1})
    assert items[-1]["error"].startswith("output_too_large: the streamed audio outgrew")
    assert all(i.get("type") == "chunk" for i in items[:-1]) and len(items) > 1


def test_a_closed_stream_cancels_the_job_and_frees_the_worker(runner, caplog):
    caplog.set_level("INFO", logger="chatterbox_worker.jobs")
    r = runner()
    job = r.run({"id": "gone", "input": {"text": "A long narration. " * 10, "stream": True}})
    assert next(job)["type"] == "chunk"
    job.close()
    assert any("job=gone" in m and "outcome=cancelled" in m for m in caplog.messages)
    assert only(run(r, {"text": "Next.", "seed": 1}))["type"] == "result"
