"""Input images by s3:// reference, from a real S3 API server."""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import boto3
import pytest
from PIL import Image

from producer import RenderSpec, SpecError
from producer.errors import ConfigError, StorageUnavailable
from producer.settings import load
from tests.faults.proxy import FaultProxy
from tests.helpers import wait_until
from worker.engine.inputs import load_inputs
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def spec(image: str) -> RenderSpec:
    return RenderSpec.parse(
        {"model": "tiny-sd15", "pipeline": "img2img", "prompt": "p", "width": 64, "height": 64, "image": image}
    )


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


CAP = 64 * 1024
HUGE = 4 * 1024 * 1024
OVER = f"the image is {HUGE} bytes, over the {CAP}-byte cap (RENDER_MAX_INPUT_BYTES); "


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


def test_an_s3_input_over_the_cap_is_refused_on_its_size_and_never_read(s3_server: str, s3_bucket: str) -> None:
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="in/huge.png", Body=os.urandom(HUGE))
    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:  # counts every byte the S3 server sends back
        settings = WorkerSettings(s3_endpoint_url=f"http://{proxy.address}", max_input_bytes=CAP)
        with pytest.raises(SpecError, match=rf"^image: {re.escape(OVER)}"):
            load_inputs(spec(f"s3://{s3_bucket}/in/huge.png"), settings)
        assert 0 < proxy.downstream < 16 * 1024  # the object's size came back, none of its 4 MiB


def test_an_s3_input_that_grows_after_its_size_was_read_is_cut_after_the_cap(s3_server: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=s3_bucket, Key="in/swapped.png", Body=png("navy"))
    refused: list[SpecError] = []

    def load_input(settings: WorkerSettings) -> None:
        try:
            load_inputs(spec(f"s3://{s3_bucket}/in/swapped.png"), settings)
        except SpecError as exc:
            refused.append(exc)

    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        settings = WorkerSettings(s3_endpoint_url=f"http://{proxy.address}", max_input_bytes=CAP)
        reading = proxy.hold_at(f"GET /{s3_bucket}/in/swapped.png".encode())  # after its size was read
        reader = threading.Thread(target=load_input, args=(settings,), daemon=True)
        reader.start()
        wait_until(reading.is_set, timeout=30, what="the worker's GET of the input")
        s3.put_object(Bucket=s3_bucket, Key="in/swapped.png", Body=os.urandom(HUGE))  # straight to the server
        proxy.release()
        reader.join(60)
        assert not reader.is_alive()
        assert proxy.downstream < CAP + 16 * 1024  # it asked for no more than the cap and one byte
    assert len(refused) == 1 and str(refused[0]).startswith(f"image: {OVER}")


def test_s3_inputs_come_only_from_the_buckets_and_prefixes_in_input_roots(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for key in ("allowed/ok.png", "allowed-not/no.png", "other/no.png"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png("olive"))
    monkeypatch.setenv("RENDER_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("RENDER_INPUT_ROOTS", f" s3://{s3_bucket}/allowed/ , {tmp_path}")  # the comma form
    settings = load(WorkerSettings)
    assert settings.input_roots == [f"s3://{s3_bucket}/allowed/", str(tmp_path)]
    assert load_inputs(spec(f"s3://{s3_bucket}/allowed/ok.png"), settings)["image"].getpixel((1, 1)) == (128, 128, 0)
    for outside in (f"s3://{s3_bucket}/other/no.png", f"s3://{s3_bucket}/allowed-not/no.png", "s3://elsewhere/a.png"):
        with pytest.raises(SpecError) as refused:
            load_inputs(spec(outside), settings)
        assert str(refused.value) == (
            f"image: {outside} is outside the allowed input roots (s3://{s3_bucket}/allowed/); "
            "use an input under one of them or add its bucket or prefix to RENDER_INPUT_ROOTS"
        )
    # Without an s3:// entry every bucket the worker's credentials read is allowed, as before the setting took any.
    monkeypatch.setenv("RENDER_INPUT_ROOTS", f'["{tmp_path}"]')
    anywhere = load(WorkerSettings)
    assert load_inputs(spec(f"s3://{s3_bucket}/other/no.png"), anywhere)["image"].size == (64, 64)
    for bad in ("s3://", "s3:///prefix/", f"s3://{s3_bucket}/a/../b/"):
        monkeypatch.setenv("RENDER_INPUT_ROOTS", bad)
        with pytest.raises(ConfigError, match=r"RENDER_INPUT_ROOTS"):
            load(WorkerSettings)
