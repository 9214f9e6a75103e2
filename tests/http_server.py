"""The HTTP server (chatterbox_worker.server) served by uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from chatterbox_worker.config import load_settings
from chatterbox_worker.server import create_app
from chatterbox_worker.server.protocol import uvicorn_config
from chatterbox_worker.service import Service
from chatterbox_worker.voices import VoiceStore


def service_loader(engine, gate: threading.Event = None):
    """A loader that serves the tests' warm engine (after ``gate`` is set, when given)."""
    def load(settings):
        if gate is not None:
            gate.wait(60)
        store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                           variant=engine.model.variant)
        return Service(settings, engine, store)
    return load


class ServedApp:
    def __init__(self, env: dict, loader, *, health_port: bool = False):
        self.settings = load_settings(env)
        self.app = create_app(self.settings, loader)
        self.core = self.app.state.core
        sockets = [socket.create_server(("127.0.0.1", 0))]
        if health_port:
            sockets.append(socket.create_server(("127.0.0.1", 0)))
            self.core.health_port = sockets[1].getsockname()[1]
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_url = (f"http://127.0.0.1:{self.core.health_port}" if health_port else None)
        config = uvicorn_config(self.app, self.settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.core.ready.wait(timeout), "model did not load"

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no request holds a slot (a cancelled one lets go after its step in progress)."""
        deadline = time.monotonic() + timeout
        while self.core.slots.running or (self.core.service and self.core.service.running):
            assert time.monotonic() < deadline, "the server did not free its slot"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
