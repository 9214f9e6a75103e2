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


def test_out_of_memory_behind_another_error_counts():
    """A capture that runs out of memory ends with the capture's own error, raised while
    handling the shortage: the shortage is what the caller must act on."""
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as exc:
        ended = exc
    assert is_out_of_memory(ended)
    caused = RuntimeError("the vocoder call failed")
    caused.__cause__ = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED")
    assert is_out_of_memory(caused)
    assert not is_out_of_memory(RuntimeError("capture failed"))


def test_emptying_the_cache_waits_for_a_capture_in_another_thread():
    """``torch.cuda.graph`` breaks another thread's capture when it empties the cache."""
    import threading
    import time

    from chatterbox_worker.engine.graph_capture import CAPTURE_LOCK

    released = []
    with CAPTURE_LOCK:
        worker = threading.Thread(target=lambda: (release_cached_memory(torch.device("cuda")),
                                                  released.append(time.monotonic())))
        worker.start()
        time.sleep(0.2)
        assert not released  # still waiting for the capture
        until = time.monotonic()
    worker.join(5)
    assert released and released[0] >= until
