"""S3 output against a real S3 server: uploads, presigned URLs, and every way it can fail.

An endpoint that is down or silent (real TCP listeners on 127.0.0.1, tests/silent_endpoint.py)
must cost a job seconds, never minutes, and must never hold up start-up or ``health``.
Time bounds are generous (the machine is shared): they catch waits of minutes, not jitter.
"""

import logging
import time

import pytest
import requests

from chatterbox_worker.config import load_settings
from chatterbox_worker.errors import StorageUnavailable
from chatterbox_worker.storage import S3Storage, output_key
from tests.s3_server import SECRET_KEY, S3Server, _free_block
from tests.silent_endpoint import SilentEndpoint


def storage_for(server, bucket, **env):
    return S3Storage.from_settings(load_settings(server.env(bucket, **env)))


def objects(server, bucket):
    listed = server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_not_configured_means_no_storage():
    assert S3Storage.from_settings(load_settings({})) is None
    assert S3Storage.from_settings(load_settings({"BUCKET_NAME": "x"})) is None


def test_timeout_setting():
    from chatterbox_worker.errors import ConfigError

    assert load_settings({}).s3_timeout_s == 5.0
    assert load_settings({"S3_TIMEOUT_S": "2.5"}).s3_timeout_s == 2.5
    for bad in ("0", "-1", "soon", "301"):  # 0 would mean no wait at all, not "no limit"
        with pytest.raises(ConfigError, match="S3_TIMEOUT_S"):
            load_settings({"S3_TIMEOUT_S": bad})


def test_keys_are_prefix_date_job():
    from datetime import datetime, timezone

    when = datetime(2026, 11, 26, tzinfo=timezone.utc)
    assert output_key("chatterbox", "job-1", "mp3", when) == "chatterbox/2026-11-26/job-1.mp3"
    assert output_key("/p/", "a/../b c", "wav", when) == "p/2026-11-26/a_.._b_c.wav"


def test_upload_and_presigned_url_return_exactly_the_bytes(s3_server, bucket):
    storage = storage_for(s3_server, bucket)
    data = bytes(range(256)) * 4000
    storage.put("out/a.mp3", data, "audio/mpeg")
    response = requests.get(storage.presign("out/a.mp3"), timeout=10)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert storage.status() == "ok"


def test_large_upload_goes_up_in_parts(s3_server, bucket):
    storage = storage_for(s3_server, bucket)
    data = bytes(range(251)) * 80_000  # ~20 MB: above the multipart threshold
    storage.put("big.wav", data, "audio/wav")
    assert requests.get(storage.presign("big.wav"), timeout=30).content == data


def test_presigned_url_returns_the_stored_bytes_and_only_for_its_own_key(s3_server, bucket):
    storage = storage_for(s3_server, bucket)
    data, other = b"RIFF-audio-" + bytes(range(256)), b"RIFF-other-object"
    storage.put("k.wav", data, "audio/wav")
    storage.put("k2.wav", other, "audio/wav")
    # The objects really are there, byte for byte (read back with the server's own client).
    assert sorted(objects(s3_server, bucket)) == ["k.wav", "k2.wav"]
    stored = s3_server.client().get_object(Bucket=bucket, Key="k.wav")["Body"].read()
    assert stored == data
    url = storage.presign("k.wav")
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == data
    # Pointed at another object that exists, the signature no longer matches: 403, not
    # 404, and never the other object's bytes.
    assert "/k.wav?" in url
    tampered = requests.get(url.replace("/k.wav?", "/k2.wav?"), timeout=10)
    assert tampered.status_code == 403 and other not in tampered.content
    signature = url.split("X-Amz-Signature=")[1][:64]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert requests.get(url.replace(signature, flipped), timeout=10).status_code == 403
    assert requests.get(url, timeout=10).content == data  # the untouched URL still works


def test_presigned_url_is_refused_after_it_expires(s3_server, bucket):
    # X-Amz-Date has whole seconds, so a URL lives between TTL-1 and TTL seconds:
    # 5 s leaves 4 s for the first GET (loopback, milliseconds) on a busy machine.
    ttl = 5
    storage = storage_for(s3_server, bucket, S3_URL_TTL_S=str(ttl))
    storage.put("k.wav", b"RIFF-audio", "audio/wav")
    signed_at = time.monotonic()
    url = storage.presign("k.wav")
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == b"RIFF-audio"
    time.sleep(max(0.0, signed_at + ttl + 1.5 - time.monotonic()))
    assert requests.get(url, timeout=10).status_code == 403


def test_wrong_credentials_fail_clearly_and_name_no_secret(s3_server, bucket):
    storage = storage_for(s3_server, bucket, BUCKET_SECRET_ACCESS_KEY="not-the-secret-key")
    with pytest.raises(StorageUnavailable) as info:
        storage.put("x.wav", b"data", "audio/wav")
    message = info.value.message
    assert "refused" in message and "not-the-secret-key" not in message
    assert SECRET_KEY not in message
    assert objects(s3_server, bucket) == []
    assert "refused" in storage.status()


def test_missing_bucket(s3_server):
    storage = storage_for(s3_server, "no-such-bucket-here")
    with pytest.raises(StorageUnavailable, match="does not exist"):
        storage.put("x.wav", b"data", "audio/wav")
    assert storage.status() == "bucket 'no-such-bucket-here' does not exist"


def test_server_stopped_mid_test(tmp_path):
    server = S3Server(tmp_path / "s3")
    try:
        server.client().create_bucket(Bucket="short-lived")
        storage = storage_for(server, "short-lived")
        storage.put("before.wav", b"one", "audio/wav")
        assert storage.status() == "ok"
    finally:
        server.stop()
    with pytest.raises(StorageUnavailable, match="cannot connect|did not answer") as info:
        storage.put("after.wav", b"two", "audio/wav")
    # health knows at once what the failed upload found, without a check of its own.
    status, took = timed(storage.status)
    assert info.value.message == f"could not upload the audio: {status}" and took < 1


# -- endpoints that are down or silent ------------------------------------------------------

SILENT_SECRET = "silent-test-secret-value"


@pytest.fixture
def silent_endpoint():
    endpoint = SilentEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.stop()


def unreachable_env(url: str, **extra) -> dict:
    return {"BUCKET_ENDPOINT_URL": url, "BUCKET_ACCESS_KEY_ID": "key",
            "BUCKET_SECRET_ACCESS_KEY": SILENT_SECRET, "BUCKET_NAME": "outputs", **extra}


def silent(bucket: str = "outputs") -> str:
    return f"the S3 endpoint of bucket '{bucket}' did not answer in time"


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def wait_for_status(storage, expected: str, within: float = 30.0) -> list:
    """Poll ``status()`` until it says ``expected``; every call's duration, for the caller to check."""
    durations = []
    deadline = time.monotonic() + within
    while True:
        status, took = timed(storage.status)
        durations.append(took)
        if status == expected:
            return durations
        assert time.monotonic() < deadline, f"status still {status!r}"
        time.sleep(0.1)


SILENT = silent()
DEAD = "cannot connect to the S3 endpoint of bucket 'outputs'"


@pytest.mark.parametrize("drain,size", [
    (True, 1000),  # takes the whole request, never answers: the read timeout
    (False, 5_000_000),  # never even reads: a body larger than the socket buffers stalls in send
], ids=["never-answers", "never-reads"])
def test_silent_endpoint_fails_an_upload_in_seconds(drain, size):
    endpoint = SilentEndpoint(drain=drain)
    try:
        # Default settings (S3_TIMEOUT_S 5): the worker as deployed.
        storage, took = timed(lambda: S3Storage.from_settings(
            load_settings(unreachable_env(endpoint.url))))
        assert took < 5  # nothing at construction waits on the endpoint
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            storage.put("x.wav", b"\0" * size, "audio/wav")
        failed_after = time.monotonic() - started
        assert info.value.message == f"could not upload the audio: {SILENT}"
        assert SILENT_SECRET not in info.value.message
        # Measured about 6 s (one 5 s timeout, no retry); it used to be 2 minutes.
        assert failed_after < 20
        assert endpoint.connections >= 1  # it was reached: silence, not a refused connection
        status, took = timed(storage.status)
        assert status == SILENT and took < 2.5
    finally:
        endpoint.stop()


def test_status_never_waits_on_a_silent_endpoint(silent_endpoint):
    # A timeout of 60 s: any status() call that waited on the endpoint would show.
    storage, took = timed(lambda: S3Storage.from_settings(
        load_settings(unreachable_env(silent_endpoint.url, S3_TIMEOUT_S="60"))))
    assert took < 5
    for _ in range(3):
        status, took = timed(storage.status)
        # Until the first check ends, status() waits at most FIRST_STATUS_WAIT_S (1 s) for it.
        assert status == "checking" and took < 2.5
    assert silent_endpoint.connections >= 1  # the first check is under way, in the background


def test_silent_endpoint_is_reported_and_rechecked_one_probe_at_a_time(silent_endpoint, caplog):
    caplog.set_level(logging.WARNING, logger="chatterbox_worker.storage")
    # status_cache_s=0: every status() call finds the result stale and asks for a re-check.
    # Its own bucket name: other tests' storages may still log as their checks wind down.
    storage = S3Storage(endpoint_url=silent_endpoint.url, access_key_id="key",
                        secret_access_key=SILENT_SECRET, bucket="rechecked", timeout_s=1,
                        status_cache_s=0)
    expected = silent("rechecked")
    durations = wait_for_status(storage, expected)
    assert max(durations) < 2.5
    logged = f"S3 output unusable: {expected}"
    assert logged in caplog.text
    before = silent_endpoint.connections
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 3:
        status, took = timed(storage.status)
        calls += 1
        assert status == expected and took < 1  # the last known result, at once
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    # One re-check at a time, each holding on for its 1 s timeout: about one connection a
    # second, however often status() is called (here ~100 times).
    assert calls > 20
    assert silent_endpoint.connections - before <= elapsed / 1 + 2
    assert caplog.text.count(logged) == 1  # logged when it changed, not at every check


def test_dead_endpoint_fails_in_seconds():
    url = f"http://127.0.0.1:{_free_block(1)}"  # nothing listens there
    storage, took = timed(lambda: S3Storage.from_settings(load_settings(unreachable_env(url))))
    assert took < 5
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        storage.put("x.wav", b"data", "audio/wav")
    assert time.monotonic() - started < 15  # a refused connection: 3 attempts, short back-off
    assert info.value.message == f"could not upload the audio: {DEAD}"
    status, took = timed(storage.status)
    assert status == DEAD and took < 2.5


# -- the worker with a silent S3 endpoint ---------------------------------------------------

def test_a_silent_endpoint_neither_delays_start_up_nor_health(settings_env, silent_endpoint):
    from chatterbox_worker.jobs import create_runner

    # With a 60 s timeout, start-up or health waiting on the endpoint even once would show.
    settings = load_settings({**settings_env,
                              **unreachable_env(silent_endpoint.url, S3_TIMEOUT_S="60")})
    runner, took = timed(lambda: create_runner(settings))
    assert took < 40  # loading the tiny model; it used to add 148 s
    item, took = timed(lambda: list(runner.run({"id": "h", "input": {"action": "health"}}))[-1])
    assert took < 10
    assert item["status"] == "degraded" and item["storage"]["s3"] == "checking"


def test_worker_jobs_with_a_silent_endpoint(engine, tmp_path, silent_endpoint):
    from chatterbox_worker.jobs import JobRunner
    from chatterbox_worker.voices import VoiceStore

    settings = load_settings({"VOICES_DIR": str(tmp_path / "voices"),
                              **unreachable_env(silent_endpoint.url, S3_TIMEOUT_S="2")})
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant="original")
    runner = JobRunner(settings, engine, store, storage=S3Storage.from_settings(settings))

    def run(job_input, job_id="silent-1"):
        return timed(lambda: list(runner.run({"id": job_id, "input": job_input}))[-1])

    health, took = run({"action": "health"})
    assert took < 10 and health["status"] == "degraded"
    assert health["storage"]["s3"] in ("checking", SILENT)
    wait_for_status(runner.storage, SILENT)
    health, took = run({"action": "health"})
    assert took < 10
    assert health["status"] == "degraded" and health["storage"]["s3"] == SILENT
    item, took = run({"text": "Hello there.", "seed": 3, "output": "s3"})
    assert item["error"] == f"storage_unavailable: could not upload the audio: {SILENT}"
    assert took < 30  # synthesis plus one 2 s timeout
    item, took = run({"text": "Hello there.", "seed": 3})  # inline output does not need S3
    assert item["type"] == "result" and "audio_base64" in item
