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
from typing import Iterator, List, Tuple

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
        with self._cond:
            entry = (priority, next(self._tickets))
            heapq.heappush(self._waiting, entry)
            try:
                while self._held or self._waiting[0] != entry:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: leave the queue
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


__all__ = ["FIRST_AUDIO", "PriorityLock", "STREAM", "WHOLE"]
