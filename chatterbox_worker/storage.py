"""S3-compatible storage for outputs too large to return inline: upload, then a presigned GET URL.

Configured from RunPod's own variable names (``BUCKET_ENDPOINT_URL``,
``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``) plus ``BUCKET_NAME``
and ``BUCKET_REGION``. Failures become ``StorageUnavailable`` with a message
that names the bucket and what went wrong, never a secret. Unlike RunPod's
own upload helper, nothing ever falls back to local disk.

An endpoint that is down or silent must not stall the worker (jobs run one at
a time, so a stuck upload or health check holds up every job behind it):

- every request waits at most ``S3_TIMEOUT_S`` to connect, to hand over data
  or for the answer, and is tried at most 3 times, but a request that timed
  out is never retried: silence now rarely ends before the next timeout, and
  retrying it is how timeouts used to stack up to minutes. So a silent
  endpoint fails a ``put`` after one timeout (plus up to 1 s botocore waits
  for "100 Continue" before sending a body), a refused connection within a
  second (3 attempts, short back-off), and a ``put`` that meets silence
  spends at most one timeout on the request that met it and one on cleaning
  up (aborting a multipart upload);
- ``status()`` (for ``health``) never does network I/O on the caller's
  thread: it returns the last known result and refreshes it on a background
  thread, at most one at a time. The first check starts when the storage is
  made, so start-up does not wait for the endpoint either.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import datetime, timezone
from typing import NamedTuple, Optional, Protocol

from .errors import StorageUnavailable

log = logging.getLogger("chatterbox_worker.storage")

MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
DEFAULT_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 3  # in all, the first one included; a timed-out attempt ends it early
STATUS_CACHE_S = 30.0  # a known status is served this long before a background re-check
# While nothing is known yet (the first check just started), status() waits this
# long for it: a healthy endpoint answers well within it, so a health job right
# after start-up says "ok" rather than "checking"; a silent one costs the caller
# only this.
FIRST_STATUS_WAIT_S = 1.0
CHECKING = "checking"  # status() before the first check has finished


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
                                     NoCredentialsError)

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "error"))
        if code in ("NoSuchBucket", "404", "NotFound"):
            return f"bucket '{bucket}' does not exist"
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403",
                    "Forbidden"):
            return f"access to bucket '{bucket}' was refused ({code}); check the bucket credentials"
        return f"S3 answered {code} for bucket '{bucket}'"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return f"cannot connect to the S3 endpoint of bucket '{bucket}'"
    if timed_out(exc):
        # A read timeout, or a send that stalled because the endpoint stopped taking
        # data (botocore calls that one ConnectionClosedError): silence either way.
        return f"the S3 endpoint of bucket '{bucket}' did not answer in time"
    if isinstance(exc, NoCredentialsError):
        return f"no S3 credentials for bucket '{bucket}'"
    return f"S3 request to bucket '{bucket}' failed ({type(exc).__name__})"


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a timeout (botocore wraps urllib3 wraps socket)."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectTimeoutError, ReadTimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _Known(NamedTuple):
    observed_at: float  # monotonic time the check (probe or upload) started
    status: str
    refresh_at: float  # after this, status() starts a background re-check


class S3Storage:
    """boto3 client for one bucket, shared by all jobs of the worker (thread-safe)."""

    def __init__(self, *, endpoint_url: str, access_key_id: str, secret_access_key: str,
                 bucket: str, region: Optional[str] = None, url_ttl_s: int = 3600,
                 key_prefix: str = "chatterbox", timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_attempts: int = MAX_ATTEMPTS, status_cache_s: float = STATUS_CACHE_S):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.url_ttl_s = url_ttl_s
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.status_cache_s = status_cache_s
        # total_max_attempts counts the first attempt; botocore's "max_attempts" key
        # counts retries only (3 meant 4 attempts: 4 x 30 s read timeout = 2 minutes).
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key, region_name=region or "us-east-1",
            config=Config(signature_version="s3v4", connect_timeout=timeout_s,
                          read_timeout=timeout_s,
                          retries={"total_max_attempts": max_attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}))
        # First in line, so its "no" (False) wins over the standard retry handler's delay.
        self._client.meta.events.register_first("needs-retry.s3", _no_retry_after_timeout)
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                        multipart_chunksize=MULTIPART_CHUNK, use_threads=False)
        self._status_lock = threading.Lock()
        self._known: Optional[_Known] = None
        self._probing = False
        self._first_known = threading.Event()
        with self._status_lock:
            self._start_probe()  # start-up goes on; health reports the result when it is in

    @classmethod
    def from_settings(cls, settings) -> Optional["S3Storage"]:
        if not settings.s3_configured:
            return None
        return cls(endpoint_url=settings.bucket_endpoint_url,
                   access_key_id=settings.bucket_access_key_id,
                   secret_access_key=settings.bucket_secret_access_key,
                   bucket=settings.bucket_name, region=settings.bucket_region,
                   url_ttl_s=settings.s3_url_ttl_s, timeout_s=settings.s3_timeout_s)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload ``data`` whole; large objects go up in parts. On failure no object is left."""
        started = time.monotonic()
        try:
            # upload_fileobj switches to a multipart upload above the threshold and
            # aborts it if a part fails, so a failed upload leaves no object behind.
            self._client.upload_fileobj(io.BytesIO(data), self.bucket, key,
                                        ExtraArgs={"ContentType": content_type},
                                        Config=self._transfer)
        except Exception as exc:
            reason = describe_failure(_root_cause(exc), self.bucket)
            # health shows this at once; its next call re-checks in the background, so a
            # passing fault does not leave the worker marked degraded for long.
            self._record(started, reason, refresh_at=time.monotonic())
            raise StorageUnavailable(f"could not upload the audio: {reason}") from None
        self._record(started, "ok", refresh_at=time.monotonic() + self.status_cache_s)

    def presign(self, key: str) -> str:
        """A presigned GET URL: computed and signed locally, no request to the endpoint."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_ttl_s)

    def status(self) -> str:
        """'ok', ``CHECKING``, or why the bucket is unusable, without waiting on the endpoint.

        The last known result (of a HEAD on the bucket, or of the last upload); a
        result older than ``status_cache_s``, or one from a failed upload, is still
        returned but starts a re-check on a background thread. Only before anything
        is known does it wait, at most ``FIRST_STATUS_WAIT_S``, for the first check.
        """
        with self._status_lock:
            known = self._known
            if known is None or time.monotonic() >= known.refresh_at:
                self._start_probe()
        if known is None:
            self._first_known.wait(FIRST_STATUS_WAIT_S)
            with self._status_lock:
                known = self._known
        return known.status if known is not None else CHECKING

    # -- the background check -------------------------------------------------

    def _start_probe(self) -> None:
        """Start a HEAD-bucket check on a daemon thread unless one runs (hold the lock)."""
        if self._probing:
            return
        self._probing = True
        threading.Thread(target=self._probe, name="s3-status", daemon=True).start()

    def _probe(self) -> None:
        started = time.monotonic()
        status = "S3 check failed"
        try:
            self._client.head_bucket(Bucket=self.bucket)
            status = "ok"
        except Exception as exc:
            status = describe_failure(exc, self.bucket)
        finally:
            self._record(started, status, refresh_at=time.monotonic() + self.status_cache_s)
            with self._status_lock:
                self._probing = False

    def _record(self, observed_at: float, status: str, *, refresh_at: float) -> None:
        """Keep ``status`` unless a check that started later already reported."""
        with self._status_lock:
            previous = self._known
            if previous is not None and previous.observed_at > observed_at:
                return
            self._known = _Known(observed_at, status, refresh_at)
        self._first_known.set()
        # Logged on change only: a re-check every 30 s must not repeat the same line.
        before = previous.status if previous is not None else None
        if status != before and status != "ok":
            log.warning("S3 output unusable: %s", status)
        elif status == "ok" and before is not None and before != "ok":
            log.info("S3 output usable again")


def _no_retry_after_timeout(caught_exception=None, **_) -> Optional[bool]:
    """botocore needs-retry hook: never retry an attempt that timed out.

    A refused or reset connection is retried (standard mode, with back-off);
    silence is not, since each retry would cost another full timeout.
    ``None`` leaves the decision to the standard retry handler.
    """
    if caught_exception is not None and timed_out(caught_exception):
        return False
    return None


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
