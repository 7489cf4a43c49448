"""Hires fix and SDXL refiner stages through the real tiny pipelines and the real loop: a second pipeline call after
the first, one callback stack over both (progress, budget, revocation, checkpoints count over all steps), frames
labelled by stage, each stage's steps and times in the manifest, and a resume in the second stage byte for byte."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer import RenderSpec
from producer.errors import SpecError, UnsupportedSpecError
from producer.keys import checkpoint_object
from producer.manifest import Manifest
from tests.helpers import UNetCalls
from tests.unit.test_checkpoints import EVERY_STEP, TASK, image_bytes, interrupted_at, resumed
from worker.engine.batching import shared_call_key
from worker.engine.checkpoints import Checkpoint, decode, encode
from worker.engine.job import JobContext
from worker.engine.outputs import ImageParameters, parameters_text
from worker.engine.rendering import render
from worker.engine.stops import JobRevoked
from worker.hooks import StepInfo
from worker.models import tiny_sdxl
from worker.models.registry import ModelRegistry
from worker.settings import ModelSource, default_models
from worker.storage import LocalStorage, Storage

STEPS = 10


def spec_of(**overrides: Any) -> RenderSpec:
    data = {"model": "tiny-sd15", "prompt": "a lighthouse at dusk", "num_inference_steps": STEPS, "seed": 5}
    return RenderSpec.parse({**data, "width": 64, "height": 64, **overrides})


HIRES = {"hires": {"scale": 1.5, "strength": 0.5}}  # 64 -> 96, 5 steps
REFINER = {"model": "tiny-sdxl", "refiner": {"model": "tiny-sdxl-refiner", "switch_at": 0.7}}


def image_of(storage: Storage, manifest: Manifest, index: int = 0) -> Image.Image:
    data = image_bytes(storage, manifest)[index]
    return Image.open(io.BytesIO(data))


class Steps:
    """A hook that records every StepInfo and, with `revoke_at`, revokes the job at that step (over all stages)."""

    def __init__(self, revoke_at: int | None = None) -> None:
        self.seen: list[StepInfo] = []
        self.revoke_at = revoke_at

    def on_step(self, info: StepInfo) -> None:
        self.seen.append(info)
        if self.revoke_at is not None and info.steps_completed >= self.revoke_at:
            raise JobRevoked(info.steps_completed)


# --- the spec ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({**HIRES, "refiner": {"model": "tiny-sdxl-refiner"}}, "hires, refiner: a job takes one second stage"),
        ({"hires": {"scale": 1.0}}, "hires.scale: must be greater than 1"),
        ({"hires": {"scale": 4.5}}, "hires.scale: must be less than or equal to 4"),
        ({"hires": {"scale": 4}, "width": 640}, "hires.scale: 4 makes 2560x256, over 2048 a side; use a scale of at"),
        ({"hires": {"strength": 0.05, "steps": 10}}, "hires.strength: 0.05 x hires.steps 10 runs no step"),
        ({"hires": {"strength": 0}}, "hires.strength: must be greater than 0"),
        ({"hires": {"steps": 151}}, "hires.steps: must be less than or equal to 150"),
        ({"hires": {"upscaler": "esrgan"}}, "hires.upscaler: must be 'latent' or 'lanczos'"),
        ({"refiner": {"model": "tiny-sdxl-refiner", "switch_at": 1.0}}, "refiner.switch_at: must be less than 1"),
        ({"refiner": {"model": "tiny-sdxl-refiner", "switch_at": 0}}, "refiner.switch_at: must be greater than 0"),
        ({"refiner": {"switch_at": 0.5}}, "refiner.model: Field required"),
    ],
)
def test_the_producer_refuses_a_bad_stage_naming_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec_of(**overrides)
    assert message in str(caught.value)


def test_a_second_stage_follows_text2img_only(tmp_path: Path) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    with pytest.raises(SpecError, match="hires: runs after a text2img stage only; remove it or send pipeline"):
        spec_of(pipeline="img2img", image=image, **HIRES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"refiner": {"model": "tiny-sdxl-refiner"}}, "refiner: 'tiny-sd15' (sd15) takes no refiner"),
        ({"model": "tiny-sdxl", "refiner": {"model": "tiny-sd15"}}, "refiner.model: 'tiny-sd15' is a sd15 model"),
        ({"model": "tiny-sdxl", "refiner": {"model": "nope"}}, "refiner.model: 'nope' is not on this worker's"),
        ({"model": "tiny-flux", "hires": {"upscaler": "latent"}}, "hires.upscaler: 'tiny-flux' (flux) takes 'lanczos'"),
        ({"model": "tiny-sdxl-refiner"}, "model: 'tiny-sdxl-refiner' is an SDXL refiner, which runs img2img only"),
    ],
)
def test_the_worker_refuses_what_the_model_cannot_stage(
    registry: ModelRegistry, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedSpecError, match=re.escape(message)):
        render(spec_of(**overrides), registry=registry, storage=LocalStorage(tmp_path))


def test_jobs_with_a_second_stage_are_never_batched() -> None:
    assert shared_call_key(spec_of()) is not None
    assert shared_call_key(spec_of(**HIRES)) is None
    assert shared_call_key(spec_of(**REFINER)) is None


# --- hires fix -----------------------------------------------------------------------------------------------------


def test_hires_latent_and_lanczos_make_the_upscaled_size_and_differ(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    made = {}
    for upscaler in ("latent", "lanczos"):
        spec = spec_of(hires={"scale": 1.5, "strength": 0.6, "steps": 8, "upscaler": upscaler})
        manifest = render(spec, registry=registry, storage=storage)
        assert manifest.status == "succeeded"
        image = image_of(storage, manifest)
        assert image.size == (96, 96)
        made[upscaler] = image.tobytes()
        assert [(s.name, s.steps_planned, s.steps_completed) for s in manifest.stages] == [
            ("base", STEPS, STEPS),
            ("hires", 4, 4),  # int(8 x 0.6), as diffusers' img2img counts
        ]
        assert manifest.steps_planned == manifest.steps_completed == STEPS + 4
        base, hires = manifest.stages
        assert base.denoise and hires.denoise and hires.decode is not None
        assert (base.decode is None) == (upscaler == "latent")  # lanczos decodes stage 1 to resize it
        params = Image.open(io.BytesIO(image_bytes(storage, manifest)[0])).info["parameters"]
        assert f"Hires upscale: 1.5, Hires steps: 8, Hires upscaler: {upscaler.capitalize()}, " in params
        assert "Denoising strength: 0.6" in params
    assert made["latent"] != made["lanczos"]
    plain = render(spec_of(), registry=registry, storage=storage)
    assert plain.stages == [] and image_of(storage, plain).size == (64, 64)
    assert "stages" in plain.model_dump() and "Hires" not in image_of(storage, plain).info["parameters"]


def test_the_hires_pass_runs_on_the_upscaled_latents(registry: ModelRegistry, tmp_path: Path) -> None:
    """The img2img call's UNet sees the upscaled latent size, for its int(steps x strength) steps."""
    pipe = registry.pipeline("tiny-sd15")
    shapes: list[tuple[int, ...]] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        render(spec_of(hires={"scale": 2, "strength": 0.5}), registry=registry, storage=LocalStorage(tmp_path))
    finally:
        handle.remove()
    assert shapes == [(8, 8)] * STEPS + [(16, 16)] * (STEPS // 2)


# --- refiner -------------------------------------------------------------------------------------------------------


def test_the_refiner_runs_the_split_diffusers_gives(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.pipeline("tiny-sdxl")
    refiner = registry.refiner("tiny-sdxl", "tiny-sdxl-refiner")
    assert refiner.config.requires_aesthetics_score and refiner.text_encoder is None
    # diffusers' documented ensemble, called bare: its own split of 10 steps at 0.7
    latents = base(
        prompt="a fox", num_inference_steps=STEPS, denoising_end=0.7, output_type="latent", width=64, height=64
    ).images
    base_steps = base._num_timesteps
    refiner(prompt="a fox", image=latents, num_inference_steps=STEPS, denoising_start=0.7, output_type="latent")
    refiner_steps = refiner._num_timesteps
    assert base_steps + refiner_steps == STEPS and refiner_steps > 0

    calls = {"base": 0, "refiner": 0}
    handles = [
        base.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1)),
        refiner.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("refiner", calls["refiner"] + 1)),
    ]
    steps = Steps()
    try:
        manifest = render(
            JobContext(spec_of(**REFINER), "refined", hooks=[steps]), registry=registry, storage=LocalStorage(tmp_path)
        )
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"base": base_steps, "refiner": refiner_steps}
    assert [(s.name, s.steps_planned, s.steps_completed) for s in manifest.stages] == [
        ("base", base_steps, base_steps),
        ("refiner", refiner_steps, refiner_steps),
    ]
    assert [info.steps_completed for info in steps.seen] == list(range(1, STEPS + 1))
    assert {info.steps_planned for info in steps.seen} == {STEPS}
    params = image_of(LocalStorage(tmp_path), manifest).info["parameters"]
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.7" in params


def test_a_refiner_directory_loads_through_render_models(registry: ModelRegistry, tmp_path: Path) -> None:
    """A real refiner's directory (model_index: StableDiffusionXLImg2ImgPipeline) loads as one, aesthetic score
    kept; the tiny refiner saved as one renders the same bytes."""
    folder = tmp_path / "refiner"
    tiny_sdxl.build_refiner().save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    models = {**default_models(), "my-refiner": ModelSource(family="sdxl", source=str(folder))}
    on_disk = ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32, max_cached=2)
    storage = LocalStorage(tmp_path / "out")
    loaded = render(spec_of(model="tiny-sdxl", refiner={"model": "my-refiner"}), registry=on_disk, storage=storage)
    built = render(
        spec_of(model="tiny-sdxl", refiner={"model": "tiny-sdxl-refiner"}), registry=registry, storage=storage
    )
    assert on_disk.refiner("tiny-sdxl", "my-refiner").config.requires_aesthetics_score
    assert image_of(storage, loaded).tobytes() == image_of(storage, built).tobytes()
    with pytest.raises(UnsupportedSpecError, match="'my-refiner' is an SDXL refiner, which runs img2img only"):
        render(spec_of(model="my-refiner"), registry=on_disk, storage=storage)


# --- job control over both stages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "revoke_at"), [(HIRES, STEPS + 2), (REFINER, STEPS - 1)], ids=["hires", "refiner"])
def test_a_revoke_in_the_second_stage_stops_it_with_no_image_and_both_stages_frames(
    registry: ModelRegistry, tmp_path: Path, stage: dict[str, Any], revoke_at: int
) -> None:
    storage = LocalStorage(tmp_path)
    spec = spec_of(**stage, callbacks=[{"type": "frames", "every": 1}])
    steps = Steps(revoke_at=revoke_at)  # the second stage's second step (the refiner's base runs 7 of 10)
    manifest = render(JobContext(spec, "revoked", hooks=[steps]), registry=registry, storage=storage)
    assert manifest.status == "revoked" and manifest.images == []
    assert not list(tmp_path.glob("revoked/image-*"))
    label = "hires" if "hires" in stage else "refiner"
    base, second = manifest.stages
    names = [url.rsplit("/", 1)[-1] for url in manifest.frames]
    assert names == [f"step-{i:03d}.png" for i in range(1, base.steps_planned + 1)] + [
        f"{label}-step-{i:03d}.png" for i in range(1, revoke_at - base.steps_planned)
    ]  # the revoked step's frame is not made: control runs first at a step's end, as for any revoke
    assert second.steps_completed == revoke_at - base.steps_planned == 2
    assert manifest.steps_completed == revoke_at
    assert steps.seen[-1].steps_completed == revoke_at  # it stopped at the step it was revoked at


def test_the_step_budget_counts_both_stages(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    budget = {"type": "step_budget", "max_steps": STEPS + 2}
    manifest = render(spec_of(**HIRES, callbacks=[budget]), registry=registry, storage=storage)
    assert manifest.status == "interrupted" and manifest.interrupted_by == "max_steps"
    assert manifest.steps_completed == STEPS + 2 and manifest.stages[1].steps_completed == 2
    assert image_of(storage, manifest).size == (96, 96)

    budget = {"type": "step_budget", "max_steps": 4}  # spent in the first stage: its image, no second stage
    manifest = render(spec_of(**HIRES, callbacks=[budget]), registry=registry, storage=storage)
    assert manifest.status == "interrupted" and manifest.steps_completed == 4
    assert [s.steps_completed for s in manifest.stages] == [4, 0]
    assert manifest.stages[0].decode is not None and manifest.stages[1].denoise is None
    assert image_of(storage, manifest).size == (64, 64)


def test_progress_counts_over_all_stages(registry: ModelRegistry, tmp_path: Path) -> None:
    steps = Steps()
    render(JobContext(spec_of(**HIRES), "progress", hooks=[steps]), registry=registry, storage=LocalStorage(tmp_path))
    assert [info.steps_completed for info in steps.seen] == list(range(1, STEPS + 5 + 1))
    assert {info.steps_planned for info in steps.seen} == {STEPS + 5}


# --- checkpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "stop_at"),
    [
        ({"hires": {"scale": 1.5, "strength": 0.5, "upscaler": "latent"}}, 13),
        ({"hires": {"scale": 1.5, "strength": 0.5, "upscaler": "lanczos"}}, 13),
        ({"hires": {"scale": 1.5, "strength": 0.5}}, 5),  # a checkpoint in the first stage resumes there
        (REFINER, 9),
    ],
    ids=["hires-latent", "hires-lanczos", "hires-in-base", "refiner"],
)
def test_a_job_stopped_in_a_stage_resumes_in_it_byte_for_byte(
    registry: ModelRegistry, tmp_path: Path, stage: dict[str, Any], stop_at: int
) -> None:
    spec = spec_of(**stage, scheduler="dpmpp_2m", num_images=2, callbacks=[{"type": "frames", "every": 2}])
    whole_storage, storage = LocalStorage(tmp_path / "whole"), LocalStorage(tmp_path / "resumed")
    whole = render(JobContext(spec, TASK), registry=registry, storage=whole_storage)
    interrupted_at(stop_at, spec, registry, storage)
    data = storage.get(checkpoint_object(TASK))
    assert data is not None
    checkpoint = decode(data)
    assert checkpoint.step == stop_at - 1
    assert checkpoint.stage == (0 if stop_at <= whole.stages[0].steps_planned else 1)
    base_calls = _unet_calls(registry.pipeline(spec.model))
    with base_calls:
        manifest = resumed(spec, registry, storage, checkpoint_seconds=EVERY_STEP)
    assert manifest.status == whole.status == "succeeded"
    assert manifest.resumed_from_step == stop_at - 1
    assert image_bytes(storage, manifest) == image_bytes(whole_storage, whole), "the resumed image differs"
    assert [s.steps_completed for s in manifest.stages] == [s.steps_completed for s in whole.stages]
    names = [storage.name_of(url) for url in manifest.frames]
    assert names == [whole_storage.name_of(url) for url in whole.frames]
    for name in names:
        assert name is not None and storage.get(name) == whole_storage.get(name), name
    if checkpoint.stage == 1:  # a resume into the second stage skips the first: no call at the base size
        assert (8, 8) not in base_calls.sizes and ("hires" in stage or not base_calls.sizes)


class _unet_calls:  # noqa: N801 - used as a context manager
    """The latent sizes the base model's UNet is called at (the hires pass shares that UNet; a refiner has its own)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.handle = pipe, None
        self.sizes: list[tuple[int, ...]] = []

    def __enter__(self) -> _unet_calls:
        self.handle = self.pipe.unet.register_forward_pre_hook(self._count)
        return self

    def _count(self, module: Any, args: tuple[Any, ...]) -> None:
        self.sizes.append(tuple(args[0].shape[-2:]))

    def __exit__(self, *_: Any) -> None:
        assert self.handle is not None
        self.handle.remove()


def test_a_checkpoint_written_before_stages_reads_as_the_first_stage() -> None:
    checkpoint = Checkpoint(
        step=3,
        latents=torch.zeros(1, 4, 8, 8),
        scheduler={},
        scheduler_class="EulerDiscreteScheduler",
        generators=[torch.Generator().get_state()],
        seed=1,
        spec_digest="x",
    )
    raw = {"format": 1, **{key: value for key, value in vars(checkpoint).items() if key != "stage"}}
    buffer = io.BytesIO()
    torch.save(raw, buffer)
    assert decode(buffer.getvalue()).stage == 0
    assert decode(encode(Checkpoint(**{**vars(checkpoint), "stage": 1}))).stage == 1


def test_png_parameters_name_the_stages() -> None:
    hires = parameters_text(ImageParameters(spec_of(hires={"scale": 2, "steps": 12}), 5))
    assert "Hires upscale: 2, Hires steps: 12, Hires upscaler: Latent, Denoising strength: 0.5" in hires
    refined = parameters_text(ImageParameters(spec_of(**REFINER), 5))
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.7" in refined


# --- what applies to which stage -----------------------------------------------------------------------------------


def test_a_cfg_cutoff_ends_guidance_in_the_first_stage_only(registry: ModelRegistry, tmp_path: Path) -> None:
    spec = spec_of(**HIRES, callbacks=[{"type": "cfg_cutoff", "step_index": 2}])
    with UNetCalls(registry.pipeline("tiny-sd15")) as calls:  # the hires pass's img2img pipeline shares the UNet
        manifest = render(spec, registry=registry, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded"
    assert calls.batches == [2, 2, 2] + [1] * (STEPS - 3) + [2] * 5  # the hires pass guides at guidance_scale


def test_a_guidance_curve_shapes_the_first_stage_and_the_second_runs_at_its_last_value(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    spec = spec_of(**HIRES, guidance={"from": 9, "to": 3})
    render(spec, registry=registry, storage=LocalStorage(tmp_path))
    assert registry.pipeline("tiny-sd15").guidance_scale == 3.0
    assert registry.pipeline("tiny-sd15", "img2img").guidance_scale == 3.0


def test_the_second_stage_runs_the_prompts_last_span(registry: ModelRegistry, tmp_path: Path) -> None:
    """`[cat:dog:0.5]`: the first stage switches at step 5; the hires pass sees `dog` throughout, as a `dog` job's."""

    def conditioning(prompt: str) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        pipe = registry.pipeline("tiny-sd15")

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(kwargs["encoder_hidden_states"].clone())

        handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
        try:
            spec = spec_of(**HIRES, prompt=prompt, prompt_syntax="a1111")
            render(spec, registry=registry, storage=LocalStorage(tmp_path))
        finally:
            handle.remove()
        return seen

    scheduled, dog = conditioning("a [cat:dog:0.5] on a hill"), conditioning("a dog on a hill")
    assert len(scheduled) == len(dog) == STEPS + 5
    assert not torch.equal(scheduled[0], dog[0]) and torch.equal(scheduled[STEPS - 1], dog[STEPS - 1])
    assert all(torch.equal(a, b) for a, b in zip(scheduled[STEPS:], dog[STEPS:], strict=True))


FLOW = ["tiny-sd3", "tiny-flux", "tiny-chroma", "tiny-qwen-image", "tiny-z-image", "tiny-flux2"]


@pytest.mark.parametrize("model", FLOW)
def test_the_flow_families_run_a_lanczos_hires_pass(registry: ModelRegistry, tmp_path: Path, model: str) -> None:
    storage = LocalStorage(tmp_path)
    spec = spec_of(model=model, num_inference_steps=4, num_images=2, hires={"scale": 1.5, "upscaler": "lanczos"})
    manifest = render(spec, registry=registry, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 2, manifest.error
    assert image_of(storage, manifest).size == (96, 96)
    assert [(s.name, s.steps_planned, s.steps_completed) for s in manifest.stages] == [("base", 4, 4), ("hires", 2, 2)]


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_a_flow_family_stopped_in_the_hires_pass_resumes_byte_for_byte(
    registry: ModelRegistry, tmp_path: Path, model: str
) -> None:
    spec = spec_of(model=model, num_inference_steps=6, hires={"scale": 1.5, "upscaler": "lanczos", "strength": 0.7})
    whole_storage, storage = LocalStorage(tmp_path / "whole"), LocalStorage(tmp_path / "resumed")
    whole = render(JobContext(spec, TASK), registry=registry, storage=whole_storage)
    interrupted_at(9, spec, registry, storage)  # 6 base steps, then the hires pass's 4: a checkpoint at step 8
    data = storage.get(checkpoint_object(TASK))
    assert data is not None and decode(data).stage == 1
    manifest = resumed(spec, registry, storage, checkpoint_seconds=EVERY_STEP)
    assert manifest.status == "succeeded" and manifest.resumed_from_step == 8
    assert image_bytes(storage, manifest) == image_bytes(whole_storage, whole), "the resumed image differs"
