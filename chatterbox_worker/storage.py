"""S3-compatible storage for outputs too large to return inline: upload, then a presigned GET URL.

Configured from RunPod's own variable names (``BUCKET_ENDPOINT_URL``,
``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``) plus ``BUCKET_NAME``
and ``BUCKET_REGION``. Connect and read timeouts and a bounded retry policy
make a dead endpoint fail in seconds. Failures become ``StorageUnavailable``
with a message that names the bucket and what went wrong, never a secret.
Unlike RunPod's own upload helper, nothing ever falls back to local disk.
"""

from __future__ import annotations

import io
import threading
import time
from datetime import datetime, timezone
from typing import Optional, Protocol

from .errors import StorageUnavailable

MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
STATUS_CACHE_S = 30.0


class OutputStorage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def presign(self, key: str) -> str: ...

    def status(self) -> str: ...


def output_key(prefix: str, job_id: str, extension: str, now: Optional[datetime] = None) -> str:
    """``<prefix>/<YYYY-MM-DD>/<job id>.<ext>``; the job id is made safe for a key."""
    now = now or datetime.now(timezone.utc)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)[:128] or "job"
    return f"{prefix.strip('/')}/{now:%Y-%m-%d}/{safe}.{extension}"


def describe_failure(exc: Exception, bucket: str) -> str:
    """What went wrong, in words a caller can act on, without credentials or signatures."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, ReadTimeoutError)

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "error"))
        if code in ("NoSuchBucket", "404", "NotFound"):
            return f"bucket '{bucket}' does not exist"
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403",
                    "Forbidden"):
            return f"access to bucket '{bucket}' was refused ({code}); check the bucket credentials"
        return f"S3 answered {code}"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return "cannot connect to the S3 endpoint"
    if isinstance(exc, ReadTimeoutError):
        return "the S3 endpoint did not answer in time"
    if isinstance(exc, NoCredentialsError):
        return "no S3 credentials"
    return f"S3 request failed ({type(exc).__name__})"


class S3Storage:
    """boto3 client for one bucket, shared by all jobs of the worker (thread-safe)."""

    def __init__(self, *, endpoint_url: str, access_key_id: str, secret_access_key: str,
                 bucket: str, region: Optional[str] = None, url_ttl_s: int = 3600,
                 key_prefix: str = "chatterbox", connect_timeout_s: float = 3.0,
                 read_timeout_s: float = 30.0, max_attempts: int = 3):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.url_ttl_s = url_ttl_s
        self.key_prefix = key_prefix
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key, region_name=region or "us-east-1",
            config=Config(signature_version="s3v4", connect_timeout=connect_timeout_s,
                          read_timeout=read_timeout_s,
                          retries={"max_attempts": max_attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}))
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                        multipart_chunksize=MULTIPART_CHUNK, use_threads=False)
        self._status: Optional[tuple] = None
        self._status_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> Optional["S3Storage"]:
        if not settings.s3_configured:
            return None
        return cls(endpoint_url=settings.bucket_endpoint_url,
                   access_key_id=settings.bucket_access_key_id,
                   secret_access_key=settings.bucket_secret_access_key,
                   bucket=settings.bucket_name, region=settings.bucket_region,
                   url_ttl_s=settings.s3_url_ttl_s)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload ``data`` whole; large objects go up in parts. On failure no object is left."""
        try:
            # upload_fileobj switches to a multipart upload above the threshold and
            # aborts it if a part fails, so a failed upload leaves no object behind.
            self._client.upload_fileobj(io.BytesIO(data), self.bucket, key,
                                        ExtraArgs={"ContentType": content_type},
                                        Config=self._transfer)
        except Exception as exc:
            self._forget_status()
            raise StorageUnavailable(
                f"could not upload the audio: {describe_failure(_root_cause(exc), self.bucket)}"
            ) from None

    def presign(self, key: str) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_ttl_s)

    def status(self) -> str:
        """'ok' or why the bucket is unusable; checked with HEAD bucket, cached for a while."""
        with self._status_lock:
            if self._status and time.monotonic() - self._status[0] < STATUS_CACHE_S:
                return self._status[1]
        try:
            self._client.head_bucket(Bucket=self.bucket)
            status = "ok"
        except Exception as exc:
            status = describe_failure(exc, self.bucket)
        with self._status_lock:
            self._status = (time.monotonic(), status)
        return status

    def _forget_status(self) -> None:
        with self._status_lock:
            self._status = None


def _root_cause(exc: BaseException) -> BaseException:
    """boto3's transfer manager wraps the client error it failed on."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        nxt = seen.__cause__ or seen.__context__
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(nxt, (ClientError, BotoCoreError)):
            return nxt
        seen = nxt
    return exc
