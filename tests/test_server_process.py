"""``python -m chatterbox_worker.server`` as an operator runs it: start-up, loading, SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT, stop_process, worker_env


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def start(env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chatterbox_worker.server"], cwd=ROOT,
                            env=worker_env(**env), stdout=log, stderr=subprocess.STDOUT)


def test_refuses_an_open_address_without_a_key(settings_env):
    done = subprocess.run([sys.executable, "-m", "chatterbox_worker.server"], cwd=ROOT,
                          env=worker_env(**settings_env, HOST="0.0.0.0", PORT=free_port()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "API_KEY" in done.stderr and "ALLOW_NO_API_KEY" in done.stderr
    assert "Traceback" not in done.stderr


def test_listens_at_once_serves_when_loaded_and_drains_on_sigterm(settings_env, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    log_file = open(log_path, "wb")
    process = start({**settings_env, "VOICES_DIR": str(tmp_path / "voices"), "HOST": "127.0.0.1",
                     "PORT": port, "API_KEY": "secret-key-value"}, log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = []
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < deadline:
                try:
                    status = client.get("/ping").status_code
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if not statuses or statuses[-1] != status:
                    statuses.append(status)
                if status == 200:
                    break
                time.sleep(0.05)
            # The port answers before the model is ready (importing it alone takes seconds).
            assert statuses == [204, 200], statuses
            headers = {"X-API-Key": "secret-key-value"}
            with client.stream("POST", "/tts/generate", headers=headers,
                               json={"text": "A long narration. " * 4, "seed": 1}) as response:
                raw = response.iter_raw()
                first = next(raw)
                process.send_signal(signal.SIGTERM)  # while the take is being made
                rest = b"".join(raw)
            assert response.status_code == 200 and first[:4] == b"RIFF" and len(rest) > 24000
        # uvicorn drains, then ends the process by the signal it got (exit status -15).
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = log_path.read_text()
        assert "secret-key-value" not in log
        assert "outcome=ok" in log
    finally:
        stop_process(process)
        log_file.close()


def test_handler_runs_the_server_in_server_mode(settings_env):
    """The image's one command (python handler.py) serves HTTP with WORKER_MODE=server: here
    it gets as far as the server's own start-up check, before any model is loaded."""
    done = subprocess.run([sys.executable, "handler.py"], cwd=ROOT,
                          env=worker_env(**settings_env, WORKER_MODE="server", HOST="0.0.0.0",
                                         PORT=free_port()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("chatterbox-server: cannot start:") and "API_KEY" in done.stderr
