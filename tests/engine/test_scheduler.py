"""Concurrent synthesis through the decode scheduler: each job gets exactly what it gets alone.

Jobs run from several threads share T3's decode steps on the scheduler's
thread; their takes are compared bit for bit with the same job run alone.
The ``gathered`` fixture holds the first decode step until every job has
been submitted, so the jobs really do share steps (``max_batch``) instead of
happening to run one after another.
"""

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from chatterbox_worker.engine import SamplingParams, StreamSchedule, SynthesisRequest
from chatterbox_worker.engine.batch_decode import BatchDecoder
from chatterbox_worker.engine.scheduler import DecodeFailed
from chatterbox_worker.engine.synthesis import Engine
from chatterbox_worker.engine.text import split_text
from chatterbox_worker.tiny_model import synthetic_reference

BUDGET = 30  # tokens per piece: small, the tiny model rarely stops on its own
SCHEDULE = StreamSchedule(chunk_tokens=(4, 8))


@dataclass(frozen=True)
class Job:
    text: str
    voice: str
    seed: int
    exaggeration: float = 0.5
    sampling: SamplingParams = field(default_factory=SamplingParams)


JOBS = [
    Job("Hello there, this is the first job.", "builtin", seed=1),
    Job("A second voice with other settings.", "clip", seed=2, exaggeration=0.8,
        sampling=SamplingParams(temperature=1.1, cfg_weight=0.7, top_p=0.8, min_p=0.1,
                                repetition_penalty=1.5)),
    Job("No guidance here.", "builtin", seed=3, sampling=SamplingParams(cfg_weight=0.0)),
]


@pytest.fixture(scope="module")
def plain(engine):
    """An engine of its own (own scheduler) without the watermark."""
    return Engine(engine.model, watermark=False)


@pytest.fixture(scope="module")
def voices(plain):
    return {"builtin": plain.builtin_voice,
            "clip": plain.voice_from_clips([synthetic_reference(seconds=7, seed=5)])}


def request(voices, job: Job) -> SynthesisRequest:
    return SynthesisRequest(text=job.text, voice=voices[job.voice], seed=job.seed,
                            exaggeration=job.exaggeration, sampling=job.sampling)


@pytest.fixture
def gathered(plain, monkeypatch):
    """``gathered(n)``: the scheduler's next step waits (up to 10 s) until n requests are in."""
    original = BatchDecoder.step
    want = {"n": 0}

    def step(self):
        deadline = time.monotonic() + 10
        while want["n"] and plain.scheduler.active < want["n"] and time.monotonic() < deadline:
            time.sleep(0.001)
        want["n"] = 0
        return original(self)

    monkeypatch.setattr(BatchDecoder, "step", step)

    def gather(n):
        want["n"] = n
    return gather


def in_threads(fn, args):
    results, errors = [None] * len(args), []

    def work(i):
        try:
            results[i] = fn(*args[i])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def one_shot(engine, voices, job):
    return engine.synthesize(request(voices, job), max_tokens=BUDGET).audio


def streamed(engine, voices, job, stop_after=None):
    chunks = []
    stream = engine.stream(request(voices, job), schedule=SCHEDULE, max_tokens=BUDGET)
    try:
        for chunk in stream:
            chunks.append(chunk)
            if stop_after is not None and len(chunks) >= stop_after:
                break
    finally:
        stream.close()
    return np.concatenate(chunks)


def test_concurrent_one_shot_jobs_give_each_what_it_gives_alone(plain, voices, gathered):
    alone = [one_shot(plain, voices, job) for job in JOBS]
    before = plain.scheduler.steps
    gathered(len(JOBS))
    together = in_threads(one_shot, [(plain, voices, job) for job in JOBS])
    assert plain.scheduler.max_batch == len(JOBS)
    for a, t in zip(alone, together):
        assert a.size and np.array_equal(a, t)
    # Shared steps: fewer than the jobs' steps one after another.
    assert plain.scheduler.steps - before < len(JOBS) * (BUDGET + 1)


def test_concurrent_streams_give_each_what_it_gives_alone(plain, voices, gathered):
    alone = [streamed(plain, voices, job) for job in JOBS]
    gathered(len(JOBS))
    together = in_threads(streamed, [(plain, voices, job) for job in JOBS])
    for a, t in zip(alone, together):
        assert a.size and np.array_equal(a, t)


def test_closing_one_stream_midway_leaves_the_others_unchanged(plain, voices, gathered):
    alone = [streamed(plain, voices, job) for job in JOBS]
    gathered(len(JOBS))
    together = in_threads(streamed, [(plain, voices, JOBS[0], 2), (plain, voices, JOBS[1]),
                                     (plain, voices, JOBS[2])])
    assert np.array_equal(together[1], alone[1]) and np.array_equal(together[2], alone[2])
    assert 0 < len(together[0]) < len(alone[0])
    assert np.array_equal(together[0], alone[0][:len(together[0])])
    deadline = time.monotonic() + 5  # the closed request leaves between steps
    while plain.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plain.scheduler.active == 0


@pytest.fixture
def step_sizes(monkeypatch):
    """How many requests each step of any scheduler ran."""
    sizes = []
    original = BatchDecoder.step

    def step(self):
        sizes.append(len(self))
        return original(self)

    monkeypatch.setattr(BatchDecoder, "step", step)
    return sizes


def test_pieces_of_one_take_go_in_one_after_another(plain, voices, step_sizes):
    text = " ".join(["This sentence is long enough to be its own piece of the take."] * 7)
    assert len(split_text(text)) >= 2
    job = Job(text, "builtin", seed=9)
    a = one_shot(plain, voices, job)
    b = in_threads(one_shot, [(plain, voices, job)])[0]
    assert np.array_equal(a, b)
    assert step_sizes and max(step_sizes) == 1  # never two pieces of one take at once


def test_a_failed_step_fails_its_jobs_and_the_scheduler_serves_the_next(plain, voices, monkeypatch):
    expected = one_shot(plain, voices, JOBS[0])
    thread = plain.scheduler.thread
    original = BatchDecoder.step
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated step failure")
        return original(self)

    monkeypatch.setattr(BatchDecoder, "step", failing)
    with pytest.raises(DecodeFailed) as info:
        one_shot(plain, voices, JOBS[0])
    assert "simulated" in str(info.value.__cause__)
    assert plain.scheduler.active == 0
    assert np.array_equal(one_shot(plain, voices, JOBS[0]), expected)
    assert plain.scheduler.thread is thread and thread.is_alive()


def test_the_scheduler_sleeps_when_idle(plain, voices):
    one_shot(plain, voices, JOBS[2])
    steps = plain.scheduler.steps
    time.sleep(0.2)
    assert plain.scheduler.steps == steps and plain.scheduler.active == 0
    assert plain.scheduler.thread.is_alive() and plain.scheduler.thread.daemon


def test_timing_of_three_concurrent_streams_against_three_in_sequence(plain, voices, capsys):
    """Informational only: no assertion on the times."""
    streamed(plain, voices, JOBS[0])  # warm
    started = time.perf_counter()
    for job in JOBS:
        streamed(plain, voices, job)
    sequence = time.perf_counter() - started
    started = time.perf_counter()
    in_threads(streamed, [(plain, voices, job) for job in JOBS])
    concurrent = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n3 streamed jobs of {BUDGET} tokens on the tiny model: in sequence {sequence:.2f}s, "
              f"concurrent {concurrent:.2f}s")


def test_the_fast_decoder_survives_a_cancel_after_its_cache_grew(plain, voices, monkeypatch):
    """The scheduler thread cancels outside the decode step; with the fast decoder (CPU int8,
    any CUDA worker) the cache it grew inside a step is an inference tensor. Cancelling a job
    in the first slot moves the other's K/V: the other goes on with its own tokens, and the
    thread serves the next request."""
    import torch

    from chatterbox_worker.engine.batch_decode import DecodeRequest
    from chatterbox_worker.engine.decode import text_tokens_for
    from chatterbox_worker.engine.fast_decode import FastDecoder
    from chatterbox_worker.engine.scheduler import Scheduler

    monkeypatch.setattr(FastDecoder, "_stops", lambda self, slot, token, stop: False)  # full budgets
    model = plain.model

    def decode_request(job: Job, budget: int) -> DecodeRequest:
        t3_cond, _ = voices[job.voice].for_request(job.exaggeration)
        return DecodeRequest(t3_cond=t3_cond, text_tokens=text_tokens_for(model, job.text),
                             params=job.sampling, max_new_tokens=budget,
                             generator=torch.Generator().manual_seed(job.seed))

    alone = list(Scheduler(model.t3, decoder=lambda: FastDecoder(model.t3, slots=2, max_len=1024))
                 .submit(decode_request(JOBS[1], 400)))
    decoders = []

    def make():
        decoders.append(FastDecoder(model.t3, slots=2, max_len=1024))
        return decoders[-1]

    scheduler = Scheduler(model.t3, decoder=make)
    first = scheduler.submit(decode_request(JOBS[0], 400))
    second = scheduler.submit(decode_request(JOBS[1], 400))
    got = [next(second) for _ in range(3)]
    next(first)
    first.close()  # cancelled while both decode: the scheduler removes it between steps
    got += list(second)
    assert decoders[0].capacity > 256  # the cache grew for these budgets
    assert got == alone and len(got) == 400
    assert list(scheduler.submit(decode_request(JOBS[2], 5))) and scheduler.thread.is_alive()
