"""A mutex that serves its waiters by priority, then in order of arrival.

The vocoder runs one call at a time per worker. With a plain lock, the
thread that happens to wake first goes next; under load a job waiting for
its first audio could sit behind other jobs' later chunks and whole takes.
Here the caller says how urgent its call is (``FIRST_AUDIO`` before
``STREAM`` before ``WHOLE``), so every streamed job's first chunk goes ahead,
and within one class nobody is overtaken.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
from typing import Callable, Iterator, List, Tuple

FIRST_AUDIO = 0  # a streamed piece's first chunk: a listener is waiting for sound
STREAM = 1  # later chunks of a stream, already playing
WHOLE = 2  # one-shot takes and building voices: nobody hears anything before the end


class PriorityLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._waiting: List[Tuple[int, int]] = []  # heap of (priority, ticket)
        self._tickets = itertools.count()

    def locked(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @contextlib.contextmanager
    def hold(self, priority: int = STREAM) -> Iterator[None]:
        with self.hold_unless(priority, lambda: False):
            yield

    @contextlib.contextmanager
    def hold_unless(self, priority: int, done: Callable[[], bool]) -> Iterator[bool]:
        """Hold the lock (yields True), or give up waiting once ``done()`` (yields False).

        ``done`` is checked whenever the lock changes hands: a caller whose
        work another holder did for it (``vocoder_batch``) leaves the queue
        instead of waiting its turn for nothing."""
        with self._cond:
            entry = (priority, next(self._tickets))
            heapq.heappush(self._waiting, entry)
            try:
                while not done() and (self._held or self._waiting[0] != entry):
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: leave the queue
                self._leave(entry)
                raise
            if done():
                self._leave(entry)
                acquired = False
            else:
                heapq.heappop(self._waiting)
                self._held = acquired = True
        try:
            yield acquired
        finally:
            if acquired:
                with self._cond:
                    self._held = False
                    self._cond.notify_all()

    def _leave(self, entry: Tuple[int, int]) -> None:
        self._waiting.remove(entry)
        heapq.heapify(self._waiting)
        self._cond.notify_all()


__all__ = ["FIRST_AUDIO", "PriorityLock", "STREAM", "WHOLE"]
