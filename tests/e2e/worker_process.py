"""Start the real worker (``python handler.py``) as a subprocess for end-to-end tests."""

from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import stop_process

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevApiWorker:
    """``python handler.py --rp_serve_api`` on a loopback port, stopped on exit."""

    def __init__(self, env: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
             "--rp_api_port", str(self.port)],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def post(self, path: str, payload=None, timeout: float = 300.0) -> dict:
        response = requests.post(self.url + path, json=payload, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()

    def call(self, **job_input) -> dict:
        """A job's one item over /runsync (every action but a generate makes one)."""
        output = self.post("/runsync", {"input": job_input})["output"]
        assert len(output) == 1, output
        return output[0]

    def streamed(self, **job_input):
        """A streamed generate over /run and /stream: (the chunks' audio bytes, the result item)."""
        queued = self.post("/run", {"input": {**job_input, "stream": True}})
        done = self.post(f"/stream/{queued['id']}")
        assert done["status"] == "COMPLETED", done
        items = [entry["output"] for entry in done["stream"]]
        chunks, result = items[:-1], items[-1]
        assert chunks and all(c["type"] == "chunk" for c in chunks) and result["type"] == "result"
        assert result["chunks"] == len(chunks)
        return b"".join(base64.b64decode(c["audio_base64"]) for c in chunks), result


@contextlib.contextmanager
def running_worker(env: dict, log_dir: Path):
    """A ready ``DevApiWorker`` for the ``with`` block (a module or session fixture's body)."""
    process = DevApiWorker(env, Path(log_dir) / "worker.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
