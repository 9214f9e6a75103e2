"""Capturing CUDA graphs beside other threads (``engine.graph_capture``), on a CPU.

The capture itself needs CUDA (``bench/gpu/run.sh``); here torch.cuda's
stream and graph calls are replaced by recorders, to check what the helper
does around them: the order (warm-up, then capture), the lock, and the
stream it leaves the thread on when ending a capture fails.
"""

import contextlib
import threading

import pytest
import torch

from chatterbox_worker.engine import graph_capture


class FakeCuda:
    """The torch.cuda calls ``capture`` makes, recorded; ``fail`` makes ending a capture raise."""

    def __init__(self, monkeypatch, fail=False):
        # fail: an exception for ending the capture to raise, True for torch's stream error
        self.calls, self.current, self.fail = [], "default stream", fail
        monkeypatch.setattr(graph_capture, "_warm_up_stream", None)
        monkeypatch.setattr(graph_capture, "_failed", None)
        fake = self

        class Stream:
            def __init__(self):
                self.name = "side stream"

            def wait_stream(self, other):
                fake.calls.append(("wait", self.name, str(other)))

            def __str__(self):
                return self.name

        class Graph:
            pass

        @contextlib.contextmanager
        def stream(s):
            previous, fake.current = fake.current, str(s)
            yield
            fake.current = previous

        @contextlib.contextmanager
        def graph(g, pool=None, capture_error_mode=None):
            fake.calls.append(("capture", capture_error_mode, graph_capture.CAPTURE_LOCK._is_owned()))
            previous, fake.current = fake.current, "capture stream"
            yield
            if fake.fail:  # as torch: ending the capture raises before the stream is restored
                raise fake.fail if isinstance(fake.fail, BaseException) else RuntimeError(
                    "CUDA error: operation not permitted when stream is capturing")
            fake.current = previous

        class DefaultStream:
            def wait_stream(self, other):
                fake.calls.append(("wait", "default stream", str(other)))

            def __str__(self):
                return "default stream"

        monkeypatch.setattr(torch.cuda, "current_stream", lambda: DefaultStream())
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(fake, "current", str(s)))

    def run(self):
        self.calls.append(("run", self.current))
        return "output"


def test_a_capture_warms_up_on_a_side_stream_then_captures_thread_local_under_the_lock(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    graph, output = graph_capture.capture(cuda.run, pool="pool")
    assert output == "output" and graph is not None
    assert cuda.calls == [("wait", "side stream", "default stream"), ("run", "side stream"),
                          ("wait", "default stream", "side stream"),
                          ("capture", "thread_local", True), ("run", "capture stream")]
    assert cuda.current == "default stream"


def test_a_failed_capture_leaves_the_thread_on_its_stream_and_the_lock_free(monkeypatch):
    cuda = FakeCuda(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="capturing"):
        graph_capture.capture(cuda.run, pool="pool")
    assert cuda.current == "default stream"  # not the capture stream, as torch would leave it
    taken = []

    def take():
        taken.append(graph_capture.CAPTURE_LOCK.acquire(timeout=5))
        if taken[-1]:
            graph_capture.CAPTURE_LOCK.release()

    other = threading.Thread(target=take)
    other.start()
    other.join()
    assert taken == [True]


def test_a_failed_capture_is_the_last_in_the_process_unless_memory_ran_out(monkeypatch):
    """A capture that failed may leave torch's allocator counting it as underway: nothing is
    captured after it, in any component (each then runs eagerly). Out of memory leaves nothing
    behind: capturing goes on."""
    cuda = FakeCuda(monkeypatch, fail=torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    with pytest.raises(torch.OutOfMemoryError):
        graph_capture.capture(cuda.run, pool="pool")
    cuda.fail = False
    assert graph_capture.capture(cuda.run, pool="pool")[1] == "output"
    cuda.fail = True
    with pytest.raises(RuntimeError, match="capturing"):
        graph_capture.capture(cuda.run, pool="pool")
    cuda.fail, cuda.calls = False, []
    with pytest.raises(graph_capture.CaptureUnavailable, match="operation not permitted"):
        graph_capture.capture(cuda.run, pool="pool")
    assert cuda.calls == []  # not even the warm-up ran


def test_a_failing_warm_up_is_not_a_failed_capture(monkeypatch):
    cuda = FakeCuda(monkeypatch)

    def broken():
        raise ValueError("a shape the step does not take")

    with pytest.raises(ValueError):
        graph_capture.capture(broken, pool="pool")
    assert graph_capture.capture(cuda.run, pool="pool")[1] == "output"
