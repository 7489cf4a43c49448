"""The GPU thread owns the models: job threads load nothing and never wait on its lock; its death ends the process."""

from __future__ import annotations

import threading
from pathlib import Path

import safetensors.torch
import torch

from producer import RenderSpec
from tests.helpers import wait_until
from worker.engine.job import JobContext
from worker.engine.rendering import check_supported, prepare
from worker.models import tiny_sd15
from worker.models.loras import tiny_state_dict
from worker.models.registry import ModelRegistry
from worker.process.gpu import GpuRunner
from worker.settings import LoraSource, default_models
from worker.storage import LocalStorage

SPEC = {"model": "tiny-sd15", "prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64}


def fresh_registry(loras: dict[str, LoraSource] | None = None) -> ModelRegistry:
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, loras=loras)


def test_a_job_thread_s_checks_load_no_model_and_no_ip_adapter() -> None:
    """An IP-Adapter job's checks used to build the tiny pipeline (and read adapter weights) on the job's thread,
    under the lock the GPU thread loads under."""
    registry = fresh_registry()
    image = (  # a 1x1 PNG: the check reads no input
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="
    )
    check_supported(RenderSpec.parse(SPEC | {"ip_adapter": {"image": image, "scale": 0.5}}), registry)
    assert registry.loads == {} and registry.loaded_models() == []


def test_a_job_thread_s_lora_checks_never_wait_for_the_registry_lock(tmp_path: Path) -> None:
    """The GPU thread holds the registry's lock while it loads a model (minutes for a real one): a job's LoRA
    checks, which read the file's header and hash it, go on meanwhile."""
    path = tmp_path / "style.safetensors"
    safetensors.torch.save_file(tiny_state_dict(tiny_sd15.build()), path)
    registry = fresh_registry({"style": LoraSource(family="sd15", path=str(path))})
    spec = RenderSpec.parse(SPEC | {"loras": [{"name": "style", "scale": 0.8}]})
    checked = threading.Event()

    def check() -> None:
        check_supported(spec, registry)
        checked.set()

    with registry._lock:  # what the GPU thread holds while it loads
        worker = threading.Thread(target=check, daemon=True)
        worker.start()
        assert checked.wait(60), "the job thread's LoRA check waited for the registry lock"


def test_a_gpu_thread_that_dies_fails_its_jobs_and_ends_the_process(tmp_path: Path) -> None:
    """Whatever kills the GPU thread (here the call hook it runs outside any job's try), the jobs waiting on it get
    the cause instead of waiting forever, and the process exits non-zero so that it restarts."""
    exits: list[int] = []

    def broken(ids: list[str]) -> None:
        raise RuntimeError("the advert's Redis client broke")

    registry = fresh_registry()
    runner = GpuRunner(registry, on_call=broken, exit_process=exits.append)
    prepared = prepare(JobContext(RenderSpec.parse(SPEC), "doomed"), registry, LocalStorage(tmp_path))
    outcome = []
    job = threading.Thread(target=lambda: outcome.append(runner.run(prepared)), daemon=True)
    job.start()
    wait_until(lambda: exits == [70], timeout=60, what="the process to be ended")
    job.join(60)
    assert not job.is_alive(), "the job thread still waits on a dead GPU thread"
    (denoised,) = outcome
    assert isinstance(denoised.error, RuntimeError) and "GPU thread died" in str(denoised.error)
    assert "the advert's Redis client broke" in str(denoised.error)
