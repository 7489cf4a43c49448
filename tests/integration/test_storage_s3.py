"""The S3 backend against a real S3 API server (moto's server mode in its own process)."""

from __future__ import annotations

import threading
import time

import boto3
import pytest

from producer import StorageError
from producer.errors import StorageUnavailable
from tests.helpers import free_port
from worker.storage import S3Storage, open_storage

pytestmark = pytest.mark.integration


def test_round_trip_with_content_type_and_metadata(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/renders/prod", s3_endpoint_url=s3_server)
    url = storage.put("job/image-0.png", b"png bytes", "image/png", {"task-id": "job", "seed": "42"})
    assert url == f"s3://{s3_bucket}/renders/prod/job/image-0.png" == storage.url("job/image-0.png")
    assert storage.base_url == f"s3://{s3_bucket}/renders/prod"
    obj = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=s3_bucket, Key="renders/prod/job/image-0.png")
    assert obj["ContentType"] == "image/png"
    assert obj["Metadata"] == {"task-id": "job", "seed": "42"}
    assert obj["Body"].read() == b"png bytes"
    assert storage.get("job/image-0.png") == b"png bytes"


def test_no_prefix_missing_objects_and_overwrite(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}", s3_endpoint_url=s3_server)
    assert storage.base_url == f"s3://{s3_bucket}"
    storage.put("job/manifest.json", b"{}", "application/json")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["job/manifest.json"]
    assert storage.get("job/other.json") is None
    storage.put("job/manifest.json", b'{"v": 2}', "application/json")
    assert storage.get("job/manifest.json") == b'{"v": 2}'


def test_missing_bucket_names_the_bucket_and_the_fix(s3_server: str) -> None:
    storage = open_storage("s3://no-such-bucket-here/x", s3_endpoint_url=s3_server)
    fix = f"s3://no-such-bucket-here/x/job/image-0.png at {s3_server}: bucket 'no-such-bucket-here' does not exist; "
    with pytest.raises(StorageError, match=f"cannot write {fix}create it or fix RENDER_STORAGE_URL"):
        storage.put("job/image-0.png", b"x", "image/png")
    with pytest.raises(StorageError, match=f"cannot read {fix}"):
        storage.get("job/image-0.png")


def test_unreachable_endpoint_fails_fast_with_the_fix(s3_server: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = S3Storage("bucket", endpoint_url=endpoint, max_attempts=2, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.put("job/image-0.png", b"x", "image/png")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith(f"cannot write s3://bucket/job/image-0.png at {endpoint}: ")
    assert "start the server or fix RENDER_S3_ENDPOINT_URL" in message and "\n" not in message
    assert "testing-secret" not in message


def test_missing_credentials_say_how_to_give_them(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # or botocore would ask an instance metadata service
    storage = open_storage(f"s3://{s3_bucket}", s3_endpoint_url=s3_server)
    with pytest.raises(StorageError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        storage.put("job/image-0.png", b"x", "image/png")


def test_concurrent_puts(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p", s3_endpoint_url=s3_server)
    payloads = {f"job/frames/step-{i:03d}.png": bytes([i]) * 10_000 for i in range(24)}
    names = sorted(payloads)
    errors: list[BaseException] = []

    def write(part: list[str]) -> None:
        try:
            for name in part:
                storage.put(name, payloads[name], "image/png")
        except BaseException as exc:  # a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(names[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(storage.get(name) == data for name, data in payloads.items())
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket, Prefix="p/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"p/{n}" for n in names]


def test_unreachable_endpoint_is_retried_with_backoff_for_the_budget_then_fails_saying_so(s3_server: str) -> None:
    storage = S3Storage(
        "bucket", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout=0.5, retry_seconds=2
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"cannot be reached.*\(gave up after [3-9] attempts over 2\.\d s\)"):
        storage.put("job/image-0.png", b"x", "image/png")
    assert 2.0 <= time.monotonic() - started < 6


def test_a_missing_bucket_is_not_retried(s3_server: str) -> None:
    storage = open_storage("s3://no-such-bucket-either", s3_endpoint_url=s3_server, retry_seconds=30)
    started = time.monotonic()
    with pytest.raises(StorageError, match="does not exist") as caught:
        storage.get("job/manifest.json")
    assert not isinstance(caught.value, StorageUnavailable)
    assert time.monotonic() - started < 5, "waiting does not create a bucket"
