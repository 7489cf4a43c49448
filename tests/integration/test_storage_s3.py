"""The S3 backend against a real S3 API server (moto's server mode in its own process)."""

from __future__ import annotations

import threading

import boto3
import pytest

from producer import StorageError
from tests.helpers import free_port
from worker.storage import S3Storage, open_storage

pytestmark = pytest.mark.integration


def test_round_trip_with_content_type_and_metadata(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/renders/prod", s3_endpoint_url=s3_server)
    url = storage.put("job/image-0.png", b"png bytes", "image/png", {"task-id": "job"})
    assert url == f"s3://{s3_bucket}/renders/prod/job/image-0.png"
    head = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=s3_bucket, Key="renders/prod/job/image-0.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"task-id": "job"}
    assert head["Body"].read() == b"png bytes"
    assert storage.get("job/image-0.png") == b"png bytes"


def test_no_prefix_and_missing_objects(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}", s3_endpoint_url=s3_server)
    storage.put("job/manifest.json", b"{}", "application/json")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["job/manifest.json"]
    assert storage.get("job/other.json") is None
    storage.put("job/manifest.json", b'{"v": 2}', "application/json")
    assert storage.get("job/manifest.json") == b'{"v": 2}'


def test_missing_bucket_names_the_bucket_and_the_fix(s3_server: str) -> None:
    storage = open_storage("s3://no-such-bucket-here/x", s3_endpoint_url=s3_server)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist; create it or fix"):
        storage.put("job/image-0.png", b"x", "image/png")


def test_unreachable_endpoint_is_a_storage_error(s3_server: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = S3Storage("bucket", endpoint_url=endpoint, max_attempts=2, connect_timeout=0.5)
    with pytest.raises(StorageError, match=f"cannot write s3://bucket/job/image-0.png at {endpoint}") as caught:
        storage.put("job/image-0.png", b"x", "image/png")
    assert "testing-secret" not in str(caught.value)


def test_concurrent_puts(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p", s3_endpoint_url=s3_server)
    payloads = {f"job/frames/step-{i:03d}.png": bytes([i]) * 10_000 for i in range(24)}
    names = sorted(payloads)
    threads = [
        threading.Thread(
            target=lambda part: [storage.put(n, payloads[n], "image/png") for n in part], args=(names[i::4],)
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(storage.get(name) == data for name, data in payloads.items())
