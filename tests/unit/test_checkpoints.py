"""Checkpoints and resume through the real diffusers loop: a resumed job's image is byte for byte the one an
uninterrupted run makes, for every sampler and pipeline; a checkpoint that cannot be used is ignored."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer import RenderSpec
from producer.keys import checkpoint_object, image_object, manifest_object
from producer.manifest import Manifest
from tests.helpers import Gate, pipeline_spec, png, wait_until
from worker.engine.batching import denoise_batch, shared_call_key
from worker.engine.callbacks import StepInfo
from worker.engine.checkpoints import FORMAT, Checkpoint, CheckpointUnsupported, decode, encode, scheduler_state
from worker.engine.drain import Drain
from worker.engine.inputs import load_inputs
from worker.engine.job import JobContext
from worker.engine.rendering import Denoised, denoise, prepare, render, store
from worker.engine.stops import HandedOff, LeaseLost
from worker.models.registry import ModelRegistry
from worker.models.sampling import SAMPLERS, make_scheduler
from worker.process.gpu import GpuRunner
from worker.settings import WorkerSettings
from worker.storage import LocalStorage, Storage

EVERY_STEP = 1e-9  # checkpoint at every step's end
TASK = "resume-me"


class LoseLeaseAt:
    """The attempt ends at `step` with nothing written, as when its worker dies: only its checkpoints remain.

    It first waits for the checkpoints already handed to the writer, so the last is of step `step - 1` (a real
    crash may lose the one still being written: a resume then starts from the one before).
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.writer: Any = None

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed >= self.step:
            if self.writer is not None:
                self.writer.flush()
            raise LeaseLost(info.steps_completed, "render:lease:test")


def interrupted_at(step: int, spec: RenderSpec, registry: ModelRegistry, storage: Storage, **job: Any) -> None:
    """A first attempt stopped at `step`, checkpointing every step: its last checkpoint is of step `step - 1`."""
    stop = LoseLeaseAt(step)
    context = JobContext(spec, TASK, hooks=[stop], checkpoint_seconds=EVERY_STEP, **job)
    prepared = prepare(context, registry, storage)
    stop.writer = prepared.record.checkpoints
    with pytest.raises(LeaseLost):
        store(prepared, denoise(prepared, registry), storage)
    assert storage.get(checkpoint_object(TASK)) is not None, "the stopped attempt left its checkpoint"


def resumed(spec: RenderSpec, registry: ModelRegistry, storage: Storage, **job: Any) -> Manifest:
    return render(JobContext(spec, TASK, attempt=2, **job), registry=registry, storage=storage)


def image_bytes(storage: Storage, manifest: Manifest) -> list[bytes]:
    found = [storage.get(image_object(manifest.task_id, i)) for i in range(len(manifest.images))]
    assert all(data is not None for data in found)
    return [data for data in found if data is not None]


def check_resume(registry: ModelRegistry, tmp_path: Path, spec: RenderSpec, stop_at: int, **job: Any) -> Manifest:
    """Render `spec` uninterrupted and as a job stopped at `stop_at` then resumed; the same bytes both ways."""
    whole_storage, storage = LocalStorage(tmp_path / "whole"), LocalStorage(tmp_path / "resumed")
    whole = render(JobContext(spec, TASK, **job), registry=registry, storage=whole_storage)
    interrupted_at(stop_at, spec, registry, storage, **job)
    manifest = resumed(spec, registry, storage, checkpoint_seconds=EVERY_STEP, **job)
    assert manifest.status == whole.status == "succeeded"
    assert manifest.resumed_from_step == stop_at - 1 and whole.resumed_from_step is None
    assert manifest.seed == whole.seed and manifest.steps_completed == whole.steps_completed
    assert image_bytes(storage, manifest) == image_bytes(whole_storage, whole), "the resumed image differs"
    assert storage.get(checkpoint_object(TASK)) is None, "a final state deletes the checkpoint"
    return manifest


def spec_of(**overrides: Any) -> RenderSpec:
    data = {"model": "tiny-sd15", "prompt": "a lighthouse at dusk", "num_inference_steps": 10}
    return RenderSpec.parse({**data, "width": 64, "height": 64, "seed": 11, **overrides})


@pytest.mark.parametrize("scheduler", ["default", *SAMPLERS])
def test_a_resumed_job_makes_the_uninterrupted_image_byte_for_byte_with_every_sampler(
    registry: ModelRegistry, tmp_path: Path, scheduler: str
) -> None:
    check_resume(registry, tmp_path, spec_of(scheduler=scheduler, num_images=2), stop_at=6)


@pytest.mark.parametrize("scheduler", ["euler_a", "heun", "dpmpp_2m_sde_karras", "unipc"])
def test_sdxl_resumes_byte_for_byte_with_guidance_cut_off_before_the_checkpoint(
    registry: ModelRegistry, tmp_path: Path, scheduler: str
) -> None:
    callbacks = [{"type": "cfg_cutoff", "step_index": 3}, {"type": "step_budget", "max_seconds": 600}]
    spec = spec_of(model="tiny-sdxl", scheduler=scheduler, callbacks=callbacks)
    check_resume(registry, tmp_path, spec, stop_at=7)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_image_pipelines_resume_byte_for_byte(registry: ModelRegistry, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    spec = pipeline_spec(kind, folder, scheduler="dpmpp_2m", strength=0.8) if kind != "controlnet" else None
    spec = spec or pipeline_spec(kind, folder, scheduler="dpmpp_2m")
    settings = WorkerSettings(input_roots=[str(folder)], max_input_bytes=200_000, max_input_pixels=1024 * 1024)
    check_resume(registry, tmp_path, spec, stop_at=5, inputs=load_inputs(spec, settings))


def test_ip_adapter_cut_off_before_the_checkpoint_stays_off_after_the_resume(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    style = png(folder / "style.png", (48, 40))
    spec = pipeline_spec(
        "text2img",
        folder,
        ip_adapter={"image": style, "scale": 0.7},
        callbacks=[{"type": "ip_adapter_scale_cutoff", "step_index": 2}],
    )
    settings = WorkerSettings(input_roots=[str(folder)], max_input_bytes=200_000, max_input_pixels=1024 * 1024)
    check_resume(registry, tmp_path, spec, stop_at=6, inputs=load_inputs(spec, settings))


def test_frames_stored_before_the_checkpoint_are_kept_and_the_rest_match_an_uninterrupted_run(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    spec = spec_of(callbacks=[{"type": "frames", "every": 2}])
    manifest = check_resume(registry, tmp_path, spec, stop_at=6)
    whole_storage, storage = LocalStorage(tmp_path / "whole"), LocalStorage(tmp_path / "resumed")
    names = [storage.name_of(url) for url in manifest.frames]
    assert names == [f"{TASK}/frames/step-{step:03d}.png" for step in (2, 4, 6, 8, 10)]
    for name in names:
        assert name is not None and storage.get(name) == whole_storage.get(name), name


def test_a_job_without_a_seed_resumes_with_the_seed_its_first_attempt_drew(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    spec = spec_of(seed=None)
    interrupted_at(5, spec, registry, storage)
    data = storage.get(checkpoint_object(TASK))
    assert data is not None
    first_seed = decode(data).seed
    assert resumed(spec, registry, storage).seed == first_seed


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: b"not a checkpoint at all",
        lambda data: encode_other_format(data),
    ],
    ids=["truncated", "garbage", "other-format"],
)
def test_a_checkpoint_that_cannot_be_read_is_ignored_with_a_log_line_and_the_job_starts_fresh(
    registry: ModelRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    spec = spec_of(scheduler="euler_a")
    whole_storage, storage = LocalStorage(tmp_path / "whole"), LocalStorage(tmp_path / "resumed")
    whole = render(JobContext(spec, TASK), registry=registry, storage=whole_storage)
    interrupted_at(6, spec, registry, storage)
    data = storage.get(checkpoint_object(TASK))
    assert data is not None
    storage.put(checkpoint_object(TASK), damage(data), "application/octet-stream")
    with caplog.at_level(logging.WARNING, logger="worker.engine.checkpoints"):
        manifest = resumed(spec, registry, storage)
    assert manifest.resumed_from_step is None and manifest.status == "succeeded"
    assert image_bytes(storage, manifest) == image_bytes(whole_storage, whole)
    assert any("checkpoint ignored" in record.getMessage() for record in caplog.records)
    assert storage.get(checkpoint_object(TASK)) is None


def encode_other_format(data: bytes) -> bytes:
    checkpoint = decode(data)
    raw = {**vars(checkpoint), "format": FORMAT + 1}
    buffer = io.BytesIO()
    torch.save(raw, buffer)
    return buffer.getvalue()


def test_a_checkpoint_of_another_spec_is_not_resumed(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    interrupted_at(5, spec_of(prompt="a lighthouse"), registry, storage)
    assert resumed(spec_of(prompt="a windmill"), registry, storage).resumed_from_step is None


def test_a_first_attempt_never_reads_a_checkpoint(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    interrupted_at(5, spec_of(), registry, storage)
    manifest = render(JobContext(spec_of(), TASK), registry=registry, storage=storage)
    assert manifest.resumed_from_step is None


def test_checkpoints_round_trip_and_capture_every_offered_samplers_state(registry: ModelRegistry) -> None:
    pipe = registry.pipeline("tiny-sd15")
    for name in SAMPLERS:
        scheduler, _ = make_scheduler(name, pipe.scheduler)
        scheduler.set_timesteps(10)
        state = scheduler_state(scheduler)  # raises CheckpointUnsupported for state it cannot hold
        assert state, name
    checkpoint = Checkpoint(
        step=3,
        latents=torch.ones(1, 4, 8, 8),
        scheduler=state,
        scheduler_class="X",
        generators=[torch.Generator().manual_seed(1).get_state()],
        seed=5,
        spec_digest="d",
    )
    back = decode(encode(checkpoint))
    assert back.step == 3 and back.seed == 5 and torch.equal(back.latents, checkpoint.latents)
    assert torch.equal(back.generators[0], checkpoint.generators[0])


def test_the_steps_before_the_checkpoint_are_replayed_without_running_the_unet(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    spec = spec_of(scheduler="euler")
    interrupted_at(6, spec, registry, storage)
    conv_in = registry.pipeline("tiny-sd15").unet.conv_in  # runs once per real UNet call (both CFG halves in one)
    calls: list[int] = []
    handle = conv_in.register_forward_hook(lambda *_: calls.append(1))
    try:
        manifest = resumed(spec, registry, storage)
    finally:
        handle.remove()
    assert manifest.resumed_from_step == 5 and len(calls) == 10 - 5
    assert "forward" not in vars(registry.pipeline("tiny-sd15").unet), "the UNet is itself again after the resume"


class DrainAt:
    """SIGTERM at `step`: the worker's drain begins with no time left, so the job must leave at once."""

    def __init__(self, drain: Drain, step: int) -> None:
        self.drain, self.step = drain, step

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed >= self.step:
            self.drain.begin(0.0)


@pytest.mark.parametrize("scheduler", ["heun", "dpmpp_2m_sde_karras"])
def test_a_drained_job_checkpoints_at_its_step_end_is_handed_off_and_resumes_byte_for_byte(
    registry: ModelRegistry, tmp_path: Path, scheduler: str
) -> None:
    spec = spec_of(scheduler=scheduler)
    whole_storage, storage = LocalStorage(tmp_path / "whole"), LocalStorage(tmp_path / "resumed")
    whole = render(JobContext(spec, TASK), registry=registry, storage=whole_storage)
    drain = Drain()
    job = JobContext(spec, TASK, hooks=[DrainAt(drain, 4)], drain=drain)  # no periodic checkpoints
    prepared = prepare(job, registry, storage)
    with pytest.raises(HandedOff) as handed:
        store(prepared, denoise(prepared, registry), storage)
    assert handed.value.steps_completed == 4 and storage.get(manifest_object(TASK)) is None
    manifest = resumed(spec, registry, storage)
    assert manifest.resumed_from_step == 4 and image_bytes(storage, manifest) == image_bytes(whole_storage, whole)


def test_a_drain_hands_off_a_job_that_will_not_finish_in_time_and_keeps_one_that_will() -> None:
    now = [100.0]
    drain = Drain(clock=lambda: now[0])
    info = StepInfo("t", steps_completed=10, steps_planned=30, elapsed=5.0)  # 0.5 s a step: 10 s left
    assert not drain.leaves(info), "no drain yet"
    drain.begin(20.0)
    assert not drain.leaves(info), "done in 10 s, within the 20 s"
    drain.begin(1.0)  # a second begin keeps the first deadline
    now[0] = 111.0
    assert drain.leaves(info), "10 s left at 111 s: past the deadline of 120 s"
    now[0] = 121.0
    assert drain.leaves(StepInfo("t", steps_completed=29, steps_planned=30, elapsed=1.0)), "past the deadline"


def test_a_drained_gpu_hands_back_the_jobs_waiting_for_it_and_any_queued_later(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    runner = GpuRunner(registry)
    gate = Gate()
    first = prepare(JobContext(spec_of(), "first", hooks=[gate]), registry, storage)
    waiting = prepare(JobContext(spec_of(seed=2), "waiting"), registry, storage)
    late = prepare(JobContext(spec_of(seed=3), "late"), registry, storage)
    outcomes: dict[str, Denoised] = {}
    running = threading.Thread(target=lambda: outcomes.update(first=runner.run(first)))
    running.start()
    assert gate.reached.wait(60)
    queued = threading.Thread(target=lambda: outcomes.update(waiting=runner.run(waiting)))
    queued.start()
    wait_until(lambda: len(runner._waiting) == 1, timeout=60, what="a job waiting for the GPU")
    runner.drain()
    queued.join(60)
    assert isinstance(outcomes["waiting"].stop, HandedOff)
    assert isinstance(runner.run(late).stop, HandedOff)
    gate.open.set()
    running.join(60)
    assert outcomes["first"].pixels is not None, "the call in flight goes on: its own hooks decide"
    assert runner.calls == [["first"]]


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a", "heun"])
def test_jobs_handed_off_from_a_batch_checkpoint_their_own_rows_and_resume_alone_as_their_image_alone(
    registry: ModelRegistry, tmp_path: Path, scheduler: str
) -> None:
    storage, alone_storage = LocalStorage(tmp_path / "batch"), LocalStorage(tmp_path / "alone")
    specs = [
        spec_of(scheduler=scheduler, seed=40 + i, num_images=1 + i % 2, prompt=f"a lighthouse {i}") for i in range(3)
    ]
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [
        render(JobContext(spec, f"job-{i}"), registry=registry, storage=alone_storage) for i, spec in enumerate(specs)
    ]
    drain = Drain()
    prepared = [
        prepare(JobContext(spec, f"job-{i}", hooks=[DrainAt(drain, 4)], drain=drain), registry, storage)
        for i, spec in enumerate(specs)
    ]
    for outcome in denoise_batch(prepared, registry):
        assert isinstance(outcome.stop, HandedOff) and outcome.stop.steps_completed == 4
    for i, spec in enumerate(specs):
        manifest = render(JobContext(spec, f"job-{i}", attempt=2), registry=registry, storage=storage)
        assert manifest.resumed_from_step == 4 and manifest.batched_with == []
        got = [Image.open(io.BytesIO(data)) for data in image_bytes(storage, manifest)]
        want = [Image.open(io.BytesIO(data)) for data in image_bytes(alone_storage, expected[i])]
        assert max_diff(got, want) <= 1, f"job {i}: its first steps ran batched (float noise), the rest alone"


def max_diff(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b, strict=True))


def test_a_drained_job_whose_sampler_state_cannot_be_captured_is_still_handed_off(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise CheckpointUnsupported("FancyScheduler.noise_sampler holds a BrownianTree")

    monkeypatch.setattr("worker.engine.callbacks.checkpoint.scheduler_state", refuse)
    storage = LocalStorage(tmp_path)
    drain = Drain()
    prepared = prepare(JobContext(spec_of(), TASK, hooks=[DrainAt(drain, 3)], drain=drain), registry, storage)
    with caplog.at_level(logging.WARNING, logger="worker.engine.callbacks.checkpoint"):
        outcome = denoise(prepared, registry)
    assert isinstance(outcome.stop, HandedOff) and outcome.stop.steps_completed == 3
    assert storage.get(checkpoint_object(TASK)) is None, "no checkpoint: the next attempt starts from step 0"
    assert any("no checkpoints for this job" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "tiny-sd3"])
def test_a_prompt_schedule_and_a_guidance_curve_resume_byte_for_byte_after_a_switch(
    registry: ModelRegistry, tmp_path: Path, model: str
) -> None:
    """Switches at steps 3 (the prompt) and 5 (the negative), checkpoint of step 6: the resume replays both (SD3
    also runs its prompt schedule through a transformer with joint attention)."""
    spec = spec_of(
        model=model,
        prompt="a [cat:dog:0.3] by the sea, (red:1.3) sky",
        negative_prompt="[blurry::5], dark",
        prompt_syntax="a1111",
        guidance={"from": 8, "to": 3, "curve": "cosine"},
        num_images=2,
    )
    check_resume(registry, tmp_path, spec, stop_at=7)
