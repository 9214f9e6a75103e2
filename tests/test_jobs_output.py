"""Where a job's audio goes: inline, S3 or refused, in both stream modes, against a real S3 server."""

import base64
import io

import pytest
import requests
import soundfile

from chatterbox_worker.config import load_settings
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.storage import S3Storage
from chatterbox_worker.voices import VoiceStore
from tests.s3_server import SECRET_KEY


@pytest.fixture
def runner(engine, tmp_path, s3_server, bucket):
    def make(s3=True, **env):
        settings = load_settings({"VOICES_DIR": str(tmp_path / "voices"),
                                  **(s3_server.env(bucket) if s3 else {}), **env})
        store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                           variant="original")
        return JobRunner(settings, engine, store, storage=S3Storage.from_settings(settings))
    return make


def run(runner, job_input, job_id="job-7"):
    return list(runner.run({"id": job_id, "input": job_input}))


def fetch(url):
    response = requests.get(url, timeout=30)
    assert response.status_code == 200
    return response.content


def keys(s3_server, bucket):
    return [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


JOB = {"text": "Hello there.", "seed": 3}


def test_auto_is_inline_when_it_fits(runner, s3_server, bucket):
    [item] = run(runner(), JOB)
    assert "audio_base64" in item and "audio_url" not in item
    assert keys(s3_server, bucket) == []


def test_auto_goes_to_s3_above_the_inline_limit(runner, s3_server, bucket):
    inline = run(runner(), JOB)[0]
    [item] = run(runner(INLINE_MAX_BYTES="1000"), JOB, job_id="big-1")
    assert "audio_base64" not in item
    data = fetch(item["audio_url"])
    assert data == base64.b64decode(inline["audio_base64"])
    [key] = keys(s3_server, bucket)
    assert key.startswith("chatterbox/") and key.endswith("/big-1.wav")
    samples, rate = soundfile.read(io.BytesIO(data))
    assert rate == 24000 and len(samples) / rate == pytest.approx(item["duration_s"], abs=0.001)


def test_inline_never_uploads(runner, s3_server, bucket):
    [item] = run(runner(INLINE_MAX_BYTES="1000"), {**JOB, "output": "inline"})
    assert item["error"].startswith("output_too_large:")
    assert keys(s3_server, bucket) == []


def test_s3_without_stream(runner):
    [item] = run(runner(), {**JOB, "output": "s3", "format": "mp3"})
    assert len(fetch(item["audio_url"])) > 1000


def test_s3_with_stream_uploads_the_whole_take(runner, s3_server, bucket):
    items = run(runner(), {**JOB, "output": "s3", "stream": True, "format": "flac"})
    chunks, result = items[:-1], items[-1]
    streamed = b"".join(base64.b64decode(c["audio_base64"]) for c in chunks)
    assert fetch(result["audio_url"]) == streamed
    assert "audio_base64" not in result


def test_auto_stream_never_uploads(runner, s3_server, bucket):
    items = run(runner(INLINE_MAX_BYTES="1000"), {**JOB, "stream": True})
    assert "audio_url" not in items[-1] and items[-1]["type"] == "result"
    assert keys(s3_server, bucket) == []


def test_auto_without_s3_is_too_large(runner):
    [item] = run(runner(s3=False, INLINE_MAX_BYTES="1000"), JOB)
    assert item["error"].startswith("output_too_large:") and "S3" in item["error"]


def test_wrong_credentials_fail_the_job_leave_nothing_and_the_worker_recovers(runner, s3_server, bucket):
    bad = runner(BUCKET_SECRET_ACCESS_KEY="wrong-secret-value")
    [item] = run(bad, {**JOB, "output": "s3"})
    assert item["error"].startswith("storage_unavailable:")
    assert "wrong-secret-value" not in item["error"] and SECRET_KEY not in item["error"]
    assert keys(s3_server, bucket) == []
    health = run(bad, {"action": "health"})[0]
    assert health["status"] == "degraded" and "refused" in health["storage"]["s3"]
    assert run(bad, JOB)[0]["type"] == "result"  # inline jobs still work


def test_missing_bucket_fails_the_stream_job_at_the_end(runner, s3_server):
    items = run(runner(BUCKET_NAME="never-created-bucket"),
                {**JOB, "output": "s3", "stream": True})
    assert items[-1]["error"] == ("storage_unavailable: could not upload the audio: "
                                  "bucket 'never-created-bucket' does not exist")


def test_health_reports_s3_ok(runner):
    assert run(runner(), {"action": "health"})[0]["storage"]["s3"] == "ok"
