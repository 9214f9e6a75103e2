"""The work itself: generate (one take at once, or streamed), the voice actions, health.

Knows neither RunPod nor HTTP: ``jobs`` (the RunPod adapter) and ``server``
(the HTTP adapter) turn their requests into the validated models of
``schemas`` and shape what comes back here into job items or responses.
Errors are the ``errors`` tree; each adapter maps them once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import platform
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from . import __version__
from .audio import Resampler, encode_audio, new_encoder
from .config import Settings
from .engine import Engine, SamplingParams, StreamSchedule, SynthesisRequest
from .engine.variants import SAMPLING_FIELDS
from .errors import InvalidInput, excerpt
from .schemas import (DeleteVoiceRequest, GenerateRequest, GetVoiceRequest, UploadVoiceRequest)
from .storage import OutputStorage, S3Storage
from .voice_library import VoiceLibrary
from .voices import VoiceStore

log = logging.getLogger("chatterbox_worker.service")


@dataclass
class JobSummary:
    """What the one log line at the end of each job (or HTTP request) says."""

    job_id: str
    action: str = "?"
    voice: str = "-"
    audio_s: float = 0.0
    ttfa_s: Optional[float] = None
    total_s: float = 0.0
    outcome: str = "ok"
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        rtf = self.total_s / self.audio_s if self.audio_s else None
        parts = [f"job={self.job_id}", f"action={self.action}", f"voice={self.voice}",
                 f"audio_s={self.audio_s:.2f}",
                 f"ttfa_s={self.ttfa_s:.3f}" if self.ttfa_s is not None else "ttfa_s=-",
                 f"total_s={self.total_s:.3f}", f"rtf={rtf:.3f}" if rtf else "rtf=-",
                 f"outcome={self.outcome}"]
        parts += [f"{key}={value}" for key, value in self.extra.items()]
        return " ".join(parts)


def timings(*, ttfa_s: float, total_s: float, duration_s: float) -> dict:
    return {"ttfa_s": round(ttfa_s, 3), "total_s": round(total_s, 3),
            "rtf": round(total_s / duration_s, 3) if duration_s else None}


@dataclass
class Take:
    """A whole take, encoded: ``stream: false``."""

    audio: bytes
    format: str
    sample_rate: int
    duration_s: float
    seed: int
    voice_id: Optional[str]
    started: float  # perf_counter when synthesis began; timings are taken when the take is delivered

    def result(self, **extra) -> dict:
        """The result metadata of docs/API.md, timed up to now (delivery included)."""
        total_s = time.perf_counter() - self.started
        item = {"type": "result", "format": self.format, "sample_rate": self.sample_rate,
                "duration_s": round(self.duration_s, 3), **extra,
                "voice_id": self.voice_id, "seed": self.seed,
                "timings": timings(ttfa_s=total_s, total_s=total_s, duration_s=self.duration_s)}
        return item


class AudioStream:
    """A take's encoded audio as it is made (``stream: true``).

    Iterating gives non-empty byte strings whose concatenation is one valid
    file of the format; ``result()`` then says what was made. ``close()``
    (or leaving the iteration early) stops the synthesis at once.
    """

    def __init__(self, engine: Engine, request: GenerateRequest, synthesis: SynthesisRequest,
                 schedule: StreamSchedule, busy: Callable[[], contextlib.AbstractContextManager]):
        self.request = request
        self.seed = synthesis.seed
        self.samples = 0
        self.first_audio_s: Optional[float] = None
        self.started = time.perf_counter()
        self._chunks = engine.stream(synthesis, schedule=schedule)
        self._resampler = Resampler(engine.sample_rate, request.sample_rate)
        self._encoder = new_encoder(request.format, request.sample_rate)
        self._parts = self._encoded(busy)

    @property
    def duration_s(self) -> float:
        return self.samples / self.request.sample_rate

    def __iter__(self) -> Iterator[bytes]:
        return self._parts

    def __next__(self) -> bytes:
        return next(self._parts)

    def _encoded(self, busy) -> Iterator[bytes]:
        with busy(), contextlib.closing(self._chunks) as chunks:
            for audio in itertools.chain(chunks, [None]):
                if audio is None:  # end of take: what the resampler and encoder still hold
                    tail = self._resampler.process(np.zeros(0, dtype=np.float32), last=True)
                    data = self._encoder.encode(tail) + self._encoder.flush()
                    self.samples += len(tail)
                else:
                    resampled = self._resampler.process(audio)
                    self.samples += len(resampled)
                    data = self._encoder.encode(resampled)
                if data:
                    if self.first_audio_s is None:
                        self.first_audio_s = time.perf_counter() - self.started
                    yield data

    def close(self) -> None:
        self._parts.close()

    def result(self, **extra) -> dict:
        """The result metadata of docs/API.md (after the last bytes)."""
        total_s = time.perf_counter() - self.started
        duration = self.duration_s
        return {"type": "result", "format": self.request.format,
                "sample_rate": self.request.sample_rate, "duration_s": round(duration, 3),
                **extra, "voice_id": self.request.voice_id, "seed": self.seed,
                "timings": timings(ttfa_s=self.first_audio_s or total_s, total_s=total_s,
                                   duration_s=duration)}


class Service:
    """One warm engine, one voice store, optional output storage: what both front doors serve."""

    def __init__(self, settings: Settings, engine: Engine, voices: VoiceStore, *,
                 storage: Optional[OutputStorage] = None):
        self.settings = settings
        self.engine = engine
        self.voices = voices
        self.storage = storage
        self.library = VoiceLibrary(engine, voices, allow_private_urls=settings.allow_private_urls)
        self.schedule = StreamSchedule(
            chunk_tokens=settings.stream_chunk_tokens,
            left_context_tokens=settings.stream_left_context_tokens,
            prompt_tokens=settings.stream_prompt_tokens or None)
        self._running = 0
        self._running_lock = threading.Lock()

    # -- generate -----------------------------------------------------------

    @property
    def running(self) -> int:
        """Syntheses in progress (whole or streamed)."""
        return self._running

    @contextlib.contextmanager
    def _busy(self):
        with self._running_lock:
            self._running += 1
        try:
            yield
        finally:
            with self._running_lock:
                self._running -= 1

    def check_generate(self, request: GenerateRequest) -> None:
        """Refuse what this worker cannot serve, before anything is loaded."""
        self.sampling(request)

    def sampling(self, request: GenerateRequest) -> dict:
        """The request's language and sampling fields checked against the served model,
        its defaults filled in (``InvalidInput`` naming the field and the model)."""
        spec = self.engine.variant
        if request.language not in spec.languages:
            raise InvalidInput(f"language: '{excerpt(request.language, 20)}' is not spoken by the "
                               f"{spec.title} model this worker serves; use one of: "
                               f"{', '.join(spec.languages)}"
                               + ("" if len(spec.languages) > 1 else
                                  " (other languages need the multilingual model)"))
        self.engine.check_text(request.text)
        try:
            return spec.sampling({name: getattr(request, name) for name in SAMPLING_FIELDS})
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    def synthesis_request(self, request: GenerateRequest, *, label: str = "") -> SynthesisRequest:
        """The engine's request: the voice loaded, the seed chosen (reported back to the client).
        ``label`` names the job or HTTP request in the engine's log lines."""
        values = self.sampling(request)
        voice = self._voice(request.voice_id)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return SynthesisRequest(
            text=request.text, voice=voice, seed=seed, exaggeration=float(values["exaggeration"]),
            language=request.language, label=label,
            sampling=SamplingParams(temperature=float(values["temperature"]),
                                    cfg_weight=float(values["cfg_weight"]),
                                    top_p=float(values["top_p"]), top_k=int(values["top_k"]),
                                    min_p=float(values["min_p"]),
                                    repetition_penalty=float(values["repetition_penalty"])))

    def _voice(self, voice_id: Optional[str]):
        if voice_id is None:
            voice = self.engine.builtin_voice
            if voice is None:
                raise InvalidInput("this model has no built-in voice; pass a voice_id "
                                   "(see upload_voice)")
            return voice
        return self.voices.load(voice_id).conditionals

    def synthesize(self, request: GenerateRequest, *, synthesis: Optional[SynthesisRequest] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancelled: Optional[Callable[[], bool]] = None) -> Take:
        """The whole take, encoded. ``cancelled`` is checked before every decode step."""
        synthesis = synthesis or self.synthesis_request(request)
        started = time.perf_counter()
        with self._busy():
            made = self.engine.synthesize(synthesis, progress=progress, cancelled=cancelled)
        audio = encode_audio(made.audio, made.sample_rate, request.format, request.sample_rate)
        return Take(audio=audio, format=request.format, sample_rate=request.sample_rate,
                    duration_s=made.duration_s, seed=synthesis.seed, voice_id=request.voice_id,
                    started=started)

    def stream(self, request: GenerateRequest, *, synthesis: Optional[SynthesisRequest] = None,
               label: str = "") -> AudioStream:
        """The take's encoded audio as it is made."""
        synthesis = synthesis or self.synthesis_request(request, label=label)
        return AudioStream(self.engine, request, synthesis, self.schedule, self._busy)

    # -- voices -------------------------------------------------------------

    def upload_voice(self, request: UploadVoiceRequest) -> dict:
        return self.library.upload(request)

    def upload_voice_files(self, voice_id: str, files: Sequence[bytes], *, labels: Sequence[str],
                           overwrite: bool = False, rebuild: bool = False) -> dict:
        """A voice from raw files: one exported voice file, or reference recordings."""
        return self.library.upload_files(voice_id, list(files), labels=list(labels),
                                         overwrite=overwrite, rebuild=rebuild)

    def get_voice(self, request: GetVoiceRequest) -> dict:
        return self.library.get(request)

    def export_voice(self, voice_id: str):
        """``(file bytes, metadata)`` of a stored voice."""
        data, voice = self.voices.export(voice_id)
        return data, voice.metadata()

    def list_voices(self) -> dict:
        return self.library.list()

    def rebuild_voices(self) -> dict:
        return self.library.rebuild_all()

    def voice_ids(self) -> List[str]:
        return self.voices.voice_ids()

    def delete_voice(self, request: DeleteVoiceRequest) -> dict:
        return self.library.delete(request)

    # -- health -------------------------------------------------------------

    def health(self) -> dict:
        import torch

        voices_status = self.voices.status()
        # Never waits on the endpoint: the last known result, or "checking" (degraded) at start.
        s3_status = "not configured" if self.storage is None else self.storage.status()
        degraded = voices_status != "ok" or s3_status not in ("ok", "not configured")
        return {
            "status": "degraded" if degraded else "ok",
            "model": self.engine.model.describe(),
            "device": _device_name(self.engine.model.device),
            "voices": self.voices.count(),
            "voices_dir": str(self.voices.directory),
            "storage": {"voices": voices_status, "s3": s3_status},
            "versions": {"worker": __version__, "chatterbox": _package_version("chatterbox-tts"),
                         "torch": torch.__version__, "runpod": _package_version("runpod"),
                         "python": platform.python_version()},
        }


def _device_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def create_service(settings: Settings) -> Service:
    """Load and warm the engine, open the voice store: everything needed before the first request."""
    from .engine import load_engine

    engine = load_engine(settings)
    voices = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                        variant=engine.model.variant, device=engine.model.device)
    status = voices.status()
    if status != "ok":
        # Not fatal: generate with the built-in voice still works; health says why.
        log.warning("voice storage unusable: %s", status)
    # The bucket is checked on a background thread, which logs an unusable one
    # (storage.py): a silent S3 endpoint must not hold up start-up.
    storage = S3Storage.from_settings(settings)
    return Service(settings, engine, voices, storage=storage)


__all__ = ["AudioStream", "JobSummary", "Service", "Take", "create_service", "timings"]
