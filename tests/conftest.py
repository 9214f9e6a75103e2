"""Shared fixtures: tiny random checkpoints made on the fly, and one warm engine per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# diffusers writes under HF_HOME at import; tests never touch the user's cache
# and never reach the Hub.
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="cbw-hf-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)  # leave no trace
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def network_guard():
    """No test reaches beyond loopback: any other connection or name lookup fails the test
    before a packet leaves (tests/net_guard.py). Tests may request it to record attempts."""
    from tests.net_guard import block_network

    with block_network() as guard:
        yield guard


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weights checkpoint in the upstream layout (seed 0), shared by the session."""
    from chatterbox_worker.tiny_model import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-seed0"), seed=0)


@pytest.fixture(scope="session")
def turbo_checkpoint(tmp_path_factory) -> Path:
    """A random-weights Chatterbox Turbo checkpoint in its real layout (seed 0), shared by the session."""
    from chatterbox_worker.tiny_model import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-turbo-seed0"), seed=0, variant="turbo")


@pytest.fixture(scope="session")
def turbo_settings_env(turbo_checkpoint, tmp_path_factory) -> dict:
    """Environment for a turbo worker on the tiny Turbo checkpoint with its own voices directory."""
    return {"CHATTERBOX_VARIANT": "turbo", "CHATTERBOX_MODEL_DIR": str(turbo_checkpoint),
            "VOICES_DIR": str(tmp_path_factory.mktemp("turbo-voices")), "CHATTERBOX_WARMUP": "0"}


@pytest.fixture(scope="session")
def turbo_engine(turbo_settings_env):
    """A warm engine serving the tiny Turbo checkpoint through the normal loading path."""
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine

    return load_engine(load_settings(turbo_settings_env))


@pytest.fixture(scope="session")
def multilingual_checkpoint(tmp_path_factory) -> Path:
    """A random multilingual checkpoint in upstream's layout (seed 0), shared by the session."""
    from chatterbox_worker.tiny_multilingual import write_multilingual_checkpoint

    return write_multilingual_checkpoint(tmp_path_factory.mktemp("tiny-mtl-seed0"), seed=0)


@pytest.fixture(scope="session")
def multilingual_engine(multilingual_checkpoint):
    """A warm engine on the tiny multilingual checkpoint (CHATTERBOX_VARIANT=multilingual)."""
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine

    return load_engine(load_settings({"CHATTERBOX_VARIANT": "multilingual",
                                      "CHATTERBOX_MODEL_DIR": str(multilingual_checkpoint),
                                      "CHATTERBOX_WARMUP": "0"}))


@pytest.fixture(scope="session")
def settings_env(tiny_checkpoint, tmp_path_factory) -> dict:
    """Environment for a worker on the tiny checkpoint with its own voices directory."""
    return {"CHATTERBOX_MODEL_DIR": str(tiny_checkpoint),
            "VOICES_DIR": str(tmp_path_factory.mktemp("voices")),
            "CHATTERBOX_WARMUP": "0"}


@pytest.fixture(scope="session")
def engine(settings_env):
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine

    return load_engine(load_settings(settings_env))


@pytest.fixture
def model(engine):
    return engine.model


def stop_process(process, timeout: float = 20.0) -> None:
    """Terminate a server the tests started; kill it if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker_env(**extra) -> dict:
    """os.environ for a worker subprocess: our package importable, quiet, offline."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    for key in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the whole session."""
    from tests.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
