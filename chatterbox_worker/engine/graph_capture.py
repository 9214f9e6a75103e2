"""Capturing a CUDA graph while other threads keep using the device.

T3's decode steps (the scheduler's thread) and the vocoder's flow solve
(whichever job thread holds the vocoder) each capture graphs lazily, the
first time a shape needs one, while the other thread goes on working.
``torch.cuda.graph`` synchronises the whole device and empties the caching
allocator as it begins, either of which breaks a capture underway in
another thread, and every capture shares one capture stream. So:

- one capture at a time in the process (``CAPTURE_LOCK``), also held by
  anything else here that synchronises the device or empties the cache
  (``memory.release_cached_memory``);
- captures are ``thread_local``: the other thread's own synchronisations
  (reading sampled tokens, copying audio out) stay allowed meanwhile;
- a capture that fails leaves the thread on the stream it was on (torch's
  context manager does not restore it when ending the capture raises);
- a capture that fails for any reason but memory is the last in the process:
  torch's allocator can be left counting it as underway (so it stops handing
  cached memory back, for every thread) and holding a filter on the dead
  graph, which a later capture would consult. Every component then runs
  eagerly (``CaptureUnavailable``, which each treats as a failed capture).
  Out of memory is not the capture's fault and leaves nothing behind.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import torch

from .memory import is_out_of_memory

CAPTURE_LOCK = threading.RLock()
_warm_up_stream: Optional["torch.cuda.Stream"] = None
_failed: Optional[str] = None  # why an earlier capture failed (not for memory), once it has


class CaptureUnavailable(RuntimeError):
    """An earlier capture in this process failed: no more are attempted."""


def capture(run: Callable[[], object], pool) -> Tuple["torch.cuda.CUDAGraph", object]:
    """(graph, what ``run`` returned while captured): ``run`` once eagerly on a side stream
    (lazy initialisation, library workspaces), then captured into a new graph in ``pool``."""
    global _warm_up_stream, _failed
    with CAPTURE_LOCK:
        if _failed is not None:
            raise CaptureUnavailable(f"an earlier CUDA graph capture in this process failed "
                                     f"({_failed}); no more are attempted")
        previous = torch.cuda.current_stream()
        capturing = False
        try:
            if _warm_up_stream is None:
                _warm_up_stream = torch.cuda.Stream()
            stream = _warm_up_stream
            stream.wait_stream(previous)
            with torch.cuda.stream(stream):
                run()
            previous.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            capturing = True
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                output = run()
            return graph, output
        except Exception as exc:
            if capturing and not is_out_of_memory(exc):
                _failed = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise
        finally:
            torch.cuda.set_stream(previous)


def synchronize() -> None:
    """``torch.cuda.synchronize``, never while another thread captures."""
    with CAPTURE_LOCK:
        torch.cuda.synchronize()
