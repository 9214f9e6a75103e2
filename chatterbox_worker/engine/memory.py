"""Device memory running out: what counts as out of memory, and handing cached blocks back."""

from __future__ import annotations

import torch

# A library that allocates beside torch's caching allocator reports its own
# failure as a plain RuntimeError: cuBLAS creating a handle or workspace,
# cuDNN its workspace. Splitting a batch frees memory for them as for torch.
_LIBRARY_ALLOC_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, says the device ran
    out of memory: torch's own error, a library's, or the driver's ("CUDA error: out of
    memory", e.g. instantiating a captured graph). A capture that runs out of memory ends
    with an error of its own about the broken capture, raised while handling that one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        message = str(exc)
        if isinstance(exc, RuntimeError) and (
                "out of memory" in message or any(s in message for s in _LIBRARY_ALLOC_FAILURES)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back after out of memory (CUDA only); never
    while another thread captures a graph (emptying the cache would break its capture)."""
    if device.type == "cuda":
        from .graph_capture import CAPTURE_LOCK

        with CAPTURE_LOCK:
            torch.cuda.empty_cache()
