"""Rendering into a real S3 API server: `render local` as a process, and render() with background frame uploads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from PIL import Image

from producer import RenderSpec
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.models.registry import ModelRegistry
from worker.settings import WorkerSettings
from worker.storage import open_storage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
EVERY_CALLBACK = [
    {"type": "cfg_cutoff", "step_ratio": 0.5},
    {"type": "frames", "every": 2, "format": "jpeg", "size": 32},
    {"type": "step_budget", "max_steps": 6},
]


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_render_local_into_s3(s3_server: str, s3_bucket: str, tmp_path: Path, model: str) -> None:
    spec = {
        "model": model,
        "prompt": "a lighthouse",
        "num_inference_steps": 8,
        "width": 64,
        "height": 64,
        "seed": 3,
        "num_images": 2,
        "callbacks": EVERY_CALLBACK,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "local",
            str(path),
            "--storage",
            f"s3://{s3_bucket}/renders",
            "--task-id",
            "s3-job",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "RENDER_S3_ENDPOINT_URL": s3_server},
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert (manifest["status"], manifest["interrupted_by"], manifest["steps_completed"]) == (
        "interrupted",
        "max_steps",
        6,
    )

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [
        f"renders/s3-job/{name}"
        for name in (
            "frames/step-002.jpeg",
            "frames/step-004.jpeg",
            "frames/step-006.jpeg",
            "image-0.png",
            "image-1.png",
            "manifest.json",
        )
    ]
    stored = json.loads(s3.get_object(Bucket=s3_bucket, Key="renders/s3-job/manifest.json")["Body"].read())
    assert stored == manifest
    assert manifest["images"] == [f"s3://{s3_bucket}/renders/s3-job/image-{i}.png" for i in range(2)]
    image = s3.get_object(Bucket=s3_bucket, Key="renders/s3-job/image-1.png")
    assert image["ContentType"] == "image/png"
    assert Image.open(io.BytesIO(image["Body"].read())).size == (64, 64)


def test_frames_every_step_upload_in_the_background(s3_server: str, s3_bucket: str) -> None:
    registry = ModelRegistry.from_settings(WorkerSettings(device="cpu"))
    storage = open_storage(f"s3://{s3_bucket}", s3_endpoint_url=s3_server)
    spec = RenderSpec.parse(
        {
            "model": "tiny-sd15",
            "prompt": "p",
            "num_inference_steps": 12,
            "width": 64,
            "height": 64,
            "seed": 1,
            "callbacks": [{"type": "frames", "every": 1, "size": 64}],
        }
    )
    manifest = render(JobContext(spec, task_id="frames-job", frame_threads=3), registry=registry, storage=storage)
    assert manifest.frames == [f"s3://{s3_bucket}/frames-job/frames/step-{n:03d}.png" for n in range(1, 13)]
    for n in (1, 12):
        frame = storage.get(f"frames-job/frames/step-{n:03d}.png")
        assert frame is not None and Image.open(io.BytesIO(frame)).size == (64, 64)
