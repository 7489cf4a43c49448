"""The README's Python API example runs as written (from the repository root, into a temporary directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    code = code.replace("file:///tmp/out", (tmp_path / "out").as_uri())
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RENDER_MODELS", raising=False)
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own documentation
    manifest = scope["manifest"]
    assert getattr(manifest, "status", None) == "succeeded" and getattr(manifest, "task_id", None) == "job-1"
    assert (tmp_path / "out" / "job-1" / "manifest.json").exists()
    assert os.listdir(tmp_path / "out") != ["job-1"], "the bare spec rendered under a new task id too"
