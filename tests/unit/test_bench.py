"""The benchmark scripts stay runnable: CI does not run `make bench`, so a broken import would go unseen."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_make_bench_entry_point_imports_every_benchmark_and_explains_itself() -> None:
    # record.py imports every bench_*.py module, so this catches a broken import anywhere in bench/.
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "record.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "docs/benchmarks.md" in result.stdout


def test_full_size_gpu_configs_match_the_published_parameter_counts() -> None:
    """The GPU benchmark's SD1.5/SDXL architectures, built on the meta device (no memory, no GPU)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| sd15 |", "| sdxl |"))]
    assert len(rows) >= 6 and all(line.rstrip().endswith("| yes |") for line in rows), result.stdout
    assert "| sd15 | unet | 859,520,964 |" in result.stdout


def test_the_fleet_benchmark_measures_redis_load_per_worker_before_and_after() -> None:
    """A small fleet through bench/bench_fleet.py: its table has a row per fleet, from Redis's own counters."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_fleet.py"), "--fleets", "5,40", "--seconds", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "bench",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(("| 5 |", "| 40 |"))]
    assert len(rows) == 2, result.stdout
    per_worker = [float(after.replace(",", "")) / int(workers) for workers, _before, after, *_ in rows]
    assert all(1 < load < 100 for load in per_worker), result.stdout  # a worker's real control plane: a few a second
    assert max(per_worker) <= 2 * min(per_worker), result.stdout  # flat from 5 to 40 workers


def test_interleaved_rounds_give_every_case_every_place_equally_often() -> None:
    """A run right after another is slower on a shared machine: over len(cases) rounds each case goes first, second
    and last once (the old A B C, C B A order put the first case first twice in three rounds)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        interleaved = importlib.import_module("common").interleaved
    finally:
        sys.path.remove(str(ROOT / "bench"))
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = interleaved(cases, 6, warmup=1)
    rounds = [calls[i : i + 3] for i in range(3, len(calls), 3)]  # after the warm-up round
    assert rounds == [list("abc"), list("bca"), list("cab")] * 2
    assert {name: len(seconds) for name, seconds in samples.items()} == {"a": 6, "b": 6, "c": 6}


# Benchmarks run on their own, outside `make bench` (their figures are not on docs/benchmarks.md).
STANDALONE = {"bench_preview"}


def test_make_bench_runs_every_benchmark_module_but_the_standalone_ones() -> None:
    """A new bench/bench_*.py that record.py does not import would never reach docs/benchmarks.md."""
    tree = ast.parse((ROOT / "bench" / "record.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    benches = {path.stem for path in (ROOT / "bench").glob("bench_*.py")}
    assert benches - imported == STANDALONE
    called = {
        node.func.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and isinstance(node.func.value, ast.Name)
    }
    assert benches - STANDALONE <= called


def test_the_families_benchmark_previews_the_last_step_latents_of_each_family() -> None:
    """bench/bench_families.py on tiny-sd15 and tiny-flux: a per-step row and a preview row per model; the flux
    preview is fitted to its VAE and lands near the pipeline's own decode (a preview of the wrong latents, or of
    packed latents read as an image, scores far lower)."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_families.py"),
            "--repeats",
            "2",
            "--models",
            "tiny-sd15,tiny-flux",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "bench",
    )
    assert result.returncode == 0, result.stderr
    rows: dict[str, list[list[str]]] = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells and cells[0] in ("tiny-sd15 (sd15)", "tiny-flux (flux)"):
            rows.setdefault(cells[0], []).append(cells)
    assert set(rows) == {"tiny-sd15 (sd15)", "tiny-flux (flux)"} and all(len(r) == 2 for r in rows.values())
    for steps, preview in rows.values():
        assert steps[3].endswith("%)") and float(steps[3].split("x")[0]) > 0  # worker / bare, a ratio
        assert float(steps[6].rstrip("x")) > 0  # the batching gain
        assert 0 < float(preview[2]) < 100 and 0 < float(preview[3]) < 100  # finite PSNRs
    sd15_preview, flux_preview = rows["tiny-sd15 (sd15)"][1], rows["tiny-flux (flux)"][1]
    assert sd15_preview[1] == "fixed factors" and not sd15_preview[4].endswith("(with the fit)")
    assert flux_preview[1] == "fitted to its VAE" and flux_preview[4].endswith("(with the fit)")
    assert float(flux_preview[2]) > 15
