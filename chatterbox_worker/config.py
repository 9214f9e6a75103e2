"""Typed settings from the environment, checked once at start-up.

Every environment variable the worker reads is declared here; nothing else in
the package reads ``os.environ``. A malformed value raises ``ConfigError`` with
one line naming the variable, so the worker stops at start-up instead of
failing its first job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping, Optional, Tuple

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)

from .errors import ConfigError

RUNPOD_VOLUME = Path("/runpod-volume")

# RunPod answers /run with at most 10 MB and /runsync with 20 MB. Base64 grows
# audio by 4/3, and the result item carries a little JSON besides: 7 MB of
# encoded audio fits the smaller of the two limits with room to spare.
DEFAULT_INLINE_MAX_BYTES = 7_000_000
# A streamed job's items are all collected into its final output as well.
DEFAULT_AGGREGATE_MAX_BYTES = 7_000_000
# Jobs a CUDA worker takes at once unless MAX_CONCURRENCY says otherwise: they
# share T3's decode steps (continuous batching); the vocoder runs one call at a time.
DEFAULT_CUDA_CONCURRENCY = 8

# (setting name, environment variable). Order is the order of the README table.
ENVIRONMENT = {
    "variant": "CHATTERBOX_VARIANT",
    "mtl_t3": "CHATTERBOX_MTL_T3",
    "model_dir": "CHATTERBOX_MODEL_DIR",
    "baked_model_dir": "CHATTERBOX_BAKED_DIR",
    "volume_hf_cache": "CHATTERBOX_VOLUME_HF_CACHE",
    "device": "CHATTERBOX_DEVICE",
    "dtype": "CHATTERBOX_DTYPE",
    "cuda_graphs": "CHATTERBOX_CUDA_GRAPHS",
    "flow_steps": "CHATTERBOX_FLOW_STEPS",
    "vocoder_batch": "CHATTERBOX_VOCODER_BATCH",
    "watermark": "CHATTERBOX_WATERMARK",
    "warmup": "CHATTERBOX_WARMUP",
    "voices_dir": "VOICES_DIR",
    "max_text_chars": "MAX_TEXT_CHARS",
    "inline_max_bytes": "INLINE_MAX_BYTES",
    "aggregate_max_bytes": "AGGREGATE_MAX_BYTES",
    "bucket_endpoint_url": "BUCKET_ENDPOINT_URL",
    "bucket_access_key_id": "BUCKET_ACCESS_KEY_ID",
    "bucket_secret_access_key": "BUCKET_SECRET_ACCESS_KEY",
    "bucket_name": "BUCKET_NAME",
    "bucket_region": "BUCKET_REGION",
    "s3_url_ttl_s": "S3_URL_TTL_S",
    "s3_key_prefix": "S3_KEY_PREFIX",
    "s3_timeout_s": "S3_TIMEOUT_S",
    "allow_private_urls": "ALLOW_PRIVATE_URLS",
    "max_concurrency": "MAX_CONCURRENCY",
    "stream_chunk_tokens": "STREAM_CHUNK_TOKENS",
    "stream_left_context_tokens": "STREAM_LEFT_CONTEXT_TOKENS",
    "stream_prompt_tokens": "STREAM_PROMPT_TOKENS",
    "log_level": "LOG_LEVEL",
    "host": "HOST",
    "port": "PORT",
    "port_health": "PORT_HEALTH",
    "api_key": "API_KEY",
    "allow_no_api_key": "ALLOW_NO_API_KEY",
    "max_queue": "MAX_QUEUE",
    "cors_origins": "CORS_ORIGINS",
    "worker_mode": "WORKER_MODE",
    "request_timeout_s": "REQUEST_TIMEOUT_S",
    "header_timeout_s": "HEADER_TIMEOUT_S",
}


def default_voices_dir() -> Path:
    """The network volume when one is attached, else a folder beside the worker."""
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "voices"
    return Path("voices")


class Settings(BaseModel):
    """Everything configurable about the worker. Defaults are those of docs/API.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["original", "turbo", "multilingual"] = "original"
    # The multilingual model's T3 weights: v2 (what chatterbox-tts 0.1.7 loads)
    # or v3 (newer upstream's checkpoint, same architecture). Others ignore it.
    mtl_t3: Literal["v2", "v3"] = "v2"
    model_dir: Optional[Path] = None
    baked_model_dir: Path = Path("/opt/chatterbox/weights")
    volume_hf_cache: Path = RUNPOD_VOLUME / "huggingface-cache" / "hub"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # T3's weight format. auto: bfloat16 on CUDA, float32 on CPU (the exact,
    # upstream-identical path). int8 (dynamic quantisation of T3's linear
    # layers) is for CPU only. S3Gen stays float32 in every case.
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"
    # Capture T3's decode step in CUDA graphs (CUDA only; off to debug).
    cuda_graphs: bool = True
    # The vocoder's flow-matching steps; None: the served model's upstream value
    # (10, turbo's mean-flow vocoder 2). Fewer is faster (its cost is nearly
    # proportional) and changes the audio; tune by listening.
    flow_steps: Optional[int] = Field(default=None, ge=1, le=50)
    # Run equal-shaped chunks of concurrent streams as one vocoder flow call.
    # auto: with the fast decoder (GPU, or a non-float32 T3), where the vocoder
    # is launch-bound; off keeps a job's audio bit for bit its audio alone.
    vocoder_batch: Literal["auto", "on", "off"] = "auto"
    watermark: bool = True
    warmup: bool = True
    voices_dir: Path = Field(default_factory=default_voices_dir)
    max_text_chars: int = Field(default=5000, ge=1, le=100_000)
    inline_max_bytes: int = Field(default=DEFAULT_INLINE_MAX_BYTES, ge=1)
    aggregate_max_bytes: int = Field(default=DEFAULT_AGGREGATE_MAX_BYTES, ge=1)
    bucket_endpoint_url: Optional[str] = None
    bucket_access_key_id: Optional[str] = None
    bucket_secret_access_key: Optional[str] = None
    bucket_name: Optional[str] = None
    bucket_region: Optional[str] = None
    s3_url_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    s3_key_prefix: str = Field(default="chatterbox", pattern=r"^[A-Za-z0-9._/-]{1,200}$")
    # Longest wait on the S3 endpoint per request (to connect, hand over data or get the
    # answer); a timed-out request is not retried, so this bounds how long a silent
    # endpoint holds up a job (storage.py).
    s3_timeout_s: float = Field(default=5.0, ge=0.5, le=300)
    allow_private_urls: bool = False
    max_concurrency: Optional[int] = Field(default=None, ge=1, le=64)
    # Streaming schedule: tokens per chunk (25 tokens = 1 s; the last size
    # repeats), left context re-vocoded per chunk, and how much of the voice
    # prompt (in tokens, 0 = all) each chunk's flow decoder sees.
    stream_chunk_tokens: Tuple[int, ...] = (8, 32, 96, 200)
    stream_left_context_tokens: int = Field(default=16, ge=1, le=200)
    stream_prompt_tokens: int = Field(default=50, ge=0, le=500)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # HTTP server mode (python -m chatterbox_worker.server). PORT_HEALTH: a second
    # port for /ping and /health (RunPod load-balancing endpoints), when different.
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    port_health: Optional[int] = Field(default=None, ge=1, le=65535)
    # Required in X-API-Key (or Authorization: Bearer on the OpenAI routes) when set.
    api_key: Optional[SecretStr] = None
    # Serving a non-loopback address without API_KEY is refused unless this says it is meant.
    allow_no_api_key: bool = False
    # Requests that may wait for a free slot once MAX_CONCURRENCY run; beyond: 429.
    max_queue: int = Field(default=16, ge=0, le=10_000)
    # Comma-separated origins allowed by CORS; unset: no CORS headers.
    cors_origins: Optional[str] = None
    # What `python handler.py` (the image's command) runs: the RunPod worker or the HTTP server.
    worker_mode: Literal["worker", "server"] = "worker"
    # Server mode: longest a request may take, queue wait included (RunPod
    # load-balancing endpoints give a request 5.5 minutes).
    request_timeout_s: float = Field(default=330.0, ge=1, le=24 * 3600)
    # Server mode: how long a client may take to send a request's line and
    # headers (from connecting, or from a keep-alive connection's next request).
    header_timeout_s: float = Field(default=15.0, ge=1, le=300)

    @field_validator("stream_chunk_tokens", mode="before")
    @classmethod
    def _chunk_list(cls, value):
        if isinstance(value, str):
            try:
                value = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
            except ValueError:
                raise ValueError("must be comma-separated whole numbers, e.g. 8,16,32,64") from None
        if not value or any(v < 1 or v > 500 for v in value):
            raise ValueError("needs 1 to 500 tokens per chunk")
        return tuple(value)

    @property
    def s3_configured(self) -> bool:
        return bool(self.bucket_endpoint_url and self.bucket_access_key_id
                    and self.bucket_secret_access_key and self.bucket_name)

    @property
    def concurrency(self) -> int:
        """Jobs one worker takes at once: the setting, else by device.

        On CUDA concurrent jobs share T3's decode steps (engine/scheduler.py),
        so several at once cost little more than one: ``DEFAULT_CUDA_CONCURRENCY``.
        On CPU a step's cost grows with every request in it, so 1.
        """
        if self.max_concurrency:
            return self.max_concurrency
        return DEFAULT_CUDA_CONCURRENCY if self.resolved_device == "cuda" else 1

    @property
    def resolved_dtype(self) -> str:
        """``dtype`` with ``auto`` resolved for the device."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device == "cuda" else "float32"

    @model_validator(mode="after")
    def _int8_on_cpu_only(self):
        if self.dtype == "int8" and self.device == "cuda":
            raise ValueError("CHATTERBOX_DTYPE=int8 is for CPU; use bfloat16 on CUDA")
        return self

    @property
    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved (imports torch on first use)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Read settings from ``environ`` (default ``os.environ``); one-line ``ConfigError`` if malformed."""
    environ = os.environ if environ is None else environ
    raw = {}
    for name, variable in ENVIRONMENT.items():
        value = environ.get(variable)
        if value is not None and value.strip() != "":
            raw[name] = value.strip()
    try:
        return Settings(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across settings: its message names them
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from None
        name = str(first["loc"][0])
        variable = ENVIRONMENT.get(name, name)
        shown = raw.get(name, "")
        if "secret" in name or "access_key" in name:
            shown = "***"
        raise ConfigError(f"{variable}={shown!r} is not valid: {first['msg']}") from None
