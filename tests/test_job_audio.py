"""scripts/job_audio.py: what the README's curl examples pipe a job's answer into."""

import base64
import http.server
import json
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT

AUDIO = b"RIFF....WAVEfmt audio bytes"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def job_audio(answer, out, *flags):
    return subprocess.run([sys.executable, "scripts/job_audio.py", *flags, str(out)], cwd=ROOT,
                          input=answer if isinstance(answer, str) else json.dumps(answer),
                          capture_output=True, text=True, timeout=60)


def test_an_inline_result_is_written(tmp_path):
    done = job_audio({"id": "j", "status": "COMPLETED", "output": [
        {"type": "result", "format": "wav", "audio_base64": b64(AUDIO)}]}, tmp_path / "a.wav")
    assert done.returncode == 0 and done.stdout.strip() == "COMPLETED"
    assert (tmp_path / "a.wav").read_bytes() == AUDIO


@pytest.fixture
def audio_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(AUDIO)))
            self.end_headers()
            self.wfile.write(AUDIO)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out.wav?X-Amz-Signature=abc"
    server.shutdown()
    server.server_close()


def test_a_result_in_s3_is_downloaded_from_its_url(tmp_path, audio_server):
    done = job_audio({"id": "j", "status": "COMPLETED", "output": [
        {"type": "result", "format": "wav", "audio_url": audio_server}]}, tmp_path / "a.wav")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.wav").read_bytes() == AUDIO


def test_stream_polls_append_chunks_and_a_streamed_s3_result_is_not_fetched_again(tmp_path):
    out = tmp_path / "s.mp3"
    first = {"status": "IN_PROGRESS", "stream": [
        {"output": {"type": "chunk", "index": 0, "audio_base64": b64(b"one")}}]}
    last = {"status": "COMPLETED", "stream": [
        {"output": {"type": "chunk", "index": 1, "audio_base64": b64(b"two")}},
        {"output": {"type": "result", "chunks": 2, "audio_url": "http://127.0.0.1:9/never"}}]}
    assert job_audio(first, out, "--append").stdout.strip() == "IN_PROGRESS"
    assert job_audio(last, out, "--append").stdout.strip() == "COMPLETED"
    assert out.read_bytes() == b"onetwo"


@pytest.mark.parametrize("answer,shown", [
    ({"id": "j", "status": "FAILED", "error": "invalid_input: text: is required"},
     "job FAILED: invalid_input: text: is required"),  # RunPod
    ({"id": "j", "status": "COMPLETED", "output": [{"error": "voice_not_found: Voice 'x' not found."}]},
     "job COMPLETED: voice_not_found: Voice 'x' not found."),  # the dev API
    ({"status": "FAILED", "stream": []}, "job FAILED: no error given"),
])
def test_a_failed_job_prints_its_error_and_exits_1(tmp_path, answer, shown):
    done = job_audio(answer, tmp_path / "a.wav")
    assert done.returncode == 1 and done.stderr.strip() == shown
    assert not (tmp_path / "a.wav").exists()


@pytest.mark.parametrize("answer", ["not json", "[1, 2]", '{"detail": "Unauthorized"}'])
def test_an_answer_that_is_not_a_job_is_bad_usage(tmp_path, answer):
    done = job_audio(answer, tmp_path / "a.wav")
    assert done.returncode == 2 and done.stderr and "Traceback" not in done.stderr


def test_help_is_shown_instead_of_waiting_for_an_answer(tmp_path):
    done = subprocess.run([sys.executable, "scripts/job_audio.py", "--help"], cwd=ROOT,
                          input="", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage" not in done.stderr
    assert done.stdout.startswith("Save the audio of a RunPod job answer")
