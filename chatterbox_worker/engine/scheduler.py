"""One thread runs T3's decode steps for every job: concurrent jobs share each step.

The ``Scheduler`` owns a ``BatchDecoder`` on one daemon thread, started by the
first ``submit`` and kept for the life of the process (it outlives any job).
``submit`` hands over a ``DecodeRequest`` and returns a ``TokenStream``: an
iterator over that request's speech tokens, fed by the thread through a queue
of the request's own.

- The thread sleeps on a condition while nothing runs (no busy loop); a
  request that arrives alone wakes it and starts at once.
- New requests and cancellations are taken in between steps, never during
  one: the ``BatchDecoder`` is touched by this thread only.
- Closing a ``TokenStream`` cancels its request: it leaves
  the decoder before the next step, and its KV cache goes with it. ``close``
  does not wait for that; at most the step in progress still runs it. (The
  thread holds every running stream, so a stream dropped without ``close``
  runs to its end: callers close, as ``Engine`` does in a ``finally``.)
- A step that raises fails every request that was in it (the decoder's state
  for them is no longer trusted): each of their streams raises
  ``DecodeFailed`` from the original error. The thread carries on with
  whatever comes next.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Dict, List, Optional

from ..errors import InternalError
from .batch_decode import BatchDecoder, DecodeRequest
from .fast_decode import OutOfMemory

log = logging.getLogger(__name__)

_END = object()


class DecodeFailed(InternalError):
    """A T3 decode step failed for this request (the cause is chained)."""

    def __init__(self, cause: BaseException):
        if isinstance(cause, OutOfMemory):
            message = ("the GPU ran out of memory while this job decoded beside others; "
                       "retry it, and if this recurs lower MAX_CONCURRENCY")
        else:
            message = "T3 decode step failed; the worker logged the details under this job id"
        super().__init__(message)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class TokenStream:
    """The speech tokens of one submitted request, as the scheduler makes them.

    Iterate it for ``int`` tokens; it ends at the stop token or the budget.
    ``close()`` cancels the request (idempotent).
    """

    def __init__(self, scheduler: "Scheduler", request: DecodeRequest):
        self._scheduler = scheduler
        self.request = request
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._finished = False  # the scheduler is done with this request (end, failure or close)

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> int:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise DecodeFailed(item.exc) from item.exc
        return item

    def unread(self) -> int:
        """Tokens the scheduler has decoded for this request that were not read yet (about)."""
        return self._queue.qsize()

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._scheduler._cancel(self)

    # Called from the scheduler thread.
    def _put(self, item) -> None:
        self._queue.put(item)


class Scheduler:
    """Continuous batching of T3 decode steps across threads (see the module docstring)."""

    def __init__(self, t3, *, name: str = "t3-decode",
                 decoder: Optional[Callable[[], object]] = None):
        """``decoder`` makes the decoder the thread drives (``BatchDecoder`` or
        ``FastDecoder``); by default ``BatchDecoder(t3)``."""
        self._make_decoder = decoder or (lambda: BatchDecoder(t3))
        self._name = name
        self._cond = threading.Condition()
        self._incoming: List[TokenStream] = []
        self._cancelled: List[TokenStream] = []
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decode steps run so far (for tests and logs)
        self.max_batch = 0  # most requests seen in one step
        self._running = 0  # requests in the decoder, as of the thread's last look

    @property
    def active(self) -> int:
        """Requests submitted and not yet finished, failed or removed after a cancel."""
        with self._cond:
            return self._running + len(self._incoming) + len(self._cancelled)

    def submit(self, request: DecodeRequest) -> TokenStream:
        """Queue ``request``; it joins the next step. Returns its token iterator."""
        stream = TokenStream(self, request)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._incoming.append(stream)
            self._cond.notify()
        return stream

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def _cancel(self, stream: TokenStream) -> None:
        with self._cond:
            if stream in self._incoming:  # never reached the decoder
                self._incoming.remove(stream)
                return
            self._cancelled.append(stream)
            self._cond.notify()

    def _run(self) -> None:
        decoder = self._make_decoder()
        streams: Dict[DecodeRequest, TokenStream] = {}
        try:
            while True:
                with self._cond:
                    self._running = len(streams)
                    while not (self._incoming or self._cancelled or len(decoder)):
                        self._cond.wait()
                    incoming, self._incoming = self._incoming, []
                    cancelled, self._cancelled = self._cancelled, []
                for stream in cancelled:
                    if streams.pop(stream.request, None) is not None:
                        decoder.remove(stream.request)
                for stream in incoming:
                    decoder.add(stream.request)
                    streams[stream.request] = stream
                with self._cond:
                    self._running = len(streams)
                if not len(decoder):
                    continue
                self.max_batch = max(self.max_batch, len(decoder))
                try:
                    events = decoder.step()
                except Exception as exc:
                    log.exception("T3 decode step failed for %d request(s)", len(streams))
                    failed = list(streams.values())
                    for request in streams:
                        decoder.remove(request)
                    streams.clear()
                    with self._cond:
                        self._running = 0
                    for stream in failed:
                        stream._put(_Failure(exc))
                    continue
                finally:
                    self.steps += 1
                # Book-keeping first, then the tokens: a caller that sees its
                # end sees ``active`` without its request.
                puts = []
                for event in events:
                    stream = streams.get(event.request)
                    if stream is None:
                        continue
                    if event.error is not None:
                        log.error("%s: its decode request failed alone: %s",
                                  event.request.who, event.error,
                                  exc_info=event.error)
                        puts.append((stream, _Failure(event.error)))
                        del streams[event.request]
                        continue
                    if event.token is not None:
                        puts.append((stream, event.token))
                    if event.done:
                        puts.append((stream, _END))
                        del streams[event.request]
                with self._cond:
                    self._running = len(streams)
                for stream, item in puts:
                    stream._put(item)
        except BaseException as exc:  # the loop itself broke: nobody may wait forever
            log.exception("T3 decode scheduler stopped")
            with self._cond:
                pending = list(streams.values()) + self._incoming
                self._incoming, self._cancelled, self._running = [], [], 0
                self._thread = None  # the next submit starts a fresh one
            for stream in pending:
                stream._put(_Failure(exc))
            raise


__all__ = ["DecodeFailed", "Scheduler", "TokenStream"]
