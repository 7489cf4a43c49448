"""Chroma through every callback, on the tiny pipeline and the real diffusers loop: what works, and a clear refusal,
naming the spec's field, for what does not (ControlNet, IP-Adapter, clip skip, and a cutoff or a negative prompt
where guidance runs no negative pass)."""

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
from worker.models import tiny_chroma
from worker.models.families import FAMILIES, family_of
from worker.models.families.chroma import ChromaFamily
from worker.models.flow_sampling import FLOW_SAMPLERS
from worker.models.registry import ModelRegistry
from worker.settings import ModelSource, WorkerSettings, default_loras
from worker.storage import LocalStorage

MODEL = "tiny-chroma"
EXAMPLE = Path(__file__).parents[2] / "examples" / "text2img-chroma.json"


def chroma_registry() -> ModelRegistry:
    models = {MODEL: ModelSource(family="chroma", source="tiny")}
    return ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32, max_cached=2, loras=default_loras())


@pytest.fixture(scope="module")
def chroma() -> ModelRegistry:
    return chroma_registry()


def make_spec(i: int = 0, **overrides: Any) -> RenderSpec:
    data = {"model": MODEL, "prompt": f"a lighthouse, take {i}", "num_inference_steps": 6, "width": 64, "height": 64}
    return RenderSpec.parse({**data, "seed": 100 + i, "guidance_scale": 4.0, **overrides})


class TransformerCalls:
    """A forward pre-hook on the transformer: the timestep of every call, so calls group into steps."""

    def __init__(self, transformer: Any) -> None:
        self.timesteps: list[float] = []
        self.handle = transformer.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self.timesteps.append(float(kwargs["timestep"][0]))

    def per_step(self) -> list[int]:
        counts: dict[float, int] = {}
        for t in self.timesteps:
            counts[t] = counts.get(t, 0) + 1
        return list(counts.values())  # dicts keep the order the steps ran in

    def __enter__(self) -> TransformerCalls:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


class NegativeIsPositiveAfter:
    """The cutoff's rule built another way: a forward hook that, in the steps after `step`, answers the negative
    pass (the second call of a step) with that step's positive output, so `neg + s * (pos - neg)` is `pos`."""

    def __init__(self, transformer: Any, step: int) -> None:
        self.step = step
        self.seen: list[float] = []
        self.positive: Any = None
        self.replaced = 0
        self.handle = transformer.register_forward_hook(self.answer, with_kwargs=True)

    def answer(self, _module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        t = float(kwargs["timestep"][0])
        if not self.seen or self.seen[-1] != t:  # the first call of a step: the positive pass
            self.seen.append(t)
            self.positive = output
            return None
        if len(self.seen) - 1 > self.step:
            self.replaced += 1
            return self.positive
        return None

    def __enter__(self) -> NegativeIsPositiveAfter:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def test_the_tiny_builder_is_deterministic() -> None:
    first, second = tiny_chroma.build(), tiny_chroma.build()
    for name in ("transformer", "text_encoder", "vae"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between builds"
    assert not first.transformer.training and not first.text_encoder.training


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_every_pipeline_kind_renders_and_twice_to_the_same_pixels(
    chroma: ModelRegistry, tmp_path: Path, kind: str
) -> None:
    spec = pipeline_spec(
        kind, tmp_path, MODEL, num_inference_steps=4, **({"strength": 0.8} if kind != "text2img" else {})
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    storage = LocalStorage(tmp_path / "out")
    manifest = render(JobContext(spec, inputs=inputs), registry=chroma, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1 and manifest.family == "chroma"
    assert manifest.scheduler is not None and manifest.scheduler.label == "Euler (flow)"
    again = render(JobContext(spec, inputs=inputs), registry=chroma, storage=storage)
    first = stored_pixels(storage, manifest.images[0])
    assert np.array_equal(stored_pixels(storage, again.images[0]), first)
    assert first.std() > 0, "a flat image: nothing was rendered"


def test_a_revoke_stops_at_the_next_step_with_no_decode_and_no_image(chroma: ModelRegistry, tmp_path: Path) -> None:
    revoke = RevokeAt(2)
    decodes: list[int] = []
    handle = chroma.pipeline(MODEL).vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(1))
    try:
        manifest = render(JobContext(make_spec(), hooks=[revoke]), registry=chroma, storage=LocalStorage(tmp_path))
    finally:
        handle.remove()
    assert manifest.status == "revoked" and manifest.images == [] and manifest.steps_completed == 2
    # Each step makes two transformer calls (the negative pass); the hook runs once per step's end.
    assert revoke.calls == 2, "the loop went on past the revoking step"
    assert decodes == [], "a revoked job was decoded"


def test_a_step_budget_interrupts_with_its_partial_image_and_frames_are_stored_at_the_asked_steps(
    chroma: ModelRegistry, tmp_path: Path
) -> None:
    callbacks = [{"type": "step_budget", "max_steps": 4}, {"type": "frames", "every": 2, "format": "png"}]
    manifest = render(JobContext(make_spec(callbacks=callbacks)), registry=chroma, storage=LocalStorage(tmp_path))
    assert manifest.status == "interrupted" and manifest.interrupted_by == "max_steps" and len(manifest.images) == 1
    assert manifest.steps_completed == 4
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-002.png", "step-004.png"]
    with Image.open(tmp_path / manifest.task_id / "frames" / "step-002.png") as frame:
        assert frame.size[0] > 0 and frame.mode == "RGB"
        assert np.asarray(frame).std() > 0, "a flat preview"


@pytest.mark.parametrize("sampler", ["default", "dpmpp_2m"])
def test_a_resumed_job_makes_the_uninterrupted_image_byte_for_byte(
    chroma: ModelRegistry, tmp_path: Path, sampler: str
) -> None:
    spec = make_spec(scheduler=sampler, callbacks=[{"type": "frames", "every": 2}])
    manifest = check_resume(chroma, tmp_path, spec, 4)
    assert manifest.resumed_from_step == 3


def test_a_job_cut_off_before_its_checkpoint_resumes_byte_for_byte(chroma: ModelRegistry, tmp_path: Path) -> None:
    """The replay turns the transformer off; the cutoff still ends the negative pass at its step."""
    cutoff = [{"type": "cfg_cutoff", "step_index": 1}, {"type": "frames", "every": 2}]
    check_resume(chroma, tmp_path, make_spec(callbacks=cutoff, negative_prompt="blurry", num_images=2), 4)


def test_four_compatible_jobs_share_calls_and_a_revoke_of_one_leaves_the_others_as_alone(
    chroma: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec(i) for i in range(4)]
    specs[2] = make_spec(2, callbacks=[{"type": "step_budget", "max_steps": 3}])
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(chroma, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    hooks: list[list[Any]] = [[], [RevokeAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"b-{i}", hooks=hooks[i]), chroma, storage) for i, s in enumerate(specs)]
    with TransformerCalls(chroma.pipeline(MODEL).transformer) as calls:
        outcomes = denoise_batch(prepared, chroma)
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]
    assert [m.status for m in manifests] == ["succeeded", "revoked", "interrupted", "succeeded"]
    assert manifests[0].batched_with == ["b-1", "b-2", "b-3"]
    assert calls.per_step() == [2] * 6, "the four jobs did not share one call (two passes a step)"
    for i in (0, 2, 3):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"job {i} differs from its render alone"


def test_the_cutoff_ends_the_negative_pass_after_its_step_and_gives_the_positive_output_from_then_on(
    chroma: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    transformer = chroma.pipeline(MODEL).transformer
    plain = make_spec(negative_prompt="blurry", num_images=2)
    cut = make_spec(negative_prompt="blurry", num_images=2, callbacks=[{"type": "cfg_cutoff", "step_index": 2}])
    with TransformerCalls(transformer) as calls:
        manifest = render(JobContext(cut), registry=chroma, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 2
    assert calls.per_step() == [2, 2, 2, 1, 1, 1], calls.per_step()
    with NegativeIsPositiveAfter(transformer, 2) as rule:
        reference = render(JobContext(plain), registry=chroma, storage=storage)
    assert rule.replaced == 3, "the reference did not replace the negative pass of the last three steps"
    uncut = render(JobContext(plain), registry=chroma, storage=storage)
    for i in range(2):
        mine = stored_pixels(storage, manifest.images[i])
        assert np.array_equal(mine, stored_pixels(storage, reference.images[i])), f"image {i} is not the rule's"
        assert not np.array_equal(mine, stored_pixels(storage, uncut.images[i])), "the cutoff changed nothing"


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_the_cutoff_on_image_pipelines_halves_the_passes(chroma: ModelRegistry, tmp_path: Path, kind: str) -> None:
    spec = pipeline_spec(
        kind,
        tmp_path,
        MODEL,
        num_inference_steps=4,
        strength=1.0,
        guidance_scale=4.0,
        callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}],
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    with TransformerCalls(chroma.pipeline(MODEL, kind).transformer) as calls:
        manifest = render(JobContext(spec, inputs=inputs), registry=chroma, storage=LocalStorage(tmp_path / "out"))
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    assert calls.per_step() == [2, 2, 2, 1], calls.per_step()  # int(4 * 0.5) = step 2 is the last guided one


def test_the_cutoff_in_a_shared_call_gives_each_prompt_what_its_own_call_gives(
    chroma: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    cutoff = [{"type": "cfg_cutoff", "step_ratio": 0.5}]
    specs = [make_spec(i, callbacks=cutoff, negative_prompt=f"blurry {i}") for i in range(2)]
    expected = [alone(chroma, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    prepared = [prepare(JobContext(s, f"two-{i}"), chroma, storage) for i, s in enumerate(specs)]
    with TransformerCalls(chroma.pipeline(MODEL).transformer) as calls:
        outcomes = denoise_batch(prepared, chroma)
    assert calls.per_step() == [2, 2, 2, 2, 1, 1], calls.per_step()
    for i in range(2):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"prompt {i} got another prompt's guidance"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"callbacks": [{"type": "cfg_cutoff", "step_ratio": 0.5}], "guidance_scale": 1.0},
            r"^callbacks\[0\]: 'tiny-chroma' \(chroma\) runs no negative pass at guidance_scale 1 \(<= 1\), so there "
            "is nothing to cut",
        ),
        (
            {"negative_prompt": "blurry", "guidance_scale": 0.5},
            r"^negative_prompt: 'tiny-chroma' \(chroma\) runs no negative pass at guidance_scale 0.5",
        ),
        (
            {"pipeline": "controlnet", "control_image": "file:///c.png"},
            r"^pipeline: 'tiny-chroma' \(chroma\) runs text2img, img2img, inpaint; got 'controlnet'",
        ),
        ({"ip_adapter": {"image": "file:///s.png"}}, r"^ip_adapter: 'tiny-chroma' \(chroma\) takes no IP-Adapter"),
        ({"clip_skip": 1}, r"^clip_skip: 'tiny-chroma' \(chroma\) has no CLIP layers to skip"),
        ({"scheduler": "euler_a"}, "^scheduler: 'tiny-chroma' is a flow-matching model and takes one of default"),
    ],
)
def test_what_chroma_cannot_run_is_refused_before_any_work_naming_the_field(
    chroma: ModelRegistry, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedSpecError, match=message):
        prepare(JobContext(make_spec(**overrides)), chroma, LocalStorage(Path("/nonexistent")))


def test_without_guidance_one_pass_a_step_runs(chroma: ModelRegistry, tmp_path: Path) -> None:
    with TransformerCalls(chroma.pipeline(MODEL).transformer) as calls:
        manifest = render(JobContext(make_spec(guidance_scale=1.0)), registry=chroma, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded" and calls.per_step() == [1] * 6


@pytest.mark.parametrize("sampler", list(FLOW_SAMPLERS))
def test_every_flow_sampler_renders_the_same_image_twice(chroma: ModelRegistry, tmp_path: Path, sampler: str) -> None:
    storage = LocalStorage(tmp_path)
    spec = make_spec(scheduler=sampler, num_inference_steps=4)
    first = render(JobContext(spec), registry=chroma, storage=storage)
    second = render(JobContext(spec), registry=chroma, storage=storage)
    assert first.status == second.status == "succeeded" and first.scheduler is not None
    assert first.scheduler.name == sampler
    assert first.steps_planned == first.steps_completed == 4
    assert np.array_equal(stored_pixels(storage, first.images[0]), stored_pixels(storage, second.images[0]))


def test_the_built_in_lora_changes_the_image_and_the_next_job_renders_as_on_a_fresh_pipeline(tmp_path: Path) -> None:
    registry = chroma_registry()
    storage = LocalStorage(tmp_path)
    plain = make_spec()
    before = render(JobContext(plain), registry=registry, storage=storage)
    styled = render(
        JobContext(make_spec(loras=[{"name": "tiny-lora", "scale": 1.0}])), registry=registry, storage=storage
    )
    after = render(JobContext(plain), registry=registry, storage=storage)
    assert styled.status == "succeeded" and styled.loras[0].name == "tiny-lora"
    first, lora, last = (stored_pixels(storage, m.images[0]) for m in (before, styled, after))
    assert np.abs(first.astype(int) - lora).mean() > 1.0, "the LoRA changed nothing"
    assert np.array_equal(first, last), "the LoRA leaked into the next job"


def test_the_family_is_found_from_its_pipeline_classes_and_named_in_the_manifest_and_png(
    chroma: ModelRegistry, tmp_path: Path
) -> None:
    assert isinstance(FAMILIES["chroma"], ChromaFamily)
    for name in ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"):
        assert family_of(name) is FAMILIES["chroma"], name
    storage = LocalStorage(tmp_path)
    manifest = render(JobContext(make_spec(num_inference_steps=2)), registry=chroma, storage=storage)
    assert manifest.family == "chroma"
    data = storage.get(storage.name_of(manifest.images[0]) or "")
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        assert image.info["render:family"] == "chroma"


def test_the_example_spec_renders(chroma: ModelRegistry, tmp_path: Path) -> None:
    spec = RenderSpec.parse(json.loads(EXAMPLE.read_text()))
    assert spec.model == MODEL and spec.width <= 128 and spec.height <= 128 and spec.num_inference_steps <= 10
    manifest = render(JobContext(spec), registry=chroma, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded" and len(manifest.images) == spec.num_images
    assert manifest.family == "chroma" and len(manifest.frames) > 0
