"""The worker in production mode (RunPod's job protocol) driven by the official runpod client.

A local stand-in for RunPod's queue (tests/fake_runpod.py) serves the worker
protocol and the public endpoint routes over real HTTP; the worker is the real
``python handler.py`` with the platform's environment; the client is
``runpod.Endpoint``.
"""

import base64
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, stop_process, worker_env
from tests.fake_runpod import ENDPOINT, FakeRunPod

pytestmark = pytest.mark.e2e

LONG = " ".join(f"This is sentence number {i} of a long narration that keeps going." for i in range(8))


@pytest.fixture(scope="module")
def platform(settings_env, tmp_path_factory):
    fake = FakeRunPod()
    log_path = tmp_path_factory.mktemp("prod") / "worker.log"
    log = open(log_path, "wb")
    env = worker_env(**settings_env, **fake.worker_env(),
                     STREAM_CHUNK_TOKENS="8,16")  # many chunks: cancellation lands mid-job
    process = subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    fake.log_path = log_path
    try:
        yield fake
    finally:
        stop_process(process)
        log.close()
        fake.stop()


@pytest.fixture(scope="module")
def endpoint(platform):
    import runpod

    runpod.api_key = "test-key"
    runpod.endpoint_url_base = platform.base
    return runpod.Endpoint(ENDPOINT)


def test_run_sync_health(endpoint):
    result = endpoint.run_sync({"action": "health"}, timeout=300)
    assert result[0]["status"] == "ok"


def test_streamed_chunks_arrive_while_the_job_runs(endpoint, platform):
    job = endpoint.run({"text": LONG[:200], "stream": True, "format": "pcm_s16le", "seed": 1})
    statuses, chunks, result = [], [], None
    for item in job.stream():
        if item.get("type") == "chunk":
            chunks.append(base64.b64decode(item["audio_base64"]))
            if len(chunks) == 1:
                statuses.append(job.status())
        elif item.get("type") == "result":
            result = item
    assert statuses == ["IN_PROGRESS"]  # the first chunk came before the job ended
    assert result is not None and result["chunks"] == len(chunks) > 2
    assert len(b"".join(chunks)) == round(result["duration_s"] * 24000) * 2
    state = platform.jobs[job.job_id]
    assert state.first_stream_at < state.done_at
    assert job.status() == "COMPLETED"
    assert job.output()[-1]["type"] == "result"  # return_aggregate_stream


def test_failed_job_is_failed_with_our_error_string(endpoint, platform):
    job = endpoint.run({"text": "hi", "voice_id": "nobody"})
    deadline = time.monotonic() + 120
    while job.status() not in ("COMPLETED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.status() == "FAILED"
    assert platform.jobs[job.job_id].error == "voice_not_found: Voice 'nobody' not found."


def test_cancel_stops_decoding(endpoint, platform):
    # The queue holds the job's second stream post until the worker has acted on the stop
    # signal: the stop finds the job mid-stream at a known point, whatever the speed of
    # decoding or of the stop channel (polled by the SDK with pauses of up to a second).
    platform.hold_stream_of_next_job(after=1)
    job = endpoint.run({"text": LONG, "stream": True, "seed": 2})
    assert platform.wait_until_held(job.job_id), "the worker never posted a second chunk"
    state = platform.jobs[job.job_id]
    assert next(item for item in job.stream() if "type" in item)["type"] == "chunk"
    job.cancel()
    assert platform.wait_until_stop_acted_on(job.job_id), "the worker never took the stop signal"
    line = f"job={job.job_id} "
    # Closing needs no decoding (the step had ended when the post was held), so this
    # bound only stops a wait on a job that is never closed; it is not a speed requirement.
    deadline = time.monotonic() + 30
    while line not in platform.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    log = platform.log_path.read_text(errors="replace")
    [summary] = [entry for entry in log.splitlines() if line in entry] or ["(no summary line)"]
    # The job's generator was closed (not run to its end, not left to the garbage collector)
    assert "outcome=cancelled" in summary
    # ...where the stop found it: nothing reached the queue after the cancel.
    assert state.held == 1
    assert state.stream_posts_after_cancel == 0 and len(state.stream) == 2
    assert job.status() == "CANCELLED"
    # The model is free for the next job.
    assert endpoint.run_sync({"text": "Next job.", "seed": 1}, timeout=300)[-1]["type"] == "result"


def test_long_one_shot_job_reports_progress(endpoint, platform):
    text = " ".join(f"Sentence {i} of a narration long enough to be spoken in pieces." for i in range(10))
    result = endpoint.run_sync({"text": text, "seed": 5, "format": "opus"}, timeout=600)
    assert result[-1]["type"] == "result"
    [job] = [j for j in platform.jobs.values() if j.input.get("text") == text]
    total = job.progress[-1]["pieces_total"]
    assert total >= 2
    assert job.progress == [{"pieces_done": i, "pieces_total": total} for i in range(1, total + 1)]
