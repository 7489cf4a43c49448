"""Samplers and clip skip on the real tiny pipelines: what the UNet gets at every call, the steps counted,
reproducibility, per-job hygiene, and what the manifest and the PNG record."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer import RenderSpec, SpecError
from producer.spec import MAX_STEPS, SCHEDULERS
from tests.helpers import UNetCalls, pixels
from worker.engine.inputs import load_inputs
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.models.flow_sampling import FLOW_SAMPLERS
from worker.models.registry import ModelRegistry
from worker.models.sampling import SAMPLERS, make_scheduler
from worker.settings import WorkerSettings
from worker.storage import LocalStorage

MODELS = ["tiny-sd15", "tiny-sdxl"]
TWO_CALLS_A_STEP = {"heun"}  # Heun: a predictor and a corrector call per step, one call for the last step


def make_spec(model: str = "tiny-sd15", **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": "a lighthouse at dusk", "num_inference_steps": 6, "width": 64, "height": 64}
    return RenderSpec.parse({**data, "seed": 99, **overrides})


def expected_batches(scheduler: str, *, steps: int, run: int, guided_until: int, n: int) -> list[int]:
    """The UNet batch at every call when `run` of `steps` steps run and CFG is on through step `guided_until`."""
    calls: list[int] = []
    for step in range(run):
        per_step = 2 if scheduler in TWO_CALLS_A_STEP and step < steps - 1 else 1
        calls += [2 * n if step <= guided_until else n] * per_step
    return calls


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "out")


def test_every_scheduler_name_in_the_spec_has_a_sampler_of_some_family() -> None:
    assert set(SCHEDULERS) - {"default"} == set(SAMPLERS) | set(FLOW_SAMPLERS)


def most_steps_the_spec_allows(scheduler: str) -> int:
    def valid(steps: int) -> bool:
        try:
            make_spec(scheduler=scheduler, num_inference_steps=steps)
        except SpecError:
            return False
        return True

    return max(steps for steps in range(1, MAX_STEPS + 1) if valid(steps))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("scheduler", ["default", *sorted(SAMPLERS)])
def test_the_spec_allows_exactly_the_step_counts_each_sampler_runs(
    registry: ModelRegistry, model: str, scheduler: str
) -> None:
    """Against diffusers' own schedulers on the checkpoint's config: the fewest and the most steps the spec allows
    set a schedule, and where the spec stops short of MAX_STEPS (LCM: `original_inference_steps`, 50), one more
    step does not."""
    checkpoint = registry.pipeline(model).scheduler
    most = most_steps_the_spec_allows(scheduler)
    for steps in (1, most):
        sampler, _ = make_scheduler(scheduler, checkpoint)
        sampler.set_timesteps(steps)
        assert len(sampler.timesteps) >= steps
    if most < MAX_STEPS:
        with pytest.raises(ValueError):
            make_scheduler(scheduler, checkpoint)[0].set_timesteps(most + 1)
    assert most == (50 if scheduler == "lcm" else MAX_STEPS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("scheduler", sorted(SAMPLERS))
def test_cutoff_and_budget_count_sampler_steps_for_every_scheduler(
    registry: ModelRegistry, storage: LocalStorage, model: str, scheduler: str
) -> None:
    spec = make_spec(
        model,
        scheduler=scheduler,
        num_images=2,
        callbacks=[{"type": "cfg_cutoff", "step_index": 1}, {"type": "step_budget", "max_steps": 4}],
    )
    with UNetCalls(registry.pipeline(model)) as unet:
        manifest = render(spec, registry=registry, storage=storage)
    # Steps 0-1 guided (batch 4), 2-3 not (batch 2); the budget interrupts after step 3, a whole step.
    assert unet.batches == expected_batches(scheduler, steps=6, run=4, guided_until=1, n=2)
    assert (manifest.status, manifest.interrupted_by) == ("interrupted", "max_steps")
    assert (manifest.steps_planned, manifest.steps_completed) == (6, 4)
    assert manifest.scheduler is not None and manifest.scheduler.name == scheduler
    assert manifest.scheduler.diffusers_class == SAMPLERS[scheduler].cls.__name__


@pytest.mark.parametrize("model", MODELS)
def test_heun_runs_every_step_with_frames_at_sampler_steps(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    spec = make_spec(model, scheduler="heun", callbacks=[{"type": "frames", "every": 2, "size": 32}])
    with UNetCalls(registry.pipeline(model)) as unet:
        manifest = render(spec, registry=registry, storage=storage)
    assert len(unet.batches) == 2 * 6 - 1
    assert (manifest.status, manifest.steps_planned, manifest.steps_completed) == ("succeeded", 6, 6)
    assert [Path(url).name for url in manifest.frames] == ["step-002.png", "step-004.png", "step-006.png"]


def test_a_ratio_cutoff_on_heun_counts_steps_not_model_calls(registry: ModelRegistry, storage: LocalStorage) -> None:
    spec = make_spec(scheduler="heun", num_inference_steps=10, callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.4}])
    with UNetCalls(registry.pipeline("tiny-sd15")) as unet:
        render(spec, registry=registry, storage=storage)
    # int(10 * 0.4) = 4: steps 0-4 guided, as for a one-call-a-step sampler (not int(19 * 0.4) = 7 calls).
    assert unet.batches == expected_batches("heun", steps=10, run=10, guided_until=4, n=1)


@pytest.mark.parametrize("scheduler", ["euler", "heun"])
def test_ip_adapter_cutoff_counts_sampler_steps(
    registry: ModelRegistry, tmp_path: Path, storage: LocalStorage, scheduler: str
) -> None:
    style = tmp_path / "style.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(style)
    spec = make_spec(
        scheduler=scheduler,
        ip_adapter={"image": style.as_uri(), "scale": 0.5},
        callbacks=[{"type": "ip_adapter_scale_cutoff", "step_index": 2}],
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    with UNetCalls(registry.pipeline("tiny-sd15")) as unet:
        render(JobContext(spec, inputs=inputs), registry=registry, storage=storage)
    per_step = 2 if scheduler == "heun" else 1
    calls_in_steps_0_to_2 = 3 * per_step
    assert unet.ip_scales[:calls_in_steps_0_to_2] == [0.5] * calls_in_steps_0_to_2
    assert set(unet.ip_scales[calls_in_steps_0_to_2:]) == {0.0}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_sde_karras"])
def test_samplers_that_draw_noise_every_step_are_reproducible(
    registry: ModelRegistry, storage: LocalStorage, model: str, scheduler: str
) -> None:
    """Ancestral and SDE samplers draw fresh noise at every step, from the job's own seeded generators."""
    spec = make_spec(model, scheduler=scheduler, num_images=2)
    first, second = (render(spec, registry=registry, storage=storage) for _ in range(2))
    for a, b in zip(first.images, second.images, strict=True):
        assert pixels(storage, a) == pixels(storage, b)
    other_seed = render(
        make_spec(model, scheduler=scheduler, num_images=2, seed=100), registry=registry, storage=storage
    )
    assert pixels(storage, other_seed.images[0]) != pixels(storage, first.images[0])


@pytest.mark.parametrize("model", MODELS)
def test_each_sampler_gives_its_own_image_and_the_next_job_gets_the_checkpoints_back(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    pipe = registry.pipeline(model)
    checkpoint_scheduler = pipe.scheduler
    before = pixels(storage, render(make_spec(model), registry=registry, storage=storage).images[0])
    seen = {before}
    for scheduler in sorted(SAMPLERS):
        image = pixels(
            storage, render(make_spec(model, scheduler=scheduler), registry=registry, storage=storage).images[0]
        )
        assert pipe.scheduler is checkpoint_scheduler, f"{scheduler} stayed on the pipeline"
        if scheduler != "euler":  # the tiny checkpoints' own scheduler is Euler: same image as default
            assert image not in seen, f"{scheduler} gave the same pixels as another sampler"
        seen.add(image)
    after = pixels(storage, render(make_spec(model), registry=registry, storage=storage).images[0])
    assert after == before


def test_a_sampler_job_that_fails_mid_loop_still_gives_the_scheduler_back(
    registry: ModelRegistry, storage: LocalStorage
) -> None:
    pipe = registry.pipeline("tiny-sd15")
    checkpoint_scheduler = pipe.scheduler

    class Explodes:
        def on_step(self, info: Any) -> None:
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        render(
            JobContext(make_spec(scheduler="dpmpp_2m_karras"), hooks=[Explodes()]), registry=registry, storage=storage
        )
    assert pipe.scheduler is checkpoint_scheduler


@pytest.mark.parametrize("model", MODELS)
def test_clip_skip_changes_the_image_and_is_bounded_by_the_encoder(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    plain = render(make_spec(model), registry=registry, storage=storage)
    skipped = render(make_spec(model, clip_skip=1), registry=registry, storage=storage)
    assert pixels(storage, plain.images[0]) != pixels(storage, skipped.images[0])
    assert skipped.clip_skip == 1
    with pytest.raises(
        SpecError, match=r"^clip_skip: 'tiny-.*' has 2 text-encoder layers, so clip_skip can be at most 1"
    ):
        render(make_spec(model, clip_skip=2), registry=registry, storage=storage)


def test_png_parameters_follow_the_a1111_layout(registry: ModelRegistry, storage: LocalStorage) -> None:
    spec = make_spec(scheduler="dpmpp_2m_karras", clip_skip=1, negative_prompt="fog", guidance_scale=7.0)
    manifest = render(spec, registry=registry, storage=storage)
    data = storage.get(manifest.images[0].removeprefix(storage.base_url + "/"))
    assert data is not None
    text = Image.open(io.BytesIO(data)).info["parameters"]
    prompt, negative, settings = text.split("\n")
    assert prompt == "a lighthouse at dusk" and negative == "Negative prompt: fog"
    assert settings.startswith("Steps: 6, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 99, Size: 64x64, ")
    assert "Model: tiny-sd15, Clip skip: 2, Version: render-farm " in settings


def test_the_default_scheduler_is_recorded_by_its_class(registry: ModelRegistry, storage: LocalStorage) -> None:
    manifest = render(make_spec(), registry=registry, storage=storage)
    assert manifest.scheduler is not None
    assert (manifest.scheduler.name, manifest.scheduler.label) == ("default", "Euler")
    assert manifest.scheduler.diffusers_class == "EulerDiscreteScheduler"


def test_sd15_clip_skip_embeddings_are_made_as_diffusers_makes_them(registry: ModelRegistry) -> None:
    """With nothing skipped, the embeddings made here equal diffusers' own encode_prompt, bit for bit."""
    import torch

    from worker.models.sampling import _skipped_embeddings

    pipe = registry.pipeline("tiny-sd15")
    with torch.inference_mode():
        ours = _skipped_embeddings(pipe, "a lighthouse at dusk", 0)
        theirs, _ = pipe.encode_prompt("a lighthouse at dusk", "cpu", 1, False)
    assert torch.equal(ours, theirs)


def test_diffusers_own_sd15_clip_skip_still_needs_the_workaround(registry: ModelRegistry) -> None:
    """Fails the day diffusers stops reading `text_encoder.text_model` (gone in transformers 5): then drop
    `worker.models.sampling._skipped_embeddings` and pass `clip_skip` to SD 1.5 as to SDXL."""
    pipe = registry.pipeline("tiny-sd15")
    with pytest.raises(AttributeError, match="text_model"):
        pipe.encode_prompt("a lighthouse", "cpu", 1, False, clip_skip=1)


@pytest.mark.parametrize("model", MODELS)
def test_no_lora_then_lora_then_no_lora_through_render_gives_equal_first_and_last_bytes(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    first = render(make_spec(model, scheduler="dpmpp_2m_karras"), registry=registry, storage=storage)
    lora = make_spec(model, scheduler="dpmpp_2m_karras", loras=[{"name": "tiny-lora", "scale": 0.8}])
    middle = render(lora, registry=registry, storage=storage)
    last = render(make_spec(model, scheduler="dpmpp_2m_karras"), registry=registry, storage=storage)
    assert pixels(storage, first.images[0]) == pixels(storage, last.images[0])
    assert pixels(storage, middle.images[0]) != pixels(storage, first.images[0])
    assert [(r.name, r.scale) for r in middle.loras] == [("tiny-lora", 0.8)] and first.loras == last.loras == []
