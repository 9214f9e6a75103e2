"""A RunPod job in, the items it yields out.

The only module that knows the job dict: it validates the input, calls the
engine and the voice store, encodes the audio and shapes the items of
docs/API.md. Every failure becomes exactly one ``{"error": "<code>: <message>"}``
item; no exception escapes to the SDK.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import itertools
import logging
import platform
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Optional

import numpy as np


from . import __version__
from .audio import (CONTENT_TYPES, EXTENSIONS, Resampler, bytes_per_second, encode_audio,
                    new_encoder)
from .config import Settings
from .engine import Cancelled, Engine, SamplingParams, StreamSchedule, SynthesisRequest
from .errors import (InternalError, InvalidInput, OutputTooLarge, StorageUnavailable, WorkerError,
                     excerpt)
from .schemas import (GenerateRequest, GetVoiceRequest, HealthRequest, ListVoicesRequest,
                      UploadVoiceRequest, parse_request)
from .storage import OutputStorage, S3Storage, output_key
from .voice_library import VoiceLibrary
from .voices import VoiceStore

log = logging.getLogger("chatterbox_worker.jobs")

ProgressCallback = Callable[[dict, dict], None]
_END = object()  # end of a job's items


@dataclass
class JobSummary:
    """What the one log line at the end of each job says."""

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
        return " ".join(parts)


class JobRunner:
    """Runs jobs against one warm engine and one voice store."""

    def __init__(self, settings: Settings, engine: Engine, voices: VoiceStore, *,
                 storage: Optional[OutputStorage] = None,
                 progress: Optional[ProgressCallback] = None):
        self.settings = settings
        self.engine = engine
        self.voices = voices
        self.library = VoiceLibrary(engine, voices, allow_private_urls=settings.allow_private_urls)
        self.storage = storage
        self.progress = progress
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="job")
        self.schedule = StreamSchedule(
            chunk_tokens=settings.stream_chunk_tokens,
            left_context_tokens=settings.stream_left_context_tokens,
            prompt_tokens=settings.stream_prompt_tokens or None)

    def run(self, job: dict, cancel: Optional[threading.Event] = None) -> Iterator[dict]:
        """Yield the items of one job; the last one is its result or its error.

        Setting ``cancel`` stops a one-shot synthesis at its next decode step
        (a streamed one stops when this generator is closed)."""
        job_id = str(job.get("id", "-")) if isinstance(job, dict) else "-"
        summary = JobSummary(job_id)
        started = time.perf_counter()
        try:
            request = parse_request(job.get("input") if isinstance(job, dict) else None,
                                    max_text_chars=self.settings.max_text_chars)
            summary.action = request.action
            summary.voice = getattr(request, "voice_id", None) or "-"
            if isinstance(request, GenerateRequest):
                yield from self._generate(job, request, summary, cancel)
            elif isinstance(request, HealthRequest):
                yield self.health()
            elif isinstance(request, UploadVoiceRequest):
                yield self.library.upload(request)
            elif isinstance(request, GetVoiceRequest):
                yield self.library.get(request)
            elif isinstance(request, ListVoicesRequest):
                yield self.library.list()
            else:
                yield self.library.delete(request)
        except WorkerError as exc:
            summary.outcome = exc.code
            yield exc.as_item()
        except Cancelled:  # nobody reads this job's items any more
            summary.outcome = "cancelled"
        except GeneratorExit:
            summary.outcome = "cancelled"
            raise
        except Exception:  # the one place an unexpected failure becomes an item
            summary.outcome = "internal_error"
            log.exception("job=%s failed", job_id)
            yield InternalError("the job failed unexpectedly; the worker logged the details "
                                "under this job id").as_item()
        finally:
            summary.total_s = time.perf_counter() - started
            log.info(summary.line())

    async def run_async(self, job: dict) -> AsyncIterator[dict]:
        """``run`` for the SDK's event loop: each step runs in a worker thread.

        The loop stays free for RunPod's pings and stop signals while audio is
        made. When RunPod cancels the job, the job is closed at once, which
        stops decoding and releases the model, instead of when the garbage
        collector finds it: a one-shot synthesis stops at its next decode step,
        a stream after the chunk in progress. That holds wherever the
        cancellation lands: at our await (the step in progress), or in the SDK
        while it posts an item we yielded, when this generator is never resumed.
        """
        cancel = threading.Event()
        items = self.run(job, cancel)
        loop = asyncio.get_running_loop()
        step: Optional[concurrent.futures.Future] = None
        closing = threading.Lock()

        def close_job() -> None:  # idempotent; runs off the event loop
            cancel.set()
            if step is not None:
                concurrent.futures.wait([step])
            with closing:
                items.close()

        job_task = asyncio.current_task()

        def on_job_task_done(_task) -> None:
            # Reached only when the job's task ended without this generator
            # finishing: the SDK was cancelled while it held one of our items.
            loop.run_in_executor(None, close_job)

        if job_task is not None:
            job_task.add_done_callback(on_job_task_done)
        try:
            while True:
                step = self._executor.submit(next, items, _END)
                item = await asyncio.wrap_future(step, loop=loop)
                if item is _END:
                    return
                yield item
        finally:
            if job_task is not None:
                job_task.remove_done_callback(on_job_task_done)
            await loop.run_in_executor(None, close_job)

    # -- generate -----------------------------------------------------------

    def _voice(self, request: GenerateRequest):
        if request.voice_id is None:
            voice = self.engine.builtin_voice
            if voice is None:
                raise InvalidInput("this model has no built-in voice; pass a voice_id "
                                   "(see upload_voice)")
            return voice
        return self.voices.load(request.voice_id).conditionals

    def _generate(self, job: dict, request: GenerateRequest, summary: JobSummary,
                  cancel: Optional[threading.Event] = None) -> Iterator[dict]:
        if request.language != "en":
            raise InvalidInput(f"language '{excerpt(request.language, 20)}' needs the multilingual "
                               f"model; this worker serves the {self.engine.model.variant} model "
                               f"(en only)")
        if request.output == "s3" and self.storage is None:
            raise StorageUnavailable(NO_S3)
        if not request.stream:
            self._check_inline_size(request)
        summary.voice = request.voice_id or "builtin"
        voice = self._voice(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        synth_request = SynthesisRequest(
            text=request.text, voice=voice, seed=seed, exaggeration=float(request.exaggeration),
            sampling=SamplingParams(temperature=float(request.temperature),
                                    cfg_weight=float(request.cfg_weight), top_p=float(request.top_p),
                                    min_p=float(request.min_p),
                                    repetition_penalty=float(request.repetition_penalty)))
        if request.stream:
            yield from self._stream(job, request, synth_request, summary)
            return
        progress = None
        if self.progress is not None:
            def progress(done: int, total: int) -> None:
                if total > 1:
                    self.progress(job, {"pieces_done": done, "pieces_total": total})
        started = time.perf_counter()
        synthesis = self.engine.synthesize(synth_request, progress=progress,
                                           cancelled=cancel.is_set if cancel else None)
        audio = encode_audio(synthesis.audio, synthesis.sample_rate, request.format,
                             request.sample_rate)
        total_s = time.perf_counter() - started
        duration = synthesis.duration_s
        summary.audio_s, summary.ttfa_s = duration, total_s
        item = {"type": "result", "format": request.format, "sample_rate": request.sample_rate,
                "duration_s": round(duration, 3)}
        fits = len(audio) <= self.settings.inline_max_bytes
        if request.output == "s3" or (request.output == "auto" and not fits and self.storage):
            item["audio_url"] = self._upload(job, request.format, audio)
        elif fits:
            item["audio_base64"] = base64.b64encode(audio).decode("ascii")
        else:
            raise OutputTooLarge(
                f"the audio is {len(audio)} bytes, above INLINE_MAX_BYTES "
                f"({self.settings.inline_max_bytes}); use format 'opus' or 'mp3', shorter text, "
                f"or output 's3'" + ("" if self.storage else " with S3 configured"))
        total_s = time.perf_counter() - started
        item.update({"voice_id": request.voice_id, "seed": seed,
                     "timings": timings(ttfa_s=total_s, total_s=total_s, duration_s=duration)})
        yield item

    def _check_inline_size(self, request: GenerateRequest) -> None:
        """Refuse, before any synthesis, a one-shot job whose audio can only end up too large."""
        if request.output == "s3" or (request.output == "auto" and self.storage is not None):
            return  # the bucket takes any size
        estimate = estimated_audio_bytes(request.text, request.format, request.sample_rate)
        limit = self.settings.inline_max_bytes
        if estimate > limit:
            raise OutputTooLarge(
                f"about {estimate} bytes of {request.format} expected, above INLINE_MAX_BYTES "
                f"({limit}); use format 'opus' or 'mp3', shorter text, or output 's3'"
                + ("" if self.storage else " with S3 configured"))

    def _upload(self, job: dict, fmt: str, audio: bytes) -> str:
        """Put the whole take in the bucket; its presigned GET URL."""
        key = output_key(self.settings.s3_key_prefix, str(job.get("id", "job")), EXTENSIONS[fmt])
        self.storage.put(key, audio, CONTENT_TYPES[fmt])
        return self.storage.presign(key)

    def _stream(self, job: dict, request: GenerateRequest, synth_request: SynthesisRequest,
                summary: JobSummary) -> Iterator[dict]:
        """Chunk items as audio is made, then the result item (docs/API.md, stream: true)."""
        estimate = estimated_stream_bytes(request.text, request.format, request.sample_rate)
        limit = self.settings.aggregate_max_bytes
        if estimate > limit:
            raise OutputTooLarge(
                f"about {estimate} bytes of streamed {request.format} expected, above "
                f"AGGREGATE_MAX_BYTES ({limit}); use format 'opus' or 'mp3', or shorter text")
        started = time.perf_counter()
        first_chunk_s: Optional[float] = None
        resampler = Resampler(self.engine.sample_rate, request.sample_rate)
        encoder = new_encoder(request.format, request.sample_rate)
        sent = samples = index = 0
        # output 's3': the whole file also goes to the bucket once the take is done.
        whole = bytearray() if request.output == "s3" else None
        with contextlib.closing(self.engine.stream(synth_request, schedule=self.schedule)) as chunks:
            for audio in itertools.chain(chunks, [None]):
                if audio is None:  # end of take: what the resampler and encoder still hold
                    tail = resampler.process(np.zeros(0, dtype=np.float32), last=True)
                    data = encoder.encode(tail) + encoder.flush()
                    samples += len(tail)
                else:
                    resampled = resampler.process(audio)
                    samples += len(resampled)
                    data = encoder.encode(resampled)
                if whole is not None:
                    whole += data
                for part in split_bytes(data, MAX_CHUNK_BYTES):
                    item = {"type": "chunk", "index": index, "format": request.format,
                            "sample_rate": request.sample_rate,
                            "audio_base64": base64.b64encode(part).decode("ascii")}
                    sent += len(item["audio_base64"]) + 100
                    if sent > limit:
                        raise OutputTooLarge(
                            f"the streamed audio outgrew AGGREGATE_MAX_BYTES ({limit}) after "
                            f"{samples / request.sample_rate:.1f} s; use format 'opus' or 'mp3', "
                            f"or shorter text")
                    if first_chunk_s is None:
                        first_chunk_s = time.perf_counter() - started
                    index += 1
                    yield item
        duration = samples / request.sample_rate
        summary.audio_s, summary.ttfa_s = duration, first_chunk_s
        item = {"type": "result", "format": request.format, "sample_rate": request.sample_rate,
                "duration_s": round(duration, 3), "chunks": index}
        if whole is not None:
            item["audio_url"] = self._upload(job, request.format, bytes(whole))
        total_s = time.perf_counter() - started
        item.update({"voice_id": request.voice_id, "seed": synth_request.seed,
                     "timings": timings(ttfa_s=first_chunk_s or total_s, total_s=total_s,
                                        duration_s=duration)})
        yield item

    # -- health -------------------------------------------------------------

    def health(self) -> dict:
        import runpod
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
                         "torch": torch.__version__, "runpod": runpod.__version__,
                         "python": platform.python_version()},
        }


NO_S3 = ("output 's3' needs S3 storage, which this worker does not have configured (set "
         "BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME)")

# Raw audio bytes per chunk item: base64 makes 4/3 of it, well under the 1 MB
# at which RunPod silently drops a stream item.
MAX_CHUNK_BYTES = 512 * 1024
# Speaking rate assumed when estimating a streamed job's size before it starts.
ESTIMATE_CHARS_PER_SECOND = 12.0


def _estimated_seconds(text: str) -> float:
    return len(text) / ESTIMATE_CHARS_PER_SECOND + 1.0


def estimated_audio_bytes(text: str, fmt: str, sample_rate: int) -> int:
    """Expected size of the encoded audio of ``text`` (what INLINE_MAX_BYTES counts)."""
    return int(_estimated_seconds(text) * bytes_per_second(fmt, sample_rate))


def estimated_stream_bytes(text: str, fmt: str, sample_rate: int) -> int:
    """Expected size of a streamed job's collected items (base64 audio plus item overhead)."""
    seconds = _estimated_seconds(text)
    return int(estimated_audio_bytes(text, fmt, sample_rate) * 4 / 3 + 200 * (seconds + 4))


def split_bytes(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


def timings(*, ttfa_s: float, total_s: float, duration_s: float) -> dict:
    return {"ttfa_s": round(ttfa_s, 3), "total_s": round(total_s, 3),
            "rtf": round(total_s / duration_s, 3) if duration_s else None}


def _device_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


__all__ = ["JobRunner", "JobSummary", "create_runner", "timings"]


def create_runner(settings: Settings, *, progress: Optional[ProgressCallback] = None) -> JobRunner:
    """Load and warm the engine, open the voice store: everything a worker needs before its first job."""
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
    return JobRunner(settings, engine, voices, storage=storage, progress=progress)
