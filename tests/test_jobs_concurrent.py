"""Several jobs at once on one event loop (MAX_CONCURRENCY > 1): each gets what it gets alone."""

import asyncio
import time

import pytest
import torch

from chatterbox_worker.config import load_settings
from chatterbox_worker.engine.batch_decode import BatchDecoder
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.voices import VoiceStore

BUDGET = 30

JOBS = [
    {"text": "Hello there, this is the first job.", "seed": 1},
    {"text": "The second job streams its audio.", "seed": 2, "stream": True, "temperature": 1.1,
     "exaggeration": 0.8, "format": "mp3"},
    {"text": "No guidance here.", "seed": 3, "cfg_weight": 0.0, "stream": True},
]


@pytest.fixture
def runner(engine, tmp_path, monkeypatch):
    # Small takes: every piece gets at most BUDGET tokens.
    original = engine.speech_tokens

    def capped(request, piece, generator, max_tokens=None):
        return original(request, piece, generator, max_tokens or BUDGET)

    monkeypatch.setattr(engine, "speech_tokens", capped)
    settings = load_settings({"VOICES_DIR": str(tmp_path / "voices"), "MAX_CONCURRENCY": "3"})
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant="original")
    return JobRunner(settings, engine, store)


async def collect(runner, job_input, job_id):
    return [item async for item in runner.run_async({"id": job_id, "input": job_input})]


def audio_of(items):
    """What a client keeps: the chunks' audio, or the result's; timings dropped."""
    result = items[-1]
    assert result["type"] == "result", items
    chunks = [item["audio_base64"] for item in items[:-1]]
    assert all(item["type"] == "chunk" for item in items[:-1])
    return chunks, result.get("audio_base64"), result["duration_s"]


def test_three_jobs_on_one_loop_each_give_what_they_give_alone(runner, engine, monkeypatch):
    assert runner.settings.concurrency == 3 and runner._executor._max_workers == 3
    alone = [asyncio.run(collect(runner, job, f"alone-{i}")) for i, job in enumerate(JOBS)]
    # The first shared step waits (up to 10 s) for all three, so that they do share steps.
    original, sizes = BatchDecoder.step, []

    def gathered(self):
        deadline = time.monotonic() + 10
        while not sizes and engine.scheduler.active < len(JOBS) and time.monotonic() < deadline:
            time.sleep(0.001)
        sizes.append(len(self))
        return original(self)

    monkeypatch.setattr(BatchDecoder, "step", gathered)

    async def together():
        return await asyncio.gather(*(collect(runner, job, f"together-{i}")
                                      for i, job in enumerate(JOBS)))

    for a, t in zip(alone, asyncio.run(together())):
        assert audio_of(t) == audio_of(a)
    assert max(sizes) == len(JOBS)  # they did share decode steps


def test_a_job_whose_decode_step_fails_gets_an_error_and_the_next_succeeds(runner, engine,
                                                                           monkeypatch):
    job = {"text": "Hello there, this is the first job.", "seed": 1}
    expected = asyncio.run(collect(runner, job, "before"))
    thread = engine.scheduler.thread
    original = BatchDecoder.step
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated step failure")
        return original(self)

    monkeypatch.setattr(BatchDecoder, "step", failing)
    failed = asyncio.run(collect(runner, job, "failing"))
    assert len(failed) == 1 and failed[0]["error"].startswith("internal_error"), failed
    after = asyncio.run(collect(runner, job, "after"))
    assert audio_of(after) == audio_of(expected)
    assert engine.scheduler.thread is thread and thread.is_alive()


@pytest.fixture(scope="module")
def fast_engine(settings_env):
    """The tiny checkpoint with T3 in bfloat16: the fast decoder, as on a GPU."""
    from chatterbox_worker.engine import load_engine

    engine = load_engine(load_settings({**settings_env, "CHATTERBOX_DTYPE": "bfloat16",
                                        "MAX_CONCURRENCY": "3"}))
    assert engine.decoder_kind == "fast"
    return engine


def test_out_of_memory_fails_the_job_with_advice_and_the_next_job_succeeds(fast_engine, tmp_path,
                                                                          monkeypatch, caplog):
    from chatterbox_worker.engine.fast_decode import FastDecoder

    settings = load_settings({"VOICES_DIR": str(tmp_path / "voices"), "MAX_CONCURRENCY": "3"})
    store = VoiceStore(settings.voices_dir, model_signature=fast_engine.model.signature,
                       variant="original")
    runner = JobRunner(settings, fast_engine, store)
    job = {"text": "Short.", "seed": 4}
    original, calls = fast_engine.speech_tokens, []

    def capped(request, piece, generator, max_tokens=None):
        return original(request, piece, generator, max_tokens or 12)

    monkeypatch.setattr(fast_engine, "speech_tokens", capped)
    body = FastDecoder._step_body

    def no_memory(self, bucket, span):
        calls.append(bucket)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(FastDecoder, "_step_body", no_memory)
    caplog.set_level("WARNING", logger="chatterbox_worker")
    failed = asyncio.run(collect(runner, job, "oom"))
    assert calls and len(failed) == 1, failed
    assert failed[0]["error"].startswith("internal_error: the GPU ran out of memory"), failed
    assert "MAX_CONCURRENCY" in failed[0]["error"]
    # The engine's own lines name the job too (the scheduler's thread knows no job otherwise).
    engine_lines = [r.getMessage() for r in caplog.records if r.name.startswith("chatterbox_worker.engine")]
    assert any("dropping the newest (job=oom)" in m for m in engine_lines), engine_lines
    assert any(m.startswith("job=oom: its decode request failed alone") for m in engine_lines), engine_lines
    monkeypatch.setattr(FastDecoder, "_step_body", body)
    after = asyncio.run(collect(runner, job, "after"))
    assert after[-1]["type"] == "result" and after[-1]["duration_s"] > 0
    assert fast_engine.scheduler.active == 0
