"""Flux.2 klein through every callback, on the tiny pipelines (base and distilled) and the real diffusers loop: what
works on the family, and a refusal naming the spec's field for what does not."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer import RenderSpec
from producer.errors import UnsupportedSpecError
from tests.helpers import pipeline_spec
from tests.unit.family_kit import RevokeAt, alone, max_diff, stored_pixels
from tests.unit.test_checkpoints import check_resume
from worker.engine.batching import denoise_batch, shared_call_key
from worker.engine.inputs import load_inputs
from worker.engine.job import JobContext
from worker.engine.rendering import prepare, render, store
from worker.models import tiny_flux2
from worker.models.families import FAMILIES, family_of
from worker.models.families.flux2 import Flux2Family
from worker.models.flow_sampling import FLOW_SAMPLERS
from worker.models.registry import ModelRegistry
from worker.settings import ModelSource, WorkerSettings, default_loras
from worker.storage import LocalStorage

BASE, DISTILLED = "tiny-flux2", "tiny-flux2-distilled"
MODELS = [BASE, DISTILLED]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "text2img-flux2.json"


def registry_of(**options: Any) -> ModelRegistry:
    models = {
        BASE: ModelSource(family="flux2", source="tiny"),
        DISTILLED: ModelSource(family="flux2", source="tiny-distilled"),
    }
    return ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32, max_cached=2, **options)


@pytest.fixture(scope="module")
def flux2() -> ModelRegistry:
    return registry_of()


def make_spec(model: str, i: int = 0, **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": f"a lighthouse, take {i}", "num_inference_steps": 6, "width": 64, "height": 64}
    return RenderSpec.parse({**data, "seed": 100 + i, "guidance_scale": 4.0, **overrides})


class CountCalls:
    """The transformer's calls, through a forward pre-hook."""

    def __init__(self, transformer: Any) -> None:
        self.calls = 0
        self.handle = transformer.register_forward_pre_hook(self.count)

    def count(self, *_: Any) -> None:
        self.calls += 1

    def __enter__(self) -> CountCalls:
        return self

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()


def test_two_builds_are_identical() -> None:
    first, second = tiny_flux2.build(), tiny_flux2.build()
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not first.config.is_distilled and tiny_flux2.build_distilled().config.is_distilled


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_every_pipeline_kind_renders_the_same_image_twice(
    flux2: ModelRegistry, tmp_path: Path, model: str, kind: str
) -> None:
    spec = pipeline_spec(
        kind, tmp_path, model, num_inference_steps=4, **({"strength": 0.8} if kind != "text2img" else {})
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    storage = LocalStorage(tmp_path / "out")
    with CountCalls(flux2.pipeline(model, kind).transformer) as counted:
        manifest = render(JobContext(spec, inputs=inputs), registry=flux2, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    assert manifest.scheduler is not None and manifest.scheduler.label == "Euler (flow)"
    # img2img and inpaint run num_inference_steps x strength steps, as the worker counts them; base makes 2 passes.
    assert manifest.steps_completed == spec.denoising_steps
    assert counted.calls == spec.denoising_steps * (1 if model == DISTILLED else 2)
    again = render(JobContext(spec, inputs=inputs), registry=flux2, storage=storage)
    assert np.array_equal(stored_pixels(storage, again.images[0]), stored_pixels(storage, manifest.images[0]))


def test_img2img_starts_from_its_image(flux2: ModelRegistry, tmp_path: Path) -> None:
    """The full mask really makes img2img: its input image shapes the result below full strength."""
    storage = LocalStorage(tmp_path / "out")
    spec = pipeline_spec("img2img", tmp_path, BASE, num_inference_steps=10, strength=0.5)
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    flipped = {"image": inputs["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    first, other = (
        stored_pixels(storage, render(JobContext(spec, inputs=given), registry=flux2, storage=storage).images[0])
        for given in (inputs, flipped)
    )
    assert np.abs(first.astype(int) - other).mean() > 1.0, "the input image changed nothing"


@pytest.mark.parametrize("model", MODELS)
def test_a_revoke_stops_at_the_next_step_with_no_decode_and_no_image(
    flux2: ModelRegistry, tmp_path: Path, model: str
) -> None:
    revoke = RevokeAt(2)
    decodes: list[int] = []
    handle = flux2.pipeline(model).vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(1))
    try:
        manifest = render(JobContext(make_spec(model), hooks=[revoke]), registry=flux2, storage=LocalStorage(tmp_path))
    finally:
        handle.remove()
    assert manifest.status == "revoked" and manifest.images == [] and manifest.steps_completed == 2
    assert revoke.calls == 2, "the loop went on past the revoking step"
    assert decodes == [], "a revoked job was decoded"


@pytest.mark.parametrize("model", MODELS)
def test_a_step_budget_interrupts_with_its_partial_image_and_frames_are_stored_at_the_asked_steps(
    flux2: ModelRegistry, tmp_path: Path, model: str
) -> None:
    callbacks = [{"type": "step_budget", "max_steps": 4}, {"type": "frames", "every": 2, "format": "png"}]
    manifest = render(JobContext(make_spec(model, callbacks=callbacks)), registry=flux2, storage=LocalStorage(tmp_path))
    assert manifest.status == "interrupted" and manifest.interrupted_by == "max_steps" and len(manifest.images) == 1
    assert manifest.steps_completed == 4
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-002.png", "step-004.png"]
    with Image.open(tmp_path / manifest.task_id / "frames" / "step-002.png") as frame:
        assert frame.size[0] > 0 and frame.mode == "RGB"


def test_the_preview_unpacks_and_denormalises_as_the_pipeline_decodes(flux2: ModelRegistry) -> None:
    """The family's decode of the loop's last latents is the pipeline's own output, pixel for pixel."""
    pipe = flux2.pipeline(BASE)
    kept: dict[str, torch.Tensor] = {}

    def keep(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        kept["latents"] = kwargs["latents"].clone()
        return kwargs

    with torch.inference_mode():
        generator = torch.Generator().manual_seed(5)
        out = pipe(prompt="a cat", height=64, width=48, num_inference_steps=2, generator=generator, output_type="pt")
        generator = torch.Generator().manual_seed(5)
        pipe(
            prompt="a cat",
            height=64,
            width=48,
            num_inference_steps=2,
            generator=generator,
            output_type="pt",
            callback_on_step_end=keep,
        )
    family = FAMILIES["flux2"]
    assert torch.equal(family.decode(pipe, kept["latents"], 64, 48), out.images)
    preview = family.preview(pipe, kept["latents"], 64, 48)
    assert preview.shape == (1, 8, 6, 3) and preview.dtype == torch.uint8


@pytest.mark.parametrize("model", MODELS)
def test_a_resumed_job_makes_the_uninterrupted_image_byte_for_byte(
    flux2: ModelRegistry, tmp_path: Path, model: str
) -> None:
    manifest = check_resume(flux2, tmp_path, make_spec(model, callbacks=[{"type": "frames", "every": 2}]), 4)
    assert manifest.resumed_from_step == 3


def test_a_base_job_cut_off_before_its_checkpoint_resumes_byte_for_byte(flux2: ModelRegistry, tmp_path: Path) -> None:
    cutoff = [{"type": "cfg_cutoff", "step_index": 1}, {"type": "frames", "every": 2}]
    check_resume(flux2, tmp_path, make_spec(BASE, callbacks=cutoff), 4)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_four_compatible_jobs_share_calls_and_a_revoke_of_one_leaves_the_others_as_alone(
    flux2: ModelRegistry, tmp_path: Path, model: str, guidance: float
) -> None:
    """With the negative pass on, rows that leave stay in the call unused; with it off, they leave it."""
    storage = LocalStorage(tmp_path)
    specs = [make_spec(model, i, guidance_scale=guidance) for i in range(4)]
    specs[2] = make_spec(model, 2, guidance_scale=guidance, callbacks=[{"type": "step_budget", "max_steps": 3}])
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(flux2, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    hooks: list[list[Any]] = [[], [RevokeAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"b-{i}", hooks=hooks[i]), flux2, storage) for i, s in enumerate(specs)]
    rows: list[int] = []
    transformer = flux2.pipeline(model).transformer
    handle = transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        outcomes = denoise_batch(prepared, flux2)
    finally:
        handle.remove()
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]
    assert [m.status for m in manifests] == ["succeeded", "revoked", "interrupted", "succeeded"]
    assert manifests[0].batched_with == ["b-1", "b-2", "b-3"]
    for i in (0, 2, 3):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"job {i} differs from its render alone"
    guided = model == BASE and guidance > 1
    assert rows[-1] == (4 if guided else 2), rows


@pytest.mark.parametrize("kind", ["text2img", "inpaint"])
def test_the_base_cutoff_ends_the_negative_pass_after_its_step(flux2: ModelRegistry, tmp_path: Path, kind: str) -> None:
    """2 transformer calls a step up to the cutoff step, 1 after; the image is the one a guidance scale of 1 from
    the cutoff on gives: the same pipeline with its scale switched by a plain callback."""
    overrides: dict[str, Any] = {"strength": 1.0} if kind != "text2img" else {}
    spec = pipeline_spec(
        kind,
        tmp_path,
        BASE,
        num_inference_steps=6,
        guidance_scale=4.0,
        callbacks=[{"type": "cfg_cutoff", "step_index": 2}],
        **overrides,
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    pipe = flux2.pipeline(BASE, kind)
    calls: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(len(calls)))
    steps: list[int] = []
    step_hook = type("Steps", (), {"on_step": lambda self, info: steps.append(len(calls))})()
    storage = LocalStorage(tmp_path / "out")
    try:
        manifest = render(JobContext(spec, inputs=inputs, hooks=[step_hook]), registry=flux2, storage=storage)
    finally:
        handle.remove()
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    per_step = np.diff([0, *steps]).tolist()
    assert per_step == [2, 2, 2, 1, 1, 1], per_step
    uncut = render(
        JobContext(spec.model_copy(update={"callbacks": []}), inputs=inputs), registry=flux2, storage=storage
    )
    cut, full = stored_pixels(storage, manifest.images[0]), stored_pixels(storage, uncut.images[0])
    assert np.abs(cut.astype(int) - full).max() > 0, "the cutoff changed nothing"

    def switch(pipeline: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if step == 2:
            pipeline._guidance_scale = 1.0
        return kwargs

    arguments: dict[str, Any] = {"prompt": spec.prompt, "num_inference_steps": 6, "guidance_scale": 4.0}
    arguments |= {"height": 64, "width": 64, "generator": [torch.Generator().manual_seed(manifest.seed)]}
    if kind == "inpaint":
        arguments |= {"image": inputs["image"], "mask_image": inputs["mask_image"], "strength": 1.0}
    with torch.inference_mode():
        reference = pipe(**arguments, output_type="np", callback_on_step_end=switch).images[0]
    assert np.abs((reference * 255).round().astype(int) - cut).max() <= 1


def test_the_distilled_model_refuses_a_cfg_cutoff_naming_the_callback(flux2: ModelRegistry, tmp_path: Path) -> None:
    spec = make_spec(
        DISTILLED, callbacks=[{"type": "step_budget", "max_steps": 9}, {"type": "cfg_cutoff", "step_index": 2}]
    )
    with pytest.raises(
        UnsupportedSpecError, match=r"^callbacks\[1\]: 'tiny-flux2-distilled' \(flux2\) is step-distilled"
    ):
        render(JobContext(spec), registry=flux2, storage=LocalStorage(tmp_path))
    only = make_spec(DISTILLED, callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}])
    with pytest.raises(UnsupportedSpecError, match=r"^callbacks\[0\]: .* no unconditional pass to cut"):
        render(JobContext(only), registry=flux2, storage=LocalStorage(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"negative_prompt": "blurry"}, r"^negative_prompt: 'tiny-flux2' \(flux2\) guides against an empty prompt"),
        ({"scheduler": "euler_a"}, "^scheduler: 'tiny-flux2' is a flow-matching model and takes one of default"),
        ({"clip_skip": 1}, r"^clip_skip: 'tiny-flux2' \(flux2\) has no CLIP layers to skip"),
        (
            {"pipeline": "controlnet", "control_image": "file:///c.png"},
            r"^pipeline: 'tiny-flux2' \(flux2\) runs text2img, img2img, inpaint; got 'controlnet'",
        ),
        ({"ip_adapter": {"image": "file:///s.png"}}, r"^ip_adapter: 'tiny-flux2' \(flux2\) takes no IP-Adapter"),
    ],
)
def test_what_flux2_cannot_run_is_refused_before_any_work_naming_the_field(
    flux2: ModelRegistry, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedSpecError, match=message):
        prepare(JobContext(make_spec(BASE, **overrides)), flux2, LocalStorage(Path("/nonexistent")))


@pytest.mark.parametrize("sampler", list(FLOW_SAMPLERS))
def test_every_flow_sampler_renders_the_same_image_twice(flux2: ModelRegistry, tmp_path: Path, sampler: str) -> None:
    storage = LocalStorage(tmp_path)
    spec = make_spec(BASE, scheduler=sampler, num_inference_steps=4)
    first = render(JobContext(spec), registry=flux2, storage=storage)
    second = render(JobContext(spec), registry=flux2, storage=storage)
    assert first.status == second.status == "succeeded" and first.scheduler is not None
    assert first.scheduler.name == sampler
    assert np.array_equal(stored_pixels(storage, first.images[0]), stored_pixels(storage, second.images[0]))


def test_the_family_is_found_from_the_pipeline_class_a_model_index_names() -> None:
    assert isinstance(FAMILIES["flux2"], Flux2Family)
    assert family_of("Flux2KleinPipeline") is FAMILIES["flux2"]
    assert family_of("Flux2KleinInpaintPipeline") is FAMILIES["flux2"]


def test_a_lora_changes_the_image_and_the_next_job_renders_as_on_a_fresh_pipeline(tmp_path: Path) -> None:
    registry = registry_of(loras=default_loras())
    storage = LocalStorage(tmp_path)
    plain = make_spec(BASE)
    before = render(JobContext(plain), registry=registry, storage=storage)
    styled = render(
        JobContext(make_spec(BASE, loras=[{"name": "tiny-lora", "scale": 1.0}])), registry=registry, storage=storage
    )
    after = render(JobContext(plain), registry=registry, storage=storage)
    assert styled.status == "succeeded" and styled.loras[0].name == "tiny-lora"
    first, lora, last = (stored_pixels(storage, m.images[0]) for m in (before, styled, after))
    # The tiny LoRA's strength is made for the SD UNets; on this transformer it moves pixels less, but clearly.
    assert np.abs(first.astype(int) - lora).mean() > 0.3, "the LoRA changed nothing"
    assert np.array_equal(first, last), "the LoRA leaked into the next job"


@pytest.mark.parametrize("model", MODELS)
def test_the_manifest_and_the_png_name_the_family(flux2: ModelRegistry, tmp_path: Path, model: str) -> None:
    storage = LocalStorage(tmp_path)
    manifest = render(JobContext(make_spec(model, num_inference_steps=2)), registry=flux2, storage=storage)
    assert manifest.family == "flux2"
    data = storage.get(storage.name_of(manifest.images[0]) or "")
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        assert image.info["render:family"] == "flux2"


def test_the_example_spec_renders(flux2: ModelRegistry, tmp_path: Path) -> None:
    data = json.loads(EXAMPLE.read_text())
    assert data["width"] <= 128 and data["height"] <= 128 and data["num_inference_steps"] <= 10
    spec = RenderSpec.parse(data)
    manifest = render(JobContext(spec), registry=flux2, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded" and manifest.family == "flux2" and len(manifest.images) == spec.num_images
