"""`render demo` from nothing: private Redis, a worker, four jobs in their expected states, a contact sheet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_demo_runs_from_nothing_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDER_")}
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for job, state in [
        ("lora-cfg-cutoff", "succeeded"),
        ("frames-euler-a", "succeeded"),
        ("step-budget", "interrupted"),
        ("revoked", "revoked"),
        ("flux", "succeeded"),
    ]:
        assert any(line.split()[:2] == [job, state] for line in lines), result.stdout
    assert "every job ended as expected" in result.stdout
    with Image.open(tmp_path / "contact-sheet.png") as sheet:
        assert sheet.size == (4 * 128, 2 * 128)  # eight frames of the frames job, four to a row
    (gallery,) = (tmp_path / "renders" / "_batches").glob("demo-*/index.html")
    assert f"gallery of batch {gallery.parent.name} (open it in a browser): {gallery.as_uri()}" in result.stdout
    rows = (gallery.parent / "index.jsonl").read_text().splitlines()
    assert [json.loads(row)["status"] for row in rows] == [
        "succeeded",
        "succeeded",
        "interrupted",
        "revoked",
        "succeeded",
    ]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps, "the demo left a process running"
