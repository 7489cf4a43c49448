"""Input images by s3:// reference, from a real S3 API server."""

from __future__ import annotations

import io
import threading

import boto3
import pytest
from PIL import Image

from producer import RenderSpec, SpecError
from producer.errors import StorageUnavailable
from tests.faults.proxy import FaultProxy
from worker.inputs import load_inputs
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def spec(image: str) -> RenderSpec:
    return RenderSpec.parse(
        {"model": "tiny-sd15", "pipeline": "img2img", "prompt": "p", "width": 64, "height": 64, "image": image}
    )


def test_an_s3_input_is_fetched_with_the_workers_endpoint(s3_server: str, s3_bucket: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "purple").save(buffer, format="PNG")
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="in/photo.png", Body=buffer.getvalue())
    settings = WorkerSettings(s3_endpoint_url=s3_server)
    loaded = load_inputs(spec(f"s3://{s3_bucket}/in/photo.png"), settings)
    assert loaded["image"].size == (64, 64) and loaded["image"].getpixel((1, 1)) == (128, 0, 128)
    with pytest.raises(SpecError, match=f"image: s3://{s3_bucket}/in/missing.png does not exist"):
        load_inputs(spec(f"s3://{s3_bucket}/in/missing.png"), settings)
    with pytest.raises(SpecError, match="image: cannot read s3://no-such-bucket-x/a.png .* does not exist"):
        load_inputs(spec("s3://no-such-bucket-x/a.png"), settings)


def test_an_s3_outage_while_reading_an_input_is_retried_like_an_upload(s3_server: str, s3_bucket: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, format="PNG")
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="in/teal.png", Body=buffer.getvalue())
    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        settings = WorkerSettings(s3_endpoint_url=f"http://{proxy.address}", storage_retry_seconds=30)
        proxy.down()
        threading.Timer(1.5, proxy.up).start()  # back while the reader is still inside its budget
        loaded = load_inputs(spec(f"s3://{s3_bucket}/in/teal.png"), settings)
        assert loaded["image"].getpixel((1, 1)) == (0, 128, 128)

        proxy.down()  # and away for longer than the budget: storage's error, not the spec's
        briefly = WorkerSettings(s3_endpoint_url=f"http://{proxy.address}", storage_retry_seconds=1)
        with pytest.raises(StorageUnavailable, match=r"cannot be reached.*gave up after \d+ attempts"):
            load_inputs(spec(f"s3://{s3_bucket}/in/teal.png"), briefly)
