"""Input images by s3:// reference, from a real S3 API server."""

from __future__ import annotations

import io

import boto3
import pytest
from PIL import Image

from producer import RenderSpec, SpecError
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
