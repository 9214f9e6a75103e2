"""The vocoder's lock: waiters go by urgency, then by arrival; nobody is lost."""

import threading
import time

import pytest

from chatterbox_worker.engine.priority_lock import FIRST_AUDIO, STREAM, WHOLE, PriorityLock


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_waiters_are_served_by_priority_then_arrival():
    lock = PriorityLock()
    order = []
    threads = []
    with lock.hold(STREAM):
        # Arrive in this order, one at a time: two whole takes, a later chunk,
        # two first chunks, another later chunk.
        for name, priority in [("whole-1", WHOLE), ("whole-2", WHOLE), ("chunk-1", STREAM),
                               ("first-1", FIRST_AUDIO), ("first-2", FIRST_AUDIO),
                               ("chunk-2", STREAM)]:
            def run(name=name, priority=priority):
                with lock.hold(priority):
                    order.append(name)
            thread = threading.Thread(target=run)
            thread.start()
            threads.append(thread)
            wait_until(lambda n=len(threads): lock.waiting == n)
        assert lock.locked() and order == []
    for thread in threads:
        thread.join(10)
    assert order == ["first-1", "first-2", "chunk-1", "chunk-2", "whole-1", "whole-2"]
    assert not lock.locked() and lock.waiting == 0


def test_an_exception_inside_releases_the_lock():
    lock = PriorityLock()
    with pytest.raises(RuntimeError):
        with lock.hold(WHOLE):
            raise RuntimeError("vocoder failed")
    assert not lock.locked()
    with lock.hold(FIRST_AUDIO):
        assert lock.locked()


def test_many_threads_each_get_the_lock_alone():
    lock = PriorityLock()
    inside, most, count = [0], [0], [0]

    def work(priority):
        for _ in range(50):
            with lock.hold(priority):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                count[0] += 1
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(i % 3,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most[0] == 1 and count[0] == 400
