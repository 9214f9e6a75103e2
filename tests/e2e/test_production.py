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
    job = endpoint.run({"text": LONG, "stream": True, "seed": 2})
    for item in job.stream():
        if item.get("type") == "chunk":
            break
    job.cancel()
    state = platform.jobs[job.job_id]
    cancelled_at = time.monotonic()
    line = f"job={job.job_id} "
    while line not in platform.log_path.read_text(errors="replace") \
            and time.monotonic() < cancelled_at + 120:
        time.sleep(0.2)
    log = platform.log_path.read_text(errors="replace")
    [summary] = [entry for entry in log.splitlines() if line in entry]
    assert "outcome=cancelled" in summary
    # The job's generator is closed as soon as the step in progress ends:
    # well within the time of one chunk, not when the garbage collector runs.
    assert time.monotonic() - cancelled_at < 30
    # Decoding stopped within a chunk: at most one more item reached the queue.
    assert state.stream_posts_after_cancel <= 1
    assert endpoint.run_sync({"action": "health"}, timeout=300)[0]["status"] == "ok"


def test_long_one_shot_job_reports_progress(endpoint, platform):
    text = " ".join(f"Sentence {i} of a narration long enough to be spoken in pieces." for i in range(10))
    result = endpoint.run_sync({"text": text, "seed": 5, "format": "opus"}, timeout=600)
    assert result[-1]["type"] == "result"
    [job] = [j for j in platform.jobs.values() if j.input.get("text") == text]
    total = job.progress[-1]["pieces_total"]
    assert total >= 2
    assert job.progress == [{"pieces_done": i, "pieces_total": total} for i in range(1, total + 1)]
