"""What the benchmark scripts share: the report they print as they measure, interleaved timing, the machine.

Every figure goes through a `Section`: `Section.line` prints it at once and keeps it for
`bench/record.py`, which writes the sections into docs/benchmarks.md. Nothing here is timed.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "a lighthouse on a cliff at dusk"


@dataclass
class Section:
    """A titled block of the report; every line is printed when it is added."""

    title: str
    intro: str = ""
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        print(f"\n## {self.title}", flush=True)
        if self.intro:
            print(self.intro, flush=True)

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> None:
        """A markdown table; `align` is one letter per column, l or r (default: first l, the rest r)."""
        align = align or "l" + "r" * (len(header) - 1)
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "|".join("---" if a == "l" else "---:" for a in align) + "|")
        for row in rows:
            self.line("| " + " | ".join(str(cell) for cell in row) + " |")
        self.line()

    def markdown(self) -> str:
        head = f"### {self.title}\n\n" + (f"{self.intro}\n\n" if self.intro else "")
        return head + "\n".join(self.lines).rstrip() + "\n"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range over the median: the run-to-run noise of one case, as a fraction."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / median(values)


def interleaved(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    self_timed: bool = False,
) -> dict[str, list[float]]:
    """Seconds of each case per round; round r runs the cases rotated by r (A B C, B C A, C A B, A B C ...).

    On the shared 2-core machine a run right after another is slower: whichever of two 12 s streams went second
    took 2-5 % longer, in each of six rounds (bench_throughput at 640², the worker and bare serial alternating who
    goes first). So each case takes each place in a round equally often over `len(cases)` rounds (and a steady
    drift through the run weighs on every case alike); an older A B C, C B A order gave the first case the first
    place twice in three rounds and biased every ratio against the last. Use a multiple of `len(cases)` rounds.

    With `self_timed`, each case returns its own seconds (so set-up inside it is not counted).
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for round_ in range(repeats):
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            sync()
            started = time.perf_counter()
            result = cases[name]()
            sync()
            samples[name].append(float(result) if self_timed else time.perf_counter() - started)
    return samples


def percent(ratio: float) -> str:
    return f"{ratio - 1:+.1%}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --- the machine and the software --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for text in Path("/proc/meminfo").read_text().splitlines():
            if text.startswith("MemTotal:"):
                return int(text.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def redis_server_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "unknown"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict[str, str]:
    """The machine and versions, as the report's header lists them."""
    import torch

    ram = ram_gib()
    return {
        "CPU": f"{cpu_model()}, {os.cpu_count()} cores",
        "RAM": f"{ram:.1f} GiB" if ram is not None else "unknown",
        "GPU": gpu_name() or "none (torch.cuda.is_available() is False)",
        "OS": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "celery": package_version("celery"),
        "redis-py": package_version("redis"),
        "redis-server": redis_server_version(),
        "pillow": package_version("pillow"),
    }


def set_threads(threads: int) -> None:
    """torch CPU threads in this process, as RENDER_TORCH_THREADS sets them in a worker."""
    import torch

    torch.set_num_threads(threads)
