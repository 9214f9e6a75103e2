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
  context manager does not restore it when ending the capture raises).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import torch

CAPTURE_LOCK = threading.RLock()
_warm_up_stream: Optional["torch.cuda.Stream"] = None


def capture(run: Callable[[], object], pool) -> Tuple["torch.cuda.CUDAGraph", object]:
    """(graph, what ``run`` returned while captured): ``run`` once eagerly on a side stream
    (lazy initialisation, library workspaces), then captured into a new graph in ``pool``."""
    global _warm_up_stream
    with CAPTURE_LOCK:
        previous = torch.cuda.current_stream()
        try:
            if _warm_up_stream is None:
                _warm_up_stream = torch.cuda.Stream()
            stream = _warm_up_stream
            stream.wait_stream(previous)
            with torch.cuda.stream(stream):
                run()
            previous.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                output = run()
            return graph, output
        finally:
            torch.cuda.set_stream(previous)


def synchronize() -> None:
    """``torch.cuda.synchronize``, never while another thread captures."""
    with CAPTURE_LOCK:
        torch.cuda.synchronize()
