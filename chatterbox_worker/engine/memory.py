"""Device memory running out: what counts as out of memory, and handing cached blocks back."""

from __future__ import annotations

import torch

# A library that allocates beside torch's caching allocator reports its own
# failure as a plain RuntimeError: cuBLAS creating a handle or workspace,
# cuDNN its workspace. Splitting a batch frees memory for them as for torch.
_LIBRARY_ALLOC_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (torch's own error, or a library's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _LIBRARY_ALLOC_FAILURES)


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back after out of memory (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
