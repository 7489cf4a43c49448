"""Single-file and GGUF models through a real worker process: RENDER_MODELS entries with `file` + `base`.

A whole original-layout SD 1.5 checkpoint renders the same pixels as the pipeline it was written from, saved as a
diffusers directory; a Q8_0 GGUF Flux.1 transformer renders close to (not equal to) its directory model. A worker
whose RENDER_MODELS names a file that cannot work (cut short, of another family, without `base`) exits 2 at start
with one line naming the model, and takes nothing from the queue.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.keys import model_queue, priority_lists, worker_key
from tests.integration.conftest import Farm, spec
from tests.integration.test_microbatch import image
from tests.single_files import truncate, write_diffusers_transformer, write_gguf_transformer, write_sd15_checkpoint
from worker.models import tiny_flux, tiny_sd15

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The Q8_0 image against the directory model's, measured on this test's spec (tiny Flux.1, 4 steps, 64x64, seed 7,
# CPU): max |diff| 1 of 255, PSNR 57.4 dB. The bounds leave room for another machine's float rounding; a transformer
# quantized wrongly (Q4_0 where Q8_0 was asked, a scale lost) lands far outside them.
GGUF_MAX_DIFF = 4
GGUF_MIN_PSNR = 50.0


@dataclass(frozen=True)
class Files:
    """The models written once for the module: two base directories and the files made from the same pipelines."""

    sd15_dir: Path
    sd15_file: Path
    flux_dir: Path
    flux_gguf: Path
    flux_transformer: Path
    cut_short: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("model-files")
    sd15, flux = tiny_sd15.build(), tiny_flux.build()
    sd15.save_pretrained(root / "sd15")
    flux.save_pretrained(root / "flux")
    whole = write_sd15_checkpoint(sd15, root / "sd15.safetensors")
    return Files(
        sd15_dir=root / "sd15",
        sd15_file=whole,
        flux_dir=root / "flux",
        flux_gguf=write_gguf_transformer(flux, root / "flux-Q8_0.gguf", quantization="Q8_0"),
        flux_transformer=write_diffusers_transformer(flux, root / "flux-transformer.safetensors"),
        cut_short=truncate(whole, root / "sd15-cut-short.safetensors"),
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_a_whole_sd15_file_renders_as_its_directory_and_a_gguf_flux_close_to_its_directory(
    farm_factory: Callable[[], Farm], files: Files
) -> None:
    served = {
        "sd15-file": {"family": "sd15", "file": str(files.sd15_file), "base": str(files.sd15_dir)},
        "sd15-dir": {"family": "sd15", "source": str(files.sd15_dir)},
        "flux-gguf": {"family": "flux", "file": str(files.flux_gguf), "base": str(files.flux_dir)},
        "flux-dir": {"family": "flux", "source": str(files.flux_dir)},
    }
    farm = farm_factory()
    farm.start_workers("files", models=json.dumps(served), max_cached_models="4")
    handles = farm.client.submit_many([spec(model=name, seed=7, num_inference_steps=4) for name in served])
    manifests = dict(zip(served, farm.finish(handles), strict=True))

    for name, manifest in manifests.items():
        assert manifest.status == "succeeded", (name, manifest.error)
        assert manifest.spec["model"] == name and manifest.family == served[name]["family"]
        assert len(manifest.images) == 1
    pixels = {name: image(farm, manifest.images[0]) for name, manifest in manifests.items()}

    assert np.array_equal(pixels["sd15-file"], pixels["sd15-dir"]), "the whole SD 1.5 file rendered other pixels"
    gguf, full = pixels["flux-gguf"], pixels["flux-dir"]
    assert gguf.shape == full.shape
    diff, quality = int(np.abs(gguf - full).max()), psnr(gguf, full)
    assert diff > 0, "the GGUF image equals the directory model's: the transformer was not quantized"
    assert diff <= GGUF_MAX_DIFF and quality >= GGUF_MIN_PSNR, f"max |diff| {diff}, PSNR {quality:.1f} dB"


REFUSALS: dict[str, Callable[[Files], dict[str, Any]]] = {
    "cut-short": lambda f: {"family": "sd15", "file": str(f.cut_short), "base": str(f.sd15_dir)},
    "flux-as-sdxl": lambda f: {"family": "sdxl", "file": str(f.flux_transformer), "base": str(f.flux_dir)},
    "no-base": lambda f: {"family": "sd15", "file": str(f.sd15_file)},
}
# What the one line says besides the model's name: the problem and the fix.
SAYS = {
    "cut-short": ["sd15-cut-short.safetensors is cut short", "download it again"],
    "flux-as-sdxl": ['says "family": "sdxl"', "holds a flux", 'set "family" to "flux"'],
    "no-base": ['needs "base"', "add it"],
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_worker_with_a_file_model_that_cannot_work_exits_2_naming_it_and_takes_nothing(
    farm_factory: Callable[[], Farm], files: Files, name: str
) -> None:
    farm = farm_factory()
    queued = farm.client.submit(spec(model=name), wait_for_worker=True)
    lists = priority_lists(model_queue("render", name))
    before = {key: farm.redis.llen(key) for key in lists.values()}
    assert sum(before.values()) == 1

    (refused,) = farm.start_workers("refused", ready=False, models=json.dumps({name: REFUSALS[name](files)}))
    assert refused.process is not None
    assert refused.process.wait(timeout=120) == 2, refused.log_path.read_text()[-2000:]

    log = refused.log_path.read_text()
    assert log.count("\n") == 1, f"not one line: {log[-2000:]}"
    assert log.startswith(f"error: RENDER_MODELS: model {name!r}"), log
    for phrase in SAYS[name]:
        assert phrase in log, log
    assert {key: farm.redis.llen(key) for key in lists.values()} == before, "the refused worker took the job"
    assert farm.client.status(queued.task_id).state == "queued"
    assert not farm.redis.exists(worker_key(refused.hostname)), "the refused worker advertised itself"
