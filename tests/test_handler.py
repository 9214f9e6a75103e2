"""``python handler.py`` as a new user runs it: the local test job, and start-up failures."""

import io
import json
import subprocess
import sys

import soundfile

from tests.conftest import ROOT, worker_env


def run_handler(env, *args, timeout=300):
    return subprocess.run([sys.executable, "handler.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_local_run_saves_the_audio_and_prints_its_path(settings_env):
    done = run_handler(worker_env(**settings_env))
    assert done.returncode == 0, done.stderr[-2000:]
    path = ROOT / done.stdout.strip().splitlines()[-1]
    assert path == ROOT / "output" / "local-test.wav"
    samples, rate = soundfile.read(io.BytesIO(path.read_bytes()))
    assert rate == 24000 and len(samples) > rate // 4


def test_local_run_of_a_failing_job_exits_non_zero(settings_env):
    job = json.dumps({"input": {"text": "hi", "voice_id": "nobody"}})
    done = run_handler(worker_env(**settings_env), "--test_input", job)
    assert done.returncode == 1
    assert "voice_not_found: Voice 'nobody' not found." in done.stderr
    assert done.stdout.strip() == ""


def test_broken_checkpoint_stops_the_worker_with_one_clear_line(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ve.safetensors", "tokenizer.json", "s3gen.safetensors", "conds.pt",
                 "worker_model_sizes.json"):
        (broken / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (broken / "t3_cfg.safetensors").write_bytes(b"\x00" * 64)  # truncated download
    done = run_handler(worker_env(CHATTERBOX_MODEL_DIR=broken))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("chatterbox-worker:")]
    assert len(lines) == 1 and "t3_cfg.safetensors" in lines[0]
    assert "Traceback" not in done.stderr


def test_malformed_setting_stops_the_worker_before_loading(tiny_checkpoint):
    done = run_handler(worker_env(CHATTERBOX_MODEL_DIR=tiny_checkpoint, MAX_TEXT_CHARS="many"))
    assert done.returncode != 0
    assert "MAX_TEXT_CHARS='many' is not valid" in done.stderr and "Traceback" not in done.stderr
