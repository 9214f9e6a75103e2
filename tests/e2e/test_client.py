"""scripts/client.py against the real worker over the local dev API."""

import io
import json
import subprocess
import sys

import av
import pytest

from tests.conftest import ROOT, worker_env
from tests.speech import SENTENCES, speech_wav

pytestmark = pytest.mark.e2e


def client(worker, *args):
    return subprocess.run([sys.executable, "scripts/client.py", "--local", worker.url, *args],
                          cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=600)


def seconds(path):
    with av.open(io.BytesIO(path.read_bytes())) as container:
        stream = container.streams.audio[0]
        return sum(f.samples for f in container.decode(stream)) / stream.codec_context.sample_rate


@pytest.mark.parametrize("stream", [False, True], ids=["one-shot", "streamed"])
def test_generate_writes_a_playable_file(worker, tmp_path, stream):
    out = tmp_path / "hello.mp3"
    done = client(worker, "generate", "Hello from the client.", "-o", str(out), "--seed", "3",
                  *(["--stream"] if stream else []))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["format"] == "mp3" and result["file"] == str(out)
    assert seconds(out) == pytest.approx(result["duration_s"], abs=0.15)
    if stream:
        assert "chunk 0:" in done.stderr
    assert not out.with_name("hello.mp3.part").exists()


def test_voice_commands_and_failure_exit_codes(worker, tmp_path):
    ref = tmp_path / "ref.wav"
    ref.write_bytes(speech_wav(SENTENCES[2]))
    made = client(worker, "upload", "cli-voice", "--audio", str(ref), "--overwrite")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["voice_id"] == "cli-voice"
    listed = client(worker, "voices")
    assert "cli-voice" in [v["voice_id"] for v in json.loads(listed.stdout)["voices"]]
    exported = tmp_path / "cli-voice.pth"
    assert client(worker, "voice", "cli-voice", "--export", str(exported)).returncode == 0
    assert exported.stat().st_size > 1000
    assert client(worker, "delete", "cli-voice").returncode == 0
    gone = client(worker, "generate", "Hi.", "-o", str(tmp_path / "x.wav"), "--voice", "cli-voice")
    assert gone.returncode == 1
    assert "voice_not_found: Voice 'cli-voice' not found." in gone.stderr
    assert not (tmp_path / "x.wav").exists() and not (tmp_path / "x.wav.part").exists()
    assert client(worker, "upload", "x").returncode == 2


def test_unreachable_endpoint_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "scripts/client.py", "--local", "http://127.0.0.1:9",
                           "health"], cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3 and "cannot reach" in done.stderr


def test_sampling_flags_reach_the_worker_and_the_extension_picks_the_format(worker, tmp_path):
    def take(name, *flags):
        out = tmp_path / name
        done = client(worker, "generate", "Flags reach the worker.", "-o", str(out), "--seed", "5",
                      *flags)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout), out.read_bytes()

    flags = ["--exaggeration", "0.7", "--cfg-weight", "0.3", "--top-p", "0.9", "--min-p", "0.1",
             "--repetition-penalty", "1.3", "--language", "en"]
    result, first = take("a.flac", "--temperature", "0.8", *flags)
    assert result["format"] == "flac" and first[:4] == b"fLaC"
    assert take("b.flac", "--temperature", "0.8", *flags)[1] == first
    assert take("c.flac", "--temperature", "1.7", *flags)[1] != first


def test_cli_errors_name_flags_in_plain_sentences(worker, tmp_path):
    hot = client(worker, "generate", "Hi.", "-o", str(tmp_path / "x.wav"), "--temperature", "9")
    assert hot.returncode == 1
    assert "invalid_input: --temperature: must be a number from 0.05 to 5" in hot.stderr
    assert "Input should" not in hot.stderr and "temperature.float" not in hot.stderr
    odd = client(worker, "generate", "Hi.", "-o", str(tmp_path / "x.m4a"))
    assert odd.returncode == 2 and "'x.m4a'" in odd.stderr and "--format" in odd.stderr
    assert not (tmp_path / "x.m4a").exists() and not (tmp_path / "x.m4a.part").exists()
    ref = tmp_path / "ref.wav"
    ref.write_bytes(speech_wav(SENTENCES[1]))
    assert client(worker, "upload", "cli-twice", "--audio", str(ref), "--overwrite").returncode == 0
    again = client(worker, "upload", "cli-twice", "--audio", str(ref))
    assert again.returncode == 1 and "pass --overwrite to replace it" in again.stderr
    assert "overwrite: true" not in again.stderr
    assert client(worker, "delete", "cli-twice").returncode == 0
