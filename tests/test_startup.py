"""A worker whose model cannot load stays up, tells each job why, and recovers."""

import asyncio
import shutil

from chatterbox_worker.config import load_settings
from chatterbox_worker.jobs import JobRunner, create_runner
from chatterbox_worker.startup import ModelUnavailableRunner, failure_line, start_runner
from tests.conftest import worker_env
from tests.e2e.worker_process import DevApiWorker


def broken_checkpoint(directory, tiny_checkpoint):
    directory.mkdir()
    for path in tiny_checkpoint.iterdir():
        if path.name != "t3_cfg.safetensors":
            shutil.copy(path, directory / path.name)
    (directory / "t3_cfg.safetensors").write_bytes(b"\x00" * 64)  # a truncated download
    return directory


async def collect(runner, job):
    return [item async for item in runner.run_async(job)]


def test_jobs_get_model_unavailable_until_a_retry_loads_the_model(tmp_path, tiny_checkpoint,
                                                                 settings_env):
    model_dir = broken_checkpoint(tmp_path / "model", tiny_checkpoint)
    settings = load_settings({**settings_env, "CHATTERBOX_MODEL_DIR": str(model_dir)})
    runner = start_runner(settings)
    assert isinstance(runner, ModelUnavailableRunner) and "t3_cfg.safetensors" in runner.failure

    now = [1000.0]
    runner = ModelUnavailableRunner(settings, lambda: create_runner(settings), runner.failure,
                                    clock=lambda: now[0])
    job = {"id": "j1", "input": {"text": "Hello.", "seed": 1}}
    [item] = asyncio.run(collect(runner, job))
    assert item["error"].startswith("model_unavailable: ") and "t3_cfg.safetensors" in item["error"]
    assert "retries the load" in item["error"]
    [item] = list(runner.run({"id": "j2", "input": {"action": "health"}}))
    assert item["error"].startswith("model_unavailable: ")

    shutil.copy(tiny_checkpoint / "t3_cfg.safetensors", model_dir / "t3_cfg.safetensors")
    now[0] += 30  # fixed, but no retry before a minute has passed
    [item] = asyncio.run(collect(runner, job))
    assert item["error"].startswith("model_unavailable: ")
    now[0] += 31
    items = asyncio.run(collect(runner, job))
    assert items[-1]["type"] == "result" and items[-1]["duration_s"] > 0
    assert isinstance(runner._runner, JobRunner)


def test_a_retry_that_fails_again_reports_the_new_reason(tmp_path, tiny_checkpoint, settings_env):
    settings = load_settings(settings_env)
    now = [0.0]
    reasons = iter([RuntimeError("disk gone")])

    def load():
        raise next(reasons)

    runner = ModelUnavailableRunner(settings, load, "first reason", clock=lambda: now[0])
    now[0] = 61
    [item] = list(runner.run({"input": {"text": "hi"}}))
    assert "RuntimeError: disk gone" in item["error"] and runner.failure == "RuntimeError: disk gone"


def test_failure_line_is_one_line():
    assert failure_line(RuntimeError("first\nsecond")) == "RuntimeError: first"


def test_failure_line_cuts_a_long_reason_with_a_visible_marker():
    line = failure_line(RuntimeError("x" * 1000))
    assert line.startswith("RuntimeError: " + "x" * 300) and line.endswith("… [700 more characters]")


def test_the_dev_api_worker_answers_model_unavailable(tmp_path, tiny_checkpoint, settings_env):
    model_dir = broken_checkpoint(tmp_path / "model", tiny_checkpoint)
    env = worker_env(**{**settings_env, "CHATTERBOX_MODEL_DIR": str(model_dir)})
    process = DevApiWorker(env, tmp_path / "worker.log")
    try:
        process.wait_ready()
        result = process.post("/runsync", {"input": {"text": "Hello."}})
        [item] = result["output"]
        assert item["error"].startswith("model_unavailable: ") and "t3_cfg.safetensors" in item["error"]
    finally:
        process.stop()
