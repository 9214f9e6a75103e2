"""A blocking ``AudioStream`` stepped from the event loop, and closed at once when its client goes.

Each step (decode, vocode, encode the next chunk) runs on a worker thread;
closing waits off the loop for the step in progress and then closes the
stream, which stops the synthesis and frees its place in the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Callable, Optional

from ..schemas import GenerateRequest
from ..service import AudioStream, JobSummary, Service

log = logging.getLogger("chatterbox_worker.server")
_END = object()


class LiveStream:
    def __init__(self, stream: AudioStream, executor: concurrent.futures.Executor,
                 summary: JobSummary, observe: Callable[[JobSummary], None] = lambda s: None):
        self.stream = stream
        self.summary = summary
        self._observe = observe
        self._executor = executor
        self._step: Optional[concurrent.futures.Future] = None
        self._closing = threading.Lock()
        self._closed = False
        self._started = time.perf_counter()
        self.deadline = float("inf")  # event-loop time after which the request stops

    @classmethod
    async def open(cls, service: Service, request: GenerateRequest,
                   executor: concurrent.futures.Executor, summary: JobSummary,
                   observe: Callable[[JobSummary], None] = lambda s: None) -> "LiveStream":
        """Check the request and load its voice (off the loop), ready to step."""
        loop = asyncio.get_running_loop()
        stream = await loop.run_in_executor(
            executor, lambda: service.stream(request, label=f"request={summary.job_id}"))
        return cls(stream, executor, summary, observe)

    async def next(self) -> Optional[bytes]:
        """The next encoded bytes, or ``None`` at the end of the take."""
        self._step = self._executor.submit(next, self.stream, _END)
        data = await asyncio.wrap_future(self._step)
        return None if data is _END else data

    def close(self, outcome: Optional[str] = None, then: Optional[Callable[[], None]] = None) -> None:
        """Stop the synthesis (if still running), log the request's summary line, then
        call ``then`` (off the loop), once.

        Never awaits: it is called from ``finally`` blocks of cancelled tasks."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        if outcome:
            self.summary.outcome = outcome
        step = self._step

        def close_now():
            if step is not None:
                concurrent.futures.wait([step])
            try:
                self.stream.close()
            except Exception:  # closing must not keep the slot: log it and go on
                log.exception("job=%s: closing the stream failed", self.summary.job_id)
            self.summary.audio_s = self.stream.duration_s
            self.summary.ttfa_s = self.stream.first_audio_s
            self.summary.total_s = time.perf_counter() - self._started
            log.info(self.summary.line())
            self._observe(self.summary)
            if then is not None:
                then()

        threading.Thread(target=close_now, name="stream-close", daemon=True).start()
