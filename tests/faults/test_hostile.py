"""Hostile input put on the queue directly, past the producer's checks: each is refused with a clear error
naming the field, nothing is written outside the job's own prefix, and the workers keep serving."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from localfarm.cluster import wait_until
from producer import SpecError
from producer.keys import TASK_RENDER
from tests.faults.conftest import ChaosFarm

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def img2img(image: str, **overrides: Any) -> dict[str, Any]:
    return {
        "model": "tiny-sd15",
        "pipeline": "img2img",
        "prompt": "hostile",
        "num_inference_steps": 4,
        "width": 64,
        "height": 64,
        "image": image,
        **overrides,
    }


def hostile_cases(secret_file: Path, root: Path) -> dict[str, tuple[Any, str]]:
    """name -> (the task's argument, a piece of the error it must end with)."""
    bomb = Image.new("RGB", (6000, 6000), (9, 9, 9))  # 36 Mpx that deflate to a few KB
    return {
        "model outside the allowlist": (
            json.dumps(img2img(data_url(Image.new("RGB", (64, 64))), model="evil/../../model")),
            "is not on this worker's allowlist",
        ),
        "file outside the input roots": (
            json.dumps(img2img(secret_file.as_uri())),
            f"image: {secret_file} is outside the allowed input roots ({root})",
        ),
        "traversal out of an input root": (  # resolved first: the real path is named, never the root
            json.dumps(img2img(f"file://{root}/../{secret_file.name}")),
            f"image: {secret_file} is outside the allowed input roots ({root})",
        ),
        "decompression bomb": (json.dumps(img2img(data_url(bomb))), "image: 6000x6000 is over the"),
        "bytes that are no image": (
            json.dumps(img2img("data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode())),
            "image: ",
        ),
        "not base64": (json.dumps(img2img("data:image/png;base64,!!!notbase64!!!")), "image: "),
        "a spec that is not an object": (json.dumps([1, 2, 3]), "invalid render spec"),
        "unknown fields": (json.dumps({**img2img("x"), "__class__": "os.system"}), "invalid render spec"),
    }


def test_hostile_specs_end_in_clear_failures_and_the_workers_keep_serving(
    chaos_farm: Callable[..., ChaosFarm], tmp_path: Path
) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(secret)
    farm = chaos_farm()
    farm.start_workers("hostile-a", "hostile-b", input_roots=json.dumps([str(root)]), max_input_pixels="16777216")
    sent = {
        name: (farm.client.app.send_task(TASK_RENDER, args=[arg]).id, expected)
        for name, (arg, expected) in hostile_cases(secret, root).items()
    }
    for name, (task_id, expected) in sent.items():
        final = list(farm.client.follow(task_id, interval=0.05, timeout=90))[-1]
        assert final.state == "failed", f"{name}: {final}"
        assert final.error is not None and expected in final.error, f"{name}: {final.error}"
        assert "\n" not in final.error and "Traceback" not in final.error, f"{name}: {final.error}"
        assert [o for o in farm.objects(task_id) if o != "manifest.json"] == [], f"{name} stored images"
    assert all(w.process is not None and w.process.poll() is None for w in farm.workers)
    assert farm.finish([farm.client.submit(img2img(data_url(Image.new("RGB", (64, 64)))))])[0].status == "succeeded"


def test_a_task_id_that_escapes_the_storage_prefix_is_refused_and_writes_nothing(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("ids")
    spec = {"model": "tiny-sd15", "prompt": "x", "num_inference_steps": 2, "width": 64, "height": 64}
    with pytest.raises(SpecError, match=r"task_id: '\.\./\.\./escaped' is not a valid task id"):
        farm.client.submit(spec, task_id="../../escaped")
    for bad in ("../../escaped", "a/b", ".hidden"):
        result = farm.client.app.send_task(TASK_RENDER, args=[json.dumps(spec)], task_id=bad)
        final = list(farm.client.follow(result.id, interval=0.05, timeout=60))[-1]
        assert final.state == "failed" and "is not a valid task id" in (final.error or ""), final
    listing = boto3.client("s3", endpoint_url=farm.s3_endpoint).list_objects_v2(Bucket=farm.bucket)
    assert listing.get("KeyCount", 0) == 0, "nothing may be stored for a refused task id"


def test_pickled_and_undecodable_messages_are_never_run_and_the_worker_keeps_serving(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    (worker,) = farm.start_workers("raw")
    marker = Path(f"/tmp/render-pwned-{uuid.uuid4().hex}")
    pickled = farm.client.app.send_task(TASK_RENDER, args=[str(marker)], serializer="pickle")
    garbage = b"\x80\x04not json at all \xff"
    farm.direct.lpush("render", garbage)  # straight onto the queue: not even a kombu envelope
    envelope = {"body": "e30=", "content-type": "application/x-python-serialize", "properties": {}, "headers": {}}
    farm.direct.lpush("render", json.dumps(envelope))
    farm.direct.lpush("render", json.dumps([1, 2, 3]))
    farm.direct.lpush("render", json.dumps("just a string"))
    wait_until(lambda: farm.direct.llen("render") == 0, timeout=30, what="the worker draining the queue")
    after = farm.client.submit(
        {"model": "tiny-sd15", "prompt": "after", "num_inference_steps": 2, "width": 64, "height": 64}
    )
    assert farm.finish([after])[0].status == "succeeded"
    assert farm.client.status(pickled.id).state in ("unknown", "queued"), "a pickled message is never executed"
    assert not marker.exists()
    assert worker.process is not None and worker.process.poll() is None
    log = farm.log_text()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert log.count("dropped an item on the queue that is not a task message") >= 1, "the raw bytes were dropped"


def _envelope(**fields: Any) -> str:
    return json.dumps({"content-type": "application/json", "headers": {}, **fields})


# Every kind of exception kombu's decoder (json + its type hooks) and its envelope reader can raise.
RAW_ITEMS: dict[str, bytes | str] = {
    "array nested 1,000 deep (RecursionError)": "[" * 1_000 + "]" * 1_000,
    "array nested 100,000 deep (RecursionError)": "[" * 100_000 + "]" * 100_000,
    "object nested 1,000 deep (RecursionError)": '{"a":' * 1_000 + "1" + "}" * 1_000,
    "bad UTF-8 (kombu replaces it; then KeyError: no envelope)": b'{"body": "\xff\xfe"}',
    "truncated JSON (JSONDecodeError)": '{"body": ',
    "decimal hook (decimal.InvalidOperation)": '{"__type__": "decimal", "__value__": "not a number"}',
    "uuid hook (TypeError)": '{"__type__": "uuid", "__value__": "not a mapping"}',
    "datetime hook (ValueError)": '{"__type__": "datetime", "__value__": "yesterday"}',
    "envelope without properties (KeyError)": _envelope(body="e30="),
    "envelope with a list for properties (TypeError)": _envelope(body="e30=", properties=[1]),
    "envelope with a body that is not base64 (binascii.Error)": _envelope(
        body="e", properties={"body_encoding": "base64", "delivery_tag": "x", "delivery_info": {}}
    ),
    "envelope whose delivery_info lacks exchange and routing_key (KeyError)": _envelope(
        body="e30=", properties={"body_encoding": "base64", "delivery_tag": "y", "delivery_info": {}}
    ),
}


def test_any_item_kombu_cannot_decode_is_dropped_and_the_worker_serves_the_next_job(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    (worker,) = farm.start_workers("undecodable")
    for item in RAW_ITEMS.values():
        farm.direct.lpush("render", item)
    wait_until(lambda: farm.direct.llen("render") == 0, timeout=60, what="the worker draining the queue")
    after = farm.client.submit(
        {"model": "tiny-sd15", "prompt": "after", "num_inference_steps": 2, "width": 64, "height": 64}
    )
    assert farm.finish([after])[0].status == "succeeded"
    assert worker.process is not None and worker.process.poll() is None, "the worker must keep running"
    log = farm.log_text()
    assert "Unrecoverable error" not in log and "Connection to broker lost" not in log, log[-3000:]
    assert log.count("dropped an item on the queue that is not a task message") == len(RAW_ITEMS), log[-3000:]
    kinds = ("RecursionError", "JSONDecodeError", "InvalidOperation", "TypeError", "ValueError", "KeyError", "Error")
    for kind in kinds:
        assert f"({kind}: " in log, f"no drop logged for {kind}"
