"""`render models [--check] [--json]` as a real process: the allowlist with kinds, sizes and sha256 (checked against
hashlib, cached across runs), the workers that have each model loaded (a real advert in a private redis-server),
and `--check` loading tiny, single-file, GGUF and directory models, refusing a file cut short."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.typing import EncodableT, FieldT

from localfarm.cluster import RedisServer
from producer.keys import model_queue, worker_key
from producer.records import WorkerInfo
from tests.helpers import free_port
from tests.single_files import truncate, write_gguf_transformer, write_sd15_checkpoint
from worker.models import tiny_flux, tiny_sd15
from worker.process.fleet import Heartbeat

ROOT = Path(__file__).parents[2]
RENDER = Path(sys.executable).with_name("render")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD1.5 as a diffusers directory and as one original-layout file, a tiny Flux's GGUF transformer and its
    base directory, and the SD1.5 file cut short."""
    root = tmp_path_factory.mktemp("models")
    sd15 = tiny_sd15.build()
    sd15.save_pretrained(root / "sd15-base")
    flux = tiny_flux.build()
    flux.save_pretrained(root / "flux-base")
    whole = write_sd15_checkpoint(sd15, root / "sd15.safetensors")
    return {
        "sd15-base": root / "sd15-base",
        "sd15-file": whole,
        "flux-base": root / "flux-base",
        "flux-gguf": write_gguf_transformer(flux, root / "flux-q8.gguf"),
        "truncated": truncate(whole, root / "sd15-cut.safetensors"),
    }


def allowlist(files: dict[str, Path]) -> dict[str, Any]:
    return {
        "tiny-sd15": {"family": "sd15", "source": "tiny"},
        "sd15-file": {"family": "sd15", "file": str(files["sd15-file"]), "base": str(files["sd15-base"])},
        "sd15-dir": {"family": "sd15", "source": str(files["sd15-base"])},
        "flux-gguf": {"family": "flux", "file": str(files["flux-gguf"]), "base": str(files["flux-base"])},
    }


def render_models(
    *args: str, models: dict[str, Any], redis_url: str, cache: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "RENDER_MODELS": json.dumps(models),
        "RENDER_REDIS_URL": redis_url,
        "RENDER_HASH_CACHE": str(cache),
        "RENDER_DEVICE": "cpu",
    }
    return subprocess.run(
        [str(RENDER), "models", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert result.returncode in (0, 1), result.stderr
    return {row["name"]: row for row in map(json.loads, result.stdout.splitlines())}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder: Path) -> str:
    """What `sha256sum` over the weight files, sorted by path, then `sha256sum` of its output gives."""
    weights = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    listing = "".join(f"{sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in weights)
    return hashlib.sha256(listing.encode()).hexdigest()


def advertise(client: redis.Redis, hostname: str, models: list[str], loaded: list[str]) -> None:
    """A worker's advert as a real worker writes it: its heartbeat, then its render process's loaded models."""
    queues = [model_queue("render", model) for model in models]
    Heartbeat(client, hostname=hostname, models=models, queues=queues, interval=5, ttl=120).beat()
    fields: dict[FieldT, EncodableT] = {
        k: v for k, v in WorkerInfo.load_fields(loaded, dict.fromkeys(loaded, 1)).items()
    }
    client.hset(worker_key(hostname), mapping=fields)


def test_the_listing_gives_kind_size_sha256_and_the_workers_with_each_model_loaded(
    files: dict[str, Path], server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    models = allowlist(files)
    advertise(client, "gpu0@host", list(models), ["tiny-sd15", "sd15-file"])
    advertise(client, "gpu1@host", list(models), ["sd15-file"])

    found = rows(render_models("--json", models=models, redis_url=server.url, cache=tmp_path / "cache.json"))
    assert list(found) == list(models)
    assert {name: row["kind"] for name, row in found.items()} == {
        "tiny-sd15": "tiny",
        "sd15-file": "file",
        "sd15-dir": "directory",
        "flux-gguf": "gguf",
    }
    for name in ("sd15-file", "flux-gguf"):
        assert found[name]["sha256"] == sha256(files[name])
        assert found[name]["size"] == files[name].stat().st_size
        assert found[name]["where"] == str(files[name])
    base = files["sd15-base"]
    assert found["sd15-dir"]["sha256"] == folder_digest(base)
    assert found["sd15-dir"]["size"] == sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    assert (found["tiny-sd15"]["sha256"], found["tiny-sd15"]["size"]) == (None, None)
    assert {name: row["loaded_on"] for name, row in found.items()} == {
        "tiny-sd15": ["gpu0@host"],
        "sd15-file": ["gpu0@host", "gpu1@host"],
        "sd15-dir": [],
        "flux-gguf": [],
    }

    table = render_models(models=models, redis_url=server.url, cache=tmp_path / "cache.json")
    assert table.returncode == 0 and table.stderr == "", table.stderr
    lines = table.stdout.splitlines()
    for name, row in found.items():
        [line] = [line for line in lines if line.split()[:1] == [name]]
        assert row["kind"] in line.split() and (row["sha256"] or "-") in line.split()
    assert "gpu0@host, gpu1@host" in next(line for line in lines if line.split()[:1] == ["sd15-file"])

    away = f"redis://127.0.0.1:{free_port()}/0"
    alone = render_models(models=models, redis_url=away, cache=tmp_path / "cache.json")
    assert alone.returncode == 0
    assert alone.stderr.count("\n") == 1 and "cannot reach" in alone.stderr
    listed = [line.split() for line in alone.stdout.splitlines() if line.split()[:1] in ([name] for name in models)]
    assert len(listed) == len(models) and all("?" in cells for cells in listed)


def test_a_second_listing_reads_digests_from_the_cache_until_the_file_changes(
    files: dict[str, Path], server: RedisServer, tmp_path: Path
) -> None:
    models = {"sd15-file": allowlist(files)["sd15-file"]}
    cache = tmp_path / "sub" / "sha256.json"
    real = sha256(files["sd15-file"])
    assert (
        rows(render_models("--json", models=models, redis_url=server.url, cache=cache))["sd15-file"]["sha256"] == real
    )
    entries = json.loads(cache.read_text())
    key = os.path.realpath(files["sd15-file"])
    assert entries[key]["sha256"] == real and entries[key]["size"] == files["sd15-file"].stat().st_size

    # A planted digest comes back as it is: the second run read the cache, not the file.
    entries[key]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    again = rows(render_models("--json", models=models, redis_url=server.url, cache=cache))
    assert again["sd15-file"]["sha256"] == "0" * 64

    stat = files["sd15-file"].stat()
    os.utime(files["sd15-file"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    touched = rows(render_models("--json", models=models, redis_url=server.url, cache=cache))
    assert touched["sd15-file"]["sha256"] == real
    assert json.loads(cache.read_text())[key]["sha256"] == real


def test_check_loads_every_model_and_reports_time_and_memory(
    files: dict[str, Path], server: RedisServer, tmp_path: Path
) -> None:
    models = allowlist(files)
    result = render_models("--check", "--json", models=models, redis_url=server.url, cache=tmp_path / "c.json")
    assert result.returncode == 0, result.stdout + result.stderr
    found = rows(result)
    for name, row in found.items():
        assert (row["check"], row["error"]) == ("ok", None), name
        assert row["load_seconds"] > 0 and row["memory_bytes"] > 0, name
        assert row["cuda_max_allocated_bytes"] is None  # RENDER_DEVICE=cpu
    # The same tiny SD1.5, from one file or from its directory: the same parameters and buffers.
    assert found["sd15-file"]["memory_bytes"] == found["sd15-dir"]["memory_bytes"]


def test_check_exits_1_naming_a_file_cut_short_and_still_checks_the_rest(
    files: dict[str, Path], server: RedisServer, tmp_path: Path
) -> None:
    models = {
        "broken": {"family": "sd15", "file": str(files["truncated"]), "base": str(files["sd15-base"])},
        "tiny-sd15": {"family": "sd15", "source": "tiny"},
    }
    result = render_models("--check", models=models, redis_url=server.url, cache=tmp_path / "c.json")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "FAILED" in next(line for line in lines if line.split()[:1] == ["broken"]).split()
    assert "ok" in next(line for line in lines if line.split()[:1] == ["tiny-sd15"]).split()
    [failure] = [line for line in lines if line.startswith("RENDER_MODELS: model 'broken': ")]
    assert "cut short" in failure or "truncated" in failure, failure
