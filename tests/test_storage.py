"""S3 output against a real S3 server: uploads, presigned URLs, and every way it can fail."""

import time

import pytest
import requests

from chatterbox_worker.config import load_settings
from chatterbox_worker.errors import StorageUnavailable
from chatterbox_worker.storage import S3Storage, output_key
from tests.s3_server import SECRET_KEY, S3Server


def storage_for(server, bucket, **env):
    return S3Storage.from_settings(load_settings(server.env(bucket, **env)))


def objects(server, bucket):
    listed = server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_not_configured_means_no_storage():
    assert S3Storage.from_settings(load_settings({})) is None
    assert S3Storage.from_settings(load_settings({"BUCKET_NAME": "x"})) is None


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


def test_tampered_and_expired_urls_are_refused_by_the_server(s3_server, bucket):
    storage = storage_for(s3_server, bucket, S3_URL_TTL_S="1")
    storage.put("k.wav", b"RIFF-audio", "audio/wav")
    url = storage.presign("k.wav")
    tampered = url.replace("k.wav", "k2.wav") if "k.wav?" in url else url + "0"
    assert requests.get(tampered, timeout=10).status_code == 403
    signature = url.split("X-Amz-Signature=")[1][:64]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert requests.get(url.replace(signature, flipped), timeout=10).status_code == 403
    time.sleep(2.5)
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


def test_dead_endpoint_fails_in_seconds(s3_server, bucket):
    from tests.s3_server import _free_block

    port = _free_block(1)
    storage = S3Storage(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="a",
                        secret_access_key="b", bucket=bucket)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="cannot connect"):
        storage.put("x.wav", b"data", "audio/wav")
    assert time.monotonic() - started < 15
    assert storage.status() == "cannot connect to the S3 endpoint"


def test_server_stopped_mid_test(tmp_path):
    server = S3Server(tmp_path / "s3")
    try:
        server.client().create_bucket(Bucket="short-lived")
        storage = storage_for(server, "short-lived")
        storage.put("before.wav", b"one", "audio/wav")
        assert storage.status() == "ok"
    finally:
        server.stop()
    with pytest.raises(StorageUnavailable, match="cannot connect|did not answer"):
        storage.put("after.wav", b"two", "audio/wav")
