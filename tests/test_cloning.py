"""scripts/clone_voice.py on a folder of real speech: segments, drops, and a voice the worker uses."""

import base64
import io
import json
import subprocess
import sys
import wave

import numpy as np
import pytest

from chatterbox_worker.audio import encode_audio
from chatterbox_worker.cloning import segments_at_pauses
from chatterbox_worker.config import load_settings
from chatterbox_worker.engine import SynthesisRequest
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.voices import VoiceStore
from tests.conftest import ROOT, worker_env
from tests.speech import long_speech_wav


def wav_bytes(samples, rate):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def samples_of(data):
    with wave.open(io.BytesIO(data)) as wav:
        rate = wav.getframerate()
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768, rate


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recordings")
    clean, rate = samples_of(long_speech_wav(45))
    (folder / "session1.wav").write_bytes(wav_bytes(clean[: len(clean) // 2], rate))
    (folder / "session2.wav").write_bytes(wav_bytes(clean[len(clean) // 2:], rate))
    (folder / "hot.wav").write_bytes(wav_bytes(clean[: 12 * rate] * 40, rate))  # clipped
    rng = np.random.default_rng(0)
    noisy = clean[: 12 * rate] + 0.2 * rng.standard_normal(12 * rate)
    (folder / "street.wav").write_bytes(wav_bytes(noisy, rate))
    (folder / "notes.mp3").write_bytes(b"this is not audio" * 100)
    (folder / "README.txt").write_text("ignored: not an audio file")
    return folder


def test_segments_are_cut_at_pauses_within_limits(recordings):
    from chatterbox_worker import reference

    audio = reference.decode((recordings / "session1.wav").read_bytes())
    spans = segments_at_pauses(audio)
    lengths = [(e - s) / 24000 for s, e in spans]
    assert len(spans) >= 2 and max(lengths) <= 15.0
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def test_clone_voice_script_makes_a_voice_the_worker_lists_and_speaks_with(recordings, tmp_path,
                                                                         settings_env, engine):
    voices = tmp_path / "voices"
    env = worker_env(**{**settings_env, "VOICES_DIR": str(voices)})
    done = subprocess.run([sys.executable, "scripts/clone_voice.py", "--input_dir", str(recordings),
                           "--output_voice_id", "narrator"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["voice_id"] == "narrator" and summary["files_read"] == 4
    assert "notes.mp3" in summary["files_failed"]
    assert summary["segments_kept"] >= 2 and summary["seconds_used"] >= 15
    assert summary["dropped_by_reason"].get("clipped", 0) >= 1
    assert summary["dropped_by_reason"].get("noisy", 0) >= 1
    assert summary["prompt_from"].startswith("session")
    assert "[1/5]" in done.stderr  # progress on stderr

    settings = load_settings({"VOICES_DIR": str(voices)})
    runner = JobRunner(settings, engine, VoiceStore(voices, model_signature=engine.model.signature,
                                                    variant="original"))
    [listed] = list(runner.run({"id": "l", "input": {"action": "list_voices"}}))
    assert [v["voice_id"] for v in listed["voices"]] == ["narrator"]
    [spoken] = list(runner.run({"id": "g", "input": {"text": "Cloned.", "voice_id": "narrator",
                                                      "seed": 3}}))
    assert spoken["type"] == "result" and spoken["voice_id"] == "narrator"
    # The cloned voice is the one that spoke: the engine's take with the stored
    # conditionals, and not the built-in voice's.
    voice = runner.voices.load("narrator").conditionals
    take = engine.synthesize(SynthesisRequest(text="Cloned.", voice=voice, seed=3))
    assert spoken["audio_base64"] == base64.b64encode(
        encode_audio(take.audio, take.sample_rate, "wav", 24000)).decode("ascii")
    [builtin] = list(runner.run({"id": "b", "input": {"text": "Cloned.", "seed": 3}}))
    assert builtin["audio_base64"] != spoken["audio_base64"]

    again = subprocess.run([sys.executable, "scripts/clone_voice.py", "--input_dir", str(recordings),
                            "--output_voice_id", "narrator"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_an_unwritable_voices_dir_is_refused_before_the_model_loads(recordings, tmp_path,
                                                                   settings_env):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a folder under a file cannot be made, even by root
    env = worker_env(**settings_env)
    done = subprocess.run([sys.executable, "scripts/clone_voice.py", "--input_dir", str(recordings),
                           "--output_voice_id", "narrator", "--voices_dir", str(blocker / "voices")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert f"cannot write to --voices_dir {blocker / 'voices'}" in done.stderr
    assert "loading the model" not in done.stderr and "Warning" not in done.stderr
