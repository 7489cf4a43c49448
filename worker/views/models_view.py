"""What `render models` shows: the worker's allowlist as it lies on this machine, and (`--check`) whether each model
passes the start-up check and loads.

Each row: name, family, kind, where (the file or the source), size (a file's bytes; a directory's total), sha256,
and the live workers that have the model loaded (their adverts in Redis; `?` when Redis cannot be reached).

sha256: a file model's is the file's own digest (what model sites publish). A directory's, or a cached hub id's
snapshot, is the digest of the `sha256sum` listing of its weight files (`WEIGHT_SUFFIXES`), one line
`<hex>  <relative path>` each, sorted by path, so in the directory
`find . -type f \\( -name '*.safetensors' -o ... \\) | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum`
gives it. A tiny model has none (`-`).

Digests are cached across runs in a JSON file (`RENDER_HASH_CACHE`, default
`$XDG_CACHE_HOME/render-farm/sha256.json`, else `~/.cache/render-farm/sha256.json`) keyed by the file's absolute
path (symlinks resolved) with its size and mtime_ns: a file whose size and mtime are unchanged is not read again.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table

from producer.errors import FarmUnavailable, RenderError
from worker.models.digests import FileDigests
from worker.settings import HUB_ID, ModelSource, WorkerSettings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5")
"""The files of a directory its sha256 covers: the weights, not configs or tokenizers."""


def default_cache_path(setting: str | None = None) -> Path:
    """RENDER_HASH_CACHE (`setting`), else `$XDG_CACHE_HOME/render-farm/sha256.json`, else
    `~/.cache/render-farm/sha256.json`."""
    if setting:
        return Path(setting).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "render-farm" / "sha256.json"


class HashCache(FileDigests):
    """`FileDigests` kept in a JSON file across runs; `save()` writes it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        entries: dict[str, dict[str, Any]] = {}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                entries = {str(k): v for k, v in loaded.items() if isinstance(v, dict)}
        except (OSError, ValueError):  # none yet, unreadable or corrupt: start afresh, rewritten on save
            pass
        super().__init__(entries)

    def save(self) -> str | None:
        """Write the cache if it changed (atomically); a phrase saying why it could not be, else None."""
        if not self.changed:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".sha256-", suffix=".json")
            with os.fdopen(fd, "w") as writer:
                json.dump(self.entries, writer, indent=0, sort_keys=True)
            os.replace(temp, self.path)
        except OSError as exc:
            return f"the sha256 cache {self.path} could not be written ({exc.strerror or exc}); set RENDER_HASH_CACHE"
        self.changed = False
        return None


@dataclass
class ModelRow:
    """One allowlisted model as it lies here; `loaded_on` is None when the fleet could not be asked."""

    name: str
    family: str
    kind: str
    where: str
    base: str | None
    size: int | None
    sha256: str | None
    loaded_on: list[str] | None
    problem: str | None = None


@dataclass
class CheckResult:
    """`--check` for one model: ok, or the one-line failure; load seconds and memory when it loaded."""

    ok: bool
    error: str | None = None
    load_seconds: float | None = None
    memory_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None


def local_folder(model: ModelSource) -> Path | None:
    """The directory a `directory` or `hub` model's files are in here (a hub id's cached snapshot), else None."""
    if model.kind == "directory" and model.source is not None:
        return Path(model.source).expanduser()
    if model.kind == "hub" and model.source is not None and HUB_ID.fullmatch(model.source):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.source, "model_index.json")
        return Path(cached).parent if isinstance(cached, str) else None
    return None


def weight_files(folder: Path) -> list[Path]:
    """The weight files under `folder` (`WEIGHT_SUFFIXES`), sorted by their path relative to it."""
    found = [path for path in folder.rglob("*") if path.name.lower().endswith(WEIGHT_SUFFIXES) and path.is_file()]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def folder_facts(folder: Path, cache: HashCache) -> tuple[int, str]:
    """A directory's total bytes (every file, symlinks followed) and the sha256 of its weight files' listing."""
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    listing = "".join(f"{cache.sha256(path)}  {path.relative_to(folder).as_posix()}\n" for path in weight_files(folder))
    return size, hashlib.sha256(listing.encode()).hexdigest()


def model_row(name: str, model: ModelSource, cache: HashCache, loaded: Mapping[str, list[str]] | None) -> ModelRow:
    """The row of one model; a file or directory that cannot be read leaves size and sha256 empty and says why."""
    row = ModelRow(
        name=name,
        family=model.family,
        kind=model.kind,
        where=model.where,
        base=model.base,
        size=None,
        sha256=None,
        loaded_on=None if loaded is None else sorted(loaded.get(name, [])),
    )
    try:
        if model.file is not None:
            row.size = os.path.getsize(model.file)
            row.sha256 = cache.sha256(model.file)
        elif (folder := local_folder(model)) is not None:
            if not folder.is_dir():
                row.problem = "not a directory here"
            else:
                row.size, row.sha256 = folder_facts(folder, cache)
        elif model.kind == "hub":
            row.problem = "not in the local hub cache"
    except OSError as exc:
        row.problem = f"cannot be read: {exc.strerror or exc}"
    return row


def fleet_loaded(settings: WorkerSettings) -> tuple[dict[str, list[str]] | None, str | None]:
    """Per model, the live workers that have it loaded (their adverts); (None, why) when Redis cannot be reached."""
    from producer.client import RenderClient

    try:
        found = RenderClient(settings).workers()
    except FarmUnavailable as exc:
        return None, f"{exc}; the 'loaded on' column shows ? (the listing itself is this machine's)"
    loaded: dict[str, list[str]] = {}
    for info in found:
        for model in info.loaded:
            loaded.setdefault(model, []).append(info.hostname)
    return loaded, None


def pipeline_bytes(pipe: Any) -> int:
    """Bytes of the pipeline's parameters and buffers (each tensor once; a GGUF weight counts its packed bytes)."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def check_model(settings: WorkerSettings, name: str, model: ModelSource) -> CheckResult:
    """The worker's start-up check of the model, then one load of it in this process (a registry of its own, with
    nothing else loaded), timed and measured; the loaded pipeline is dropped before this returns."""
    from worker.process.preflight import check_models

    try:
        check_models({name: model})
    except RenderError as exc:
        return CheckResult(ok=False, error=_one_line(str(exc)))
    import torch

    from worker.models.registry import ModelRegistry

    registry = ModelRegistry.from_settings(
        settings.model_copy(update={"models": {name: model}, "max_cached_models": 1})
    )
    cuda = registry.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(registry.device)
    started = time.perf_counter()
    try:
        pipe = registry.pipeline(name)
    except RenderError as exc:
        return CheckResult(ok=False, error=_one_line(str(exc)), load_seconds=round(time.perf_counter() - started, 3))
    result = CheckResult(
        ok=True,
        load_seconds=round(time.perf_counter() - started, 3),
        memory_bytes=pipeline_bytes(pipe),
        cuda_max_allocated_bytes=int(torch.cuda.max_memory_allocated(registry.device)) if cuda else None,
    )
    del pipe, registry
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _one_line(message: str) -> str:
    return " ".join(message.split())


def human_bytes(size: int | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def row_json(row: ModelRow, check: CheckResult | None) -> str:
    """One JSON line: the row's fields, and with `--check` `check` ("ok" | "failed") and the check's fields."""
    data: dict[str, Any] = dataclasses.asdict(row)
    if check is not None:
        data["check"] = "ok" if check.ok else "failed"
        data.update(dataclasses.asdict(check))
        del data["ok"]
    return json.dumps(data)


def models_table(rows: list[ModelRow], checks: Mapping[str, CheckResult] | None) -> Table:
    """The listing as a table; with `checks`, the check's outcome, load seconds and memory per model."""
    table = Table(box=box.SIMPLE_HEAD)
    for header in ("model", "family", "kind", "size", "sha256", "loaded on"):
        table.add_column(header, no_wrap=True)
    if checks is not None:
        for header in ("check", "load s", "memory", "cuda peak"):
            table.add_column(header, no_wrap=True)
    table.add_column("where")
    for row in rows:
        cells = [
            row.name,
            row.family,
            row.kind,
            human_bytes(row.size),
            row.sha256 or (f"({row.problem})" if row.problem else "-"),
            "?" if row.loaded_on is None else ", ".join(row.loaded_on) or "-",
        ]
        if checks is not None:
            check = checks[row.name]
            cells += [
                "ok" if check.ok else "FAILED",
                "-" if check.load_seconds is None else f"{check.load_seconds:.2f}",
                human_bytes(check.memory_bytes),
                human_bytes(check.cuda_max_allocated_bytes),
            ]
        table.add_row(*cells, row.where)
    return table


def run(settings: WorkerSettings, *, check: bool, as_json: bool, out: TextIO | None = None) -> int:
    """`render models`: list (and with `check`, check and load) every allowlisted model; the exit status."""
    out = out or sys.stdout
    if check:
        from worker.process.preflight import check_device

        check_device(settings)  # a device that is not there is the command's error (exit 2), not every model's
    cache = HashCache(default_cache_path(settings.hash_cache))
    loaded, unreachable = fleet_loaded(settings)
    if unreachable:
        sys.stderr.write(f"note: {unreachable}\n")
    rows: list[ModelRow] = []
    checks: dict[str, CheckResult] = {}
    for name, model in settings.models.items():
        row = model_row(name, model, cache, loaded)
        rows.append(row)
        if check:
            checks[name] = check_model(settings, name, model)
        if as_json:  # a line as soon as the model is done: a script follows a long --check as it goes
            out.write(row_json(row, checks.get(name)) + "\n")
            out.flush()
    cache_problem = cache.save()
    if cache_problem:
        sys.stderr.write(f"note: {cache_problem}\n")
    if not as_json:
        console = Console(file=out)
        if not console.is_terminal:  # a pipe or a file: one line per row, however long the paths
            console = Console(file=out, width=max(console.width, 1000))
        console.print(models_table(rows, checks if check else None))
        for result in checks.values():
            if not result.ok:
                console.print(result.error, markup=False, highlight=False, soft_wrap=True)  # it names the model
    return 1 if any(not result.ok for result in checks.values()) else 0
