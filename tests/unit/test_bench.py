"""The benchmark scripts stay runnable: CI does not run `make bench`, so a broken import would go unseen."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow  # each test runs a benchmark script, some with a worker and a service: seconds each


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


def test_the_http_benchmark_times_a_job_three_ways_and_counts_reads() -> None:
    """bench/bench_http.py, quick: a real `render serve`, worker and redis-server; the latency table has the library,
    SSE and Prefer: wait rows (each a job that succeeded, in ms), and the read table a positive rate per case."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_http.py"), "--quick", "--threads", "4", "--read-seconds", "0.25"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "bench",
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells and cells[0] in ("library", "HTTP + SSE", "HTTP + Prefer: wait", "GET /v1/jobs/{id}", "GET /healthz"):
            rows[(cells[0], cells[1] if cells[0].startswith("GET") else "")] = cells
    latency = [rows[(name, "")] for name in ("library", "HTTP + SSE", "HTTP + Prefer: wait")]
    assert all(float(row[1].split()[0]) > 0 for row in latency), result.stdout
    assert latency[0][2] == "" and all(row[2].endswith("%)") for row in latency[1:]), result.stdout
    reads = [rows[key] for key in (("GET /v1/jobs/{id}", "1"), ("GET /v1/jobs/{id}", "4"), ("GET /healthz", "1"))]
    assert all(float(row[2].split()[0].replace(",", "")) > 0 for row in reads), result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("http: the service adds ")


def test_record_only_puts_a_section_in_place_of_its_namesake_or_at_the_end(tmp_path: Path) -> None:
    """`record.py --only` measures one benchmark into the page there: the other sections stay as they were, the
    method text is record.py's."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        record = importlib.import_module("record")
        section_class = importlib.import_module("common").Section
    finally:
        sys.path.remove(str(ROOT / "bench"))
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "# Benchmarks\n\n## Method\n\nold method\n\n## Machine and versions\n\n## Figures\n\n### A\n\nold a\n\n"
        "### B\n\nold b\n"
    )
    fresh_b, fresh_c = section_class("B"), section_class("C")
    fresh_b.line("new b")
    fresh_c.line("new c")
    record.splice(page, "python bench/record.py --only x", record.datetime(2026, 1, 2, 3, 4), [fresh_b, fresh_c])
    text = page.read_text()
    assert "old a" in text and "old b" not in text and "old method" not in text
    assert f"## Method\n\n{record.METHOD}\n## Machine and versions\n" in text
    assert text.index("### A") < text.index("new b") < text.index("### C") < text.index("new c")
    assert text.count("_Measured alone by `python bench/record.py --only x` on 2026-01-02 03:04 UTC") == 2


def test_the_fairshare_benchmark_counts_the_commands_of_each_dequeue() -> None:
    """bench/bench_fairshare.py, small: a row per dequeue, each pop one EVALSHA a job (the tenants' turn runs inside
    it), the commands counted per job and per empty poll (8 tenants' lists cost more than one), and jobs/s."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_fairshare.py"),
            "--jobs",
            "1000",
            "--passes",
            "1",
            "--idle-polls",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "bench",
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells and cells[0].startswith(("before:", "fair share")):
            rows[cells[0]] = cells
    assert len(rows) == 5, result.stdout
    assert all(row[1] == "1.00" for row in rows.values()), result.stdout  # one script call per job, every variant
    before, eight = rows["before: plain pop (f86a481~1)"], rows["fair share, 8 tenants"]
    assert float(eight[2]) > float(before[2]) > 0 and float(eight[8]) > float(before[8]) > 0, result.stdout  # 8 lists
    assert all(float(row[6].split()[0].replace(",", "")) > 0 for row in rows.values()), result.stdout  # jobs/s
    assert "\nfairshare: fair share, 8 tenants, max_gpus 4: " in result.stdout, result.stdout  # the summary line
