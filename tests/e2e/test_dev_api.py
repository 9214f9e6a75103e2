"""The worker over RunPod's local dev API (real runpod SDK, real HTTP)."""

import base64
import io

import pytest
import soundfile

pytestmark = pytest.mark.e2e


def decode_wav(item):
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(item["audio_base64"])))
    return samples, rate


def test_runsync_returns_a_wav_and_the_same_seed_gives_the_same_bytes(worker):
    job = {"input": {"text": "Hello from the dev API.", "seed": 21}}
    first = worker.post("/runsync", job)
    assert first["status"] == "COMPLETED"
    [item] = first["output"]
    samples, rate = decode_wav(item)
    assert rate == 24000 and samples.ndim == 1
    # A random model speaks until its text-sized token budget: 1 s .. 10 s here.
    assert 1.0 < len(samples) / rate < 10.0
    assert item["duration_s"] == pytest.approx(len(samples) / rate, abs=0.001)
    again = worker.post("/runsync", job)["output"][0]
    assert again["audio_base64"] == item["audio_base64"]


def test_run_then_status(worker):
    queued = worker.post("/run", {"input": {"text": "Queued job.", "seed": 3, "format": "flac"}})
    assert queued["status"] == "IN_PROGRESS" and queued["id"]
    done = worker.post(f"/status/{queued['id']}")
    assert done["status"] == "COMPLETED"
    [item] = done["output"]
    assert item["format"] == "flac"
    samples, rate = decode_wav(item)
    assert rate == 24000 and len(samples) > 0


def test_invalid_request_gives_the_documented_error(worker):
    result = worker.post("/runsync", {"input": {"text": "hi", "exaggeration": 9}})
    # The dev API reports a yielded error item as output; RunPod marks the job FAILED.
    assert result["output"] == [{"error": result["output"][0]["error"]}]
    assert result["output"][0]["error"].startswith("invalid_input: exaggeration")


def test_health(worker):
    [item] = worker.post("/runsync", {"input": {"action": "health"}})["output"]
    assert item["status"] == "ok" and item["model"]["source"] == "model_dir"


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le", "flac", "mp3", "opus"])
def test_stream_in_every_format(worker, fmt):
    import json

    import av

    queued = worker.post("/run", {"input": {"text": "Streaming over the dev API.", "seed": 6,
                                            "stream": True, "format": fmt}})
    streamed = worker.post(f"/stream/{queued['id']}")
    assert streamed["status"] == "COMPLETED"
    items = [entry["output"] for entry in streamed["stream"]]
    chunks, result = items[:-1], items[-1]
    assert chunks and all(c["type"] == "chunk" for c in chunks)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert max(len(json.dumps(c)) for c in chunks) < 1_000_000
    assert result["type"] == "result" and result["chunks"] == len(chunks)
    data = b"".join(base64.b64decode(c["audio_base64"]) for c in chunks)
    if fmt == "pcm_s16le":
        seconds, rate = len(data) / 2 / 24000, 24000
    else:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            seconds = sum(f.samples for f in container.decode(stream)) / rate
    assert rate == (48000 if fmt == "opus" else 24000)
    assert seconds == pytest.approx(result["duration_s"], abs=0.15 if fmt == "mp3" else 0.01)


def test_voice_life_cycle(worker):
    from tests.speech import SENTENCES, speech_wav

    def call(**job_input):
        output = worker.post("/runsync", {"input": job_input})["output"]
        assert len(output) == 1, output
        return output[0]

    audio = base64.b64encode(speech_wav(SENTENCES[1])).decode()
    made = call(action="upload_voice", voice_id="e2e-voice", audio_base64=audio)
    assert made["voice_id"] == "e2e-voice" and made["reference_s"] > 3
    assert "e2e-voice" in [v["voice_id"] for v in call(action="list_voices")["voices"]]
    assert call(action="get_voice", voice_id="e2e-voice")["model"] == made["model"]
    exported = call(action="get_voice", voice_id="e2e-voice", export=True)["voice_base64"]
    assert call(action="upload_voice", voice_id="e2e-copy", voice_base64=exported)["voice_id"] == "e2e-copy"
    text = "Speaking with a stored voice."
    said = {voice: call(text=text, voice_id=voice, seed=2) for voice in ("e2e-voice", "e2e-copy")}
    assert [said[v]["voice_id"] for v in said] == ["e2e-voice", "e2e-copy"]
    builtin = call(text=text, seed=2)
    # The copy holds the same conditionals: the same take, and not the built-in voice's.
    assert said["e2e-voice"]["audio_base64"] == said["e2e-copy"]["audio_base64"]
    assert said["e2e-voice"]["audio_base64"] != builtin["audio_base64"]
    assert call(action="delete_voice", voice_id="e2e-voice") == {"deleted": "e2e-voice"}
    assert call(text="Again.", voice_id="e2e-voice") == {
        "error": "voice_not_found: Voice 'e2e-voice' not found."}
    lives_on = call(text=text, voice_id="e2e-copy", seed=2)
    assert lives_on["voice_id"] == "e2e-copy"
    assert lives_on["audio_base64"] == said["e2e-copy"]["audio_base64"]
