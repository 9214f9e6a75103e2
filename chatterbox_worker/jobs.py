"""A RunPod job in, the items it yields out: the RunPod adapter over ``service``.

The only module that knows the job dict: it validates the input, hands the
work to the service, and shapes what comes back into the items of
docs/API.md (base64 audio, chunk items under RunPod's 1 MB, inline or S3
results). Every failure becomes exactly one ``{"error": "<code>: <message>"}``
item; no exception escapes to the SDK.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator, Optional

from .audio import CONTENT_TYPES, EXTENSIONS, bytes_per_second
from .config import Settings
from .engine import Cancelled, Engine
from .errors import InternalError, OutputTooLarge, StorageUnavailable, WorkerError
from .schemas import (GenerateRequest, GetVoiceRequest, HealthRequest, ListVoicesRequest,
                      RebuildVoicesRequest,
                      UploadVoiceRequest, parse_request)
from .service import JobSummary, Service, create_service, timings
from .storage import OutputStorage, output_key
from .voices import VoiceStore

log = logging.getLogger("chatterbox_worker.jobs")

ProgressCallback = Callable[[dict, dict], None]
_END = object()  # end of a job's items


class JobRunner:
    """Runs RunPod jobs against one service (a warm engine and one voice store)."""

    def __init__(self, settings: Settings, engine: Engine, voices: VoiceStore, *,
                 storage: Optional[OutputStorage] = None,
                 progress: Optional[ProgressCallback] = None,
                 service: Optional[Service] = None):
        self.service = service or Service(settings, engine, voices, storage=storage)
        self.progress = progress
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="job")

    @classmethod
    def for_service(cls, service: Service, *,
                    progress: Optional[ProgressCallback] = None) -> "JobRunner":
        return cls(service.settings, service.engine, service.voices, storage=service.storage,
                   progress=progress, service=service)

    settings = property(lambda self: self.service.settings)
    engine = property(lambda self: self.service.engine)
    voices = property(lambda self: self.service.voices)
    storage = property(lambda self: self.service.storage)
    library = property(lambda self: self.service.library)
    schedule = property(lambda self: self.service.schedule)

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
                yield self.service.upload_voice(request)
            elif isinstance(request, GetVoiceRequest):
                yield self.service.get_voice(request)
            elif isinstance(request, ListVoicesRequest):
                yield self.service.list_voices()
            elif isinstance(request, RebuildVoicesRequest):
                yield self.service.rebuild_voices()
            else:
                yield self.service.delete_voice(request)
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

    def _generate(self, job: dict, request: GenerateRequest, summary: JobSummary,
                  cancel: Optional[threading.Event] = None) -> Iterator[dict]:
        self.service.check_generate(request)
        if request.output == "s3" and self.storage is None:
            raise StorageUnavailable(NO_S3)
        if request.stream:
            self._check_stream_size(request)
        else:
            self._check_inline_size(request)
        summary.voice = request.voice_id or "builtin"
        synthesis = self.service.synthesis_request(request, label=f"job={summary.job_id}")
        if request.stream:
            yield from self._stream(job, request, self.service.stream(request, synthesis=synthesis),
                                    summary)
            return
        progress = None
        if self.progress is not None:
            def progress(done: int, total: int) -> None:
                if total > 1:
                    self.progress(job, {"pieces_done": done, "pieces_total": total})
        take = self.service.synthesize(request, synthesis=synthesis, progress=progress,
                                       cancelled=cancel.is_set if cancel else None)
        summary.audio_s = take.duration_s
        summary.ttfa_s = time.perf_counter() - take.started
        audio = take.audio
        fits = len(audio) <= self.settings.inline_max_bytes
        if request.output == "s3" or (request.output == "auto" and not fits and self.storage):
            yield take.result(audio_url=self._upload(job, request.format, audio))
        elif fits:
            yield take.result(audio_base64=base64.b64encode(audio).decode("ascii"))
        else:
            raise OutputTooLarge(
                f"the audio is {len(audio)} bytes, above INLINE_MAX_BYTES "
                f"({self.settings.inline_max_bytes}); use format 'opus' or 'mp3', shorter text, "
                f"or output 's3'" + ("" if self.storage else " with S3 configured"))

    def _check_inline_size(self, request: GenerateRequest) -> None:
        """Refuse, before any synthesis, a one-shot job whose audio can only end up too large."""
        if request.output == "s3" or (request.output == "auto" and self.storage is not None):
            return  # the bucket takes any size
        estimate = estimated_audio_bytes(request.text, request.format, request.sample_rate,
                                         request.language)
        limit = self.settings.inline_max_bytes
        if estimate > limit:
            raise OutputTooLarge(
                f"about {estimate} bytes of {request.format} expected, above INLINE_MAX_BYTES "
                f"({limit}); use format 'opus' or 'mp3', shorter text, or output 's3'"
                + ("" if self.storage else " with S3 configured"))

    def _check_stream_size(self, request: GenerateRequest) -> None:
        """Refuse, before any synthesis, a streamed job whose items can only outgrow the aggregate."""
        estimate = estimated_stream_bytes(request.text, request.format, request.sample_rate,
                                          request.language)
        limit = self.settings.aggregate_max_bytes
        if estimate > limit:
            raise OutputTooLarge(
                f"about {estimate} bytes of streamed {request.format} expected, above "
                f"AGGREGATE_MAX_BYTES ({limit}); use format 'opus' or 'mp3', or shorter text")

    def _upload(self, job: dict, fmt: str, audio: bytes) -> str:
        """Put the whole take in the bucket; its presigned GET URL."""
        key = output_key(self.settings.s3_key_prefix, str(job.get("id", "job")), EXTENSIONS[fmt])
        self.storage.put(key, audio, CONTENT_TYPES[fmt])
        return self.storage.presign(key)

    def _stream(self, job: dict, request: GenerateRequest, stream, summary: JobSummary
                ) -> Iterator[dict]:
        """Chunk items as audio is made, then the result item (docs/API.md, stream: true)."""
        limit = self.settings.aggregate_max_bytes
        sent = index = 0
        # output 's3': the whole file also goes to the bucket once the take is done.
        whole = bytearray() if request.output == "s3" else None
        with contextlib.closing(stream):
            for data in stream:
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
                            f"{stream.duration_s:.1f} s; use format 'opus' or 'mp3', "
                            f"or shorter text")
                    index += 1
                    yield item
        summary.audio_s, summary.ttfa_s = stream.duration_s, stream.first_audio_s
        extra = {"chunks": index}
        if whole is not None:
            extra["audio_url"] = self._upload(job, request.format, bytes(whole))
        yield stream.result(**extra)

    # -- health -------------------------------------------------------------

    def health(self) -> dict:
        return self.service.health()


NO_S3 = ("output 's3' needs S3 storage, which this worker does not have configured (set "
         "BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME)")

# Raw audio bytes per chunk item: base64 makes 4/3 of it, well under the 1 MB
# at which RunPod silently drops a stream item.
MAX_CHUNK_BYTES = 512 * 1024
# Speaking rate assumed when estimating a streamed job's size before it starts.
ESTIMATE_CHARS_PER_SECOND = 12.0
# Where a character is a syllable or more, far fewer are spoken per second.
ESTIMATE_CHARS_PER_SECOND_BY_LANGUAGE = {"zh": 4.5, "ja": 5.0, "ko": 5.0}


def _estimated_seconds(text: str, language: str = "en") -> float:
    rate = ESTIMATE_CHARS_PER_SECOND_BY_LANGUAGE.get(language, ESTIMATE_CHARS_PER_SECOND)
    return len(text) / rate + 1.0


def estimated_audio_bytes(text: str, fmt: str, sample_rate: int, language: str = "en") -> int:
    """Expected size of the encoded audio of ``text`` (what INLINE_MAX_BYTES counts)."""
    return int(_estimated_seconds(text, language) * bytes_per_second(fmt, sample_rate))


def estimated_stream_bytes(text: str, fmt: str, sample_rate: int, language: str = "en") -> int:
    """Expected size of a streamed job's collected items (base64 audio plus item overhead)."""
    seconds = _estimated_seconds(text, language)
    return int(estimated_audio_bytes(text, fmt, sample_rate, language) * 4 / 3
               + 200 * (seconds + 4))


def split_bytes(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


__all__ = ["JobRunner", "JobSummary", "create_runner", "timings"]


def create_runner(settings: Settings, *, progress: Optional[ProgressCallback] = None) -> JobRunner:
    """Load and warm the engine, open the voice store: everything a worker needs before its first job."""
    return JobRunner.for_service(create_service(settings), progress=progress)
