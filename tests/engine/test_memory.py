"""What counts as the device running out of memory (``engine.memory``)."""

import torch

from chatterbox_worker.engine.memory import is_out_of_memory, release_cached_memory


def test_torchs_and_the_libraries_allocation_failures_are_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                         "`cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))  # the driver's, e.g. a graph's


def test_other_errors_are_not():
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(ValueError("CUBLAS_STATUS_ALLOC_FAILED"))  # not a device error
    assert not is_out_of_memory(MemoryError())  # the host's memory: splitting a batch does not help


def test_releasing_on_a_cpu_does_nothing():
    release_cached_memory(torch.device("cpu"))
