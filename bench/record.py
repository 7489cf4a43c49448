"""Run the whole benchmark suite in one process and write docs/benchmarks.md from what it measured.

    python bench/record.py [--quick] [--out docs/benchmarks.md] [--only http]

Every figure is printed as it is measured and written to the report; nothing in the report is
typed by hand except the method text below. `--quick` uses a few repeats (a smoke run: noisy).
`--only NAME[,NAME]` runs just those benchmarks (of the ones in `ALONE`) and puts their sections into the
page already there, in place of the sections of the same title (or at the end), each saying when and how
it was measured; the other figures are left as they were (the method text is rewritten from this file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import bench_batch
import bench_checkpoint
import bench_fairshare
import bench_families
import bench_fleet
import bench_gpu
import bench_http
import bench_lora
import bench_queue
import bench_recovery
import bench_render
import bench_routing
import bench_step_cache
import bench_throughput
import bench_worker
from common import Section, environment, median, verdict

ROOT = Path(__file__).resolve().parent.parent

METHOD = """\
How these figures are made (this text is in `bench/record.py`; the rest of the page is its output):

- One run of `bench/record.py` measures everything below, on one machine, in one sitting; compare
  figures only within one generated page. Nothing here is edited by hand: rerun `make bench`.
- Comparisons are **interleaved** after a warm-up round, round r running the cases rotated by r
  (A B, B A ...; A B C, B C A, C A B ...), so each case takes each place in a round equally often (on
  this shared machine a run right after another is 2-5 % slower) and drift and background load hit
  every case alike; figures are **medians** over the rounds, with ± = half the
  interquartile range over the median (the run's own noise), and ratios printed next to them.
- The CPU suite uses the tiny offline models (`tiny-sd15`, random weights) with **one torch thread
  per process** (RENDER_TORCH_THREADS=1 in workers, `torch.set_num_threads(1)` in-process), the
  setting for several workers per host, so that both sides of a comparison get the same compute.
  "small" is 256x256 at ~12 ms a step; "production-like" is 640x640, whose steps take 100+ ms on
  these cores, the order of a real UNet step on a GPU.
- Worker overhead: a real `render worker` started with `localfarm.cluster` (private
  redis-server, local-directory storage), jobs submitted with `RenderClient`, against `pipe(...)`
  with the arguments `render()` passes and no callbacks. Per step: the manifest's
  `timings.denoise / steps_completed` against the bare call's time to its VAE decode, over steps.
- Callback costs are each callback alone on the pipeline's real step tensors; the revocation check
  is `RevocationCheck` against the private redis-server; the progress report is the worker's own
  (Celery result backend write + task event), sent at most once per RENDER_PROGRESS_INTERVAL.
- LoRA cost is per step with the adapter unfused (switched with `set_adapters` / `disable_lora`), against a
  pipeline that never held one: tiny-sd15 through the worker's `loras_applied`, and a UNet of SD 1.5's widths.
- Batch submission times the real `render batch FILE --detach` process with 2,000 one-step specs against a
  private redis-server (no worker, jobs stay queued), then the same command again (the resume path).
- The fleet benchmark runs N simulated workers' real control-plane code (leases, revocation polls, progress
  through Celery's own backend and events, adverts, heartbeats, the recovery scan) on their default intervals in
  simulated time against one redis-server, and reads Redis's own counters per simulated second.
- Fair share at dequeue: real task messages drained by the worker's own broker channel with a callback that acks
  at once, for the pop script before tenants and the fair-share script over 1, 2 and 8 tenants, 200 jobs a turn,
  interleaved; Redis's INFO commandstats per job and per empty poll (a script's own commands included).
- Throughput times streams of same-shape jobs through a real worker, submit to the last final state,
  against the bare serial `pipe()` loop and bare batched calls over the same specs, interleaved: overlap at
  the production-like size with RENDER_MAX_BATCH=1, overlap and batching at the small size.
- Model families: each family's tiny model in-process (128x128, 8 steps): `render()` with a worker's step hooks
  and frames against the bare call per step, four compatible jobs in one `denoise_batch` call against the four
  alone, and the family's preview against the pipeline's decode of last-step latents (PSNR); no Redis.
- Checkpoints: in-process `render()` with checkpoints at every step against none (interleaved), the GPU
  thread's capture timed alone, and a job stopped at 90 % done again from its checkpoint and from step 0.
- HTTP service: a real `render serve` process (uvicorn) over a private redis-server and one tiny worker; the same
  job submitted and followed to its final state through HTTP (SSE, or `Prefer: wait`) and through `RenderClient`,
  interleaved; `GET /v1/jobs/{id}` requests per second from client threads on the same cores.
- The GPU section runs the same benchmarks on full-size SD 1.5 / SDXL with random fp16 weights
  where CUDA is present; otherwise it says it was skipped and only checks the full-size configs.
"""


def summary(
    worker: list[bench_worker.OverheadResult],
    queue: bench_queue.QueueResults,
    rendered: bench_render.RenderResults,
    recovery: list[bench_recovery.Recovery],
    throughput: str,
    checkpoints: bench_checkpoint.CheckpointResults,
    fleet: list[bench_fleet.FleetLoad],
) -> Section:
    section = Section("Targets")
    prod = worker[-1]
    section.line(
        f"- worker overhead per step at a production-like step ({median(prod.bare_step) * 1e3:.0f} ms): "
        f"target < {bench_worker.TARGET:.0%}: **{bench_worker.target_verdict(prod)}**; "
        f"at the small step ({median(worker[0].bare_step) * 1e3:.1f} ms): {worker[0].step_ratio - 1:+.2%}"
    )
    section.line(f"- {bench_worker.hooks_line(prod)}")
    worst = max(queue.steps_after_revoke)
    section.line(f"- revoke latency: at most {worst} step(s) after the revoke (target <= 1): **{verdict(worst <= 1)}**")
    for case, threads, ratio in rendered.frames:
        section.line(
            f"- frames every step, {case.label} ({case.size}x{case.size}), torch threads {threads}: {ratio - 1:+.1%} "
            f"(target < {bench_render.FRAMES_TARGET:.0%}): **{verdict(ratio - 1 < bench_render.FRAMES_TARGET)}**"
        )
    section.line(f"- {throughput} (goals: overlap >= 1.00x, batched >= 1.40x)")
    for r in recovery:
        section.line(
            f"- recovery after SIGKILL (lease {r.lease_ttl} s, scan {r.interval} s): {r.status} after {r.seconds:.1f} s"
        )
    section.line(
        f"- checkpoints: {checkpoints.capture_ms:.2f} ms of the GPU thread each ({checkpoints.step_ratio - 1:+.1%} per "
        f"step at one every step); a job stopped at 90 % done again in {checkpoints.resumed:.2f} s from its "
        f"checkpoint vs {checkpoints.scratch:.2f} s from step 0"
    )
    big = fleet[-1]
    per_worker = [load.commands / load.workers for load in fleet]
    fleet_met = big.commands < 20_000 and big.net_bytes < 5e6 and max(per_worker) <= 2 * min(per_worker)
    section.line(
        f"- control plane at {big.workers} simulated workers: {big.commands:,.0f} Redis commands/s "
        f"(before: {big.before_commands:,.0f}), {big.net_bytes / 1e6:.2f} MB/s (before: {big.before_bytes / 1e6:.1f}); "
        f"per worker x{max(per_worker) / min(per_worker):.2f} from N={fleet[0].workers} (targets: < 20,000/s, "
        f"< 5 MB/s, within 2x): **{verdict(fleet_met)}**"
    )
    return section


def write(path: Path, command: str, elapsed: float, started: datetime, sections: list[Section]) -> None:
    env = environment()
    header = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/record.py (`make bench`); do not edit by hand. -->",
        "",
        f"Generated {started:%Y-%m-%d %H:%M} UTC by `{command}` in {elapsed / 60:.1f} min.",
        "",
        "## Method",
        "",
        METHOD,
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in env.items()),
        "",
        "## Figures",
        "",
        "",
    ]
    body = "\n".join(section.markdown() for section in sections)
    path.write_text("\n".join(header) + body)
    print(f"\nwrote {path}", flush=True)


ALONE: dict[str, Callable[[bool], list[Section]]] = {
    "http": lambda quick: [bench_http.run(rounds=3 if quick else 9, read_seconds=1.0 if quick else 2.0)],
    "fairshare": lambda quick: [bench_fairshare.run(jobs=1000 if quick else 2000, passes=1 if quick else 3)],
}
"""The benchmarks `--only` can run on their own: their sections need nothing from the others."""


def splice(path: Path, command: str, started: datetime, sections: list[Section]) -> None:
    """Put `sections` into the page at `path`, each in place of the section of its title, else at the end; the
    method text is this file's (it may describe the benchmarks just added)."""
    page = path.read_text()
    method, machine = page.find("## Method\n\n"), page.find("## Machine and versions\n")
    if 0 <= method < machine:
        page = page[: method + len("## Method\n\n")] + METHOD + "\n" + page[machine:]
    for section in sections:
        note = f"\n_Measured alone by `{command}` on {started:%Y-%m-%d %H:%M} UTC, after the rest of the page._\n"
        text = section.markdown() + note
        head = f"### {section.title}\n"
        start = page.find(head)
        if start < 0:
            page = page.rstrip("\n") + "\n\n" + text
            continue
        end = page.find("\n### ", start + len(head))
        page = page[:start] + text + (page[end:] if end >= 0 else "")
    path.write_text(page)
    print(f"\nwrote {', '.join(s.title for s in sections)} into {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that everything runs (noisy)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated, of {', '.join(ALONE)}: run just those, into the page there"
    )
    args = parser.parse_args()
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = " ".join([python, os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started_at = datetime.now(UTC)
    started = time.monotonic()
    if args.only is not None:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in ALONE]
        if unknown or not names:
            parser.error(f"--only: {', '.join(unknown) or 'nothing'} is not one of {', '.join(ALONE)}")
        if not args.out.exists():
            parser.error(f"--only: {args.out} does not exist yet; run the whole suite first (make bench)")
        splice(args.out, command, started_at, [section for name in names for section in ALONE[name](args.quick)])
        return
    repeats = 2 if args.quick else 9

    env = Section("Machine and versions")
    for key, value in environment().items():
        env.line(f"{key}: {value}")

    worker_section, worker = bench_worker.run(repeats=repeats)
    rendered = bench_render.run(repeats=max(2, repeats * 2 // 3))
    lora_section = bench_lora.run(repeats=repeats, wide_repeats=max(2, repeats // 2))
    queue_sections, queue = bench_queue.run(
        revokes=3 if args.quick else 5, overhead_jobs=5 if args.quick else 20, batch=8 if args.quick else 16
    )
    recovery_section, recovery = bench_recovery.run()
    routing_section = bench_routing.run(jobs=100)
    batch_section = bench_batch.run(jobs=2000)
    throughput_section, throughput = bench_throughput.run(
        jobs=4 if args.quick else 8,
        batch_jobs=8 if args.quick else None,
        max_batch=4 if args.quick else 8,
        repeats=1 if args.quick else 3,
        batch_repeats=1 if args.quick else 6,
    )
    families_section = bench_families.run(repeats=repeats)
    step_cache_section = bench_step_cache.run(repeats=3 if args.quick else 6)
    checkpoint_section, checkpoints = bench_checkpoint.run(repeats=2 if args.quick else 5)
    fleet_section, fleet = bench_fleet.run((10, 100) if args.quick else (10, 100, 1000), 10.0 if args.quick else 20.0)
    fairshare_section = bench_fairshare.run(jobs=1000 if args.quick else 2000, passes=1 if args.quick else 3)
    http_section = bench_http.run(rounds=3 if args.quick else 9, read_seconds=1.0 if args.quick else 2.0)
    gpu_sections = bench_gpu.run(repeats=max(2, repeats // 2))
    sections = [
        summary(worker, queue, rendered, recovery, throughput, checkpoints, fleet),
        worker_section,
        *rendered.sections,
        lora_section,
        *queue_sections,
        recovery_section,
        routing_section,
        batch_section,
        throughput_section,
        families_section,
        step_cache_section,
        checkpoint_section,
        fleet_section,
        fairshare_section,
        http_section,
        *gpu_sections,
    ]
    write(args.out, command, time.monotonic() - started, started_at, sections)


if __name__ == "__main__":
    main()
