"""Starting the RunPod worker, and what it does when the model cannot load.

A worker that exits when its model cannot load leaves an API user's jobs
waiting in the queue with no word of why (RunPod restarts it, and it exits
again). Instead the worker stays up and answers every job with one item,
``model_unavailable: <the one line that says why>``, so the cause shows in
the job's output; it tries the load again at most once a minute, on a job's
arrival, and serves normally once the load succeeds (weights copied onto the
volume later, say). Malformed settings still stop the worker at start-up
(``config.load_settings``), and so does the local ``python handler.py`` run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator, Optional

from .config import Settings
from .errors import ConfigError, ModelUnavailable, reason

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 60.0


def failure_line(exc: BaseException) -> str:
    """The one line an operator and an API user read about a failed start."""
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {reason(exc, 300)}"  # the third party's text is cut, with a marker


class ModelUnavailableRunner:
    """Stands in for ``JobRunner`` while the model cannot be loaded (see the module docstring)."""

    def __init__(self, settings: Settings, load: Callable[[], object], failure: str, *,
                 retry_interval_s: float = RETRY_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._load = load
        self.failure = failure
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._last_try = clock()
        self._runner = None
        self._lock = threading.Lock()

    def _current(self):
        """The real runner once a load has succeeded, else None (retrying when due)."""
        with self._lock:
            if self._runner is None and self._clock() - self._last_try >= self._retry_interval_s:
                self._last_try = self._clock()
                log.info("retrying the model load")
                try:
                    self._runner = self._load()
                    log.info("model loaded on retry: serving jobs")
                except Exception as exc:
                    self.failure = failure_line(exc)
                    log.error("model still unavailable: %s", self.failure)
            return self._runner

    def _error(self) -> dict:
        return ModelUnavailable(f"{self.failure} (the worker retries the load at most once a "
                                f"minute; fix the weights or settings and send the job again)").as_item()

    def run(self, job: dict, cancel: Optional[threading.Event] = None) -> Iterator[dict]:
        runner = self._current()
        if runner is not None:
            yield from runner.run(job, cancel)
            return
        yield self._error()

    async def run_async(self, job: dict) -> AsyncIterator[dict]:
        runner = await asyncio.to_thread(self._current)
        if runner is not None:
            async for item in runner.run_async(job):
                yield item
            return
        yield self._error()


def start_runner(settings: Settings, *, progress=None, stay_up: bool = True):
    """The job runner: ``JobRunner`` with the model loaded, or, when the load fails and
    ``stay_up``, a ``ModelUnavailableRunner`` (the failure is logged in one line)."""
    from .jobs import create_runner

    def load():
        return create_runner(settings, progress=progress)

    try:
        return load()
    except Exception as exc:
        if not stay_up:
            raise
        line = failure_line(exc)
        log.error("model unavailable: %s; answering jobs with model_unavailable", line)
        return ModelUnavailableRunner(settings, load, line)


__all__ = ["ModelUnavailableRunner", "RETRY_INTERVAL_S", "failure_line", "start_runner"]
