"""Qwen-Image through every callback, on the tiny pipeline and the real diffusers loop: what works, and a clear
refusal, naming the spec's field, for what does not."""

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
from worker.models.families import FAMILIES, family_of
from worker.models.families.qwen_image import UNSIGMAED
from worker.models.flow_sampling import FLOW_SAMPLERS
from worker.models.registry import ModelRegistry
from worker.models.tiny_qwen_image import build
from worker.settings import ModelSource, WorkerSettings, default_loras
from worker.storage import LocalStorage

MODEL = "tiny-qwen-image"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen() -> ModelRegistry:
    models = {MODEL: ModelSource(family="qwen-image", source="tiny")}
    return ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32, max_cached=2, loras=default_loras())


def make_spec(i: int = 0, **overrides: Any) -> RenderSpec:
    # Prompts of different lengths: a shared call pads them, and its prompt masks must keep each row as alone.
    data = {"model": MODEL, "prompt": "a lighthouse" + ", at dusk" * i, "num_inference_steps": 6}
    return RenderSpec.parse({**data, "width": 64, "height": 64, "guidance_scale": 4.0, "seed": 100 + i, **overrides})


def test_two_builds_are_identical() -> None:
    first, second = build().transformer.state_dict(), build().transformer.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    encoders = build().text_encoder.state_dict(), build().text_encoder.state_dict()
    assert all(torch.equal(encoders[0][k], encoders[1][k]) for k in encoders[0])


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_every_pipeline_kind_renders_the_same_image_twice(qwen: ModelRegistry, tmp_path: Path, kind: str) -> None:
    overrides = {"strength": 0.8} if kind != "text2img" else {}
    spec = pipeline_spec(kind, tmp_path, MODEL, num_inference_steps=3, negative_prompt="blurry", **overrides)
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    storage = LocalStorage(tmp_path / "out")
    manifest = render(JobContext(spec, inputs=inputs), registry=qwen, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    assert manifest.scheduler is not None and manifest.scheduler.label == "Euler (flow)"
    first = stored_pixels(storage, manifest.images[0])
    assert first.shape == (64, 64, 3) and first.std() > 0
    again = render(JobContext(spec, inputs=inputs), registry=qwen, storage=storage)
    assert np.array_equal(stored_pixels(storage, again.images[0]), first)


def test_a_revoke_stops_at_the_next_step_with_no_decode_and_no_image(qwen: ModelRegistry, tmp_path: Path) -> None:
    revoke = RevokeAt(2)
    decodes: list[int] = []
    handle = qwen.pipeline(MODEL).vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(1))
    try:
        manifest = render(JobContext(make_spec(), hooks=[revoke]), registry=qwen, storage=LocalStorage(tmp_path))
    finally:
        handle.remove()
    assert manifest.status == "revoked" and manifest.images == [] and manifest.steps_completed == 2
    assert revoke.calls == 2, "the loop went on past the revoking step"
    assert decodes == [], "a revoked job was decoded"


def test_a_step_budget_interrupts_with_its_partial_image_and_frames_are_stored_at_the_asked_steps(
    qwen: ModelRegistry, tmp_path: Path
) -> None:
    callbacks = [{"type": "step_budget", "max_steps": 4}, {"type": "frames", "every": 2, "format": "png"}]
    manifest = render(JobContext(make_spec(callbacks=callbacks)), registry=qwen, storage=LocalStorage(tmp_path))
    assert manifest.status == "interrupted" and manifest.interrupted_by == "max_steps" and len(manifest.images) == 1
    assert manifest.steps_completed == 4
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-002.png", "step-004.png"]
    with Image.open(tmp_path / manifest.task_id / "frames" / "step-004.png") as frame:
        assert frame.size[0] > 0 and frame.mode == "RGB"
        assert np.asarray(frame).std() > 0, "the preview is one flat colour"


def test_a_resumed_job_makes_the_uninterrupted_image_byte_for_byte(qwen: ModelRegistry, tmp_path: Path) -> None:
    manifest = check_resume(qwen, tmp_path, make_spec(callbacks=[{"type": "frames", "every": 2}]), 4)
    assert manifest.resumed_from_step == 3


def test_a_job_cut_off_before_its_checkpoint_resumes_byte_for_byte(qwen: ModelRegistry, tmp_path: Path) -> None:
    """The replay turns the transformer off and the cutoff answers its negative calls: both hold it at once."""
    cutoff = [{"type": "cfg_cutoff", "step_index": 1}, {"type": "frames", "every": 2}]
    check_resume(qwen, tmp_path, make_spec(callbacks=cutoff, negative_prompt="blurry"), 4)
    transformer = qwen.pipeline(MODEL).transformer
    assert type(transformer).__module__.startswith("diffusers."), "the cutoff left its class on the transformer"


def test_four_compatible_jobs_share_calls_and_a_revoke_of_one_leaves_the_others_as_alone(
    qwen: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec(i) for i in range(4)]
    specs[2] = make_spec(2, callbacks=[{"type": "step_budget", "max_steps": 3}])
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(qwen, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    hooks: list[list[Any]] = [[], [RevokeAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"b-{i}", hooks=hooks[i]), qwen, storage) for i, s in enumerate(specs)]
    rows: list[int] = []
    transformer = qwen.pipeline(MODEL).transformer
    handle = transformer.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        outcomes = denoise_batch(prepared, qwen)
    finally:
        handle.remove()
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]
    assert [m.status for m in manifests] == ["succeeded", "revoked", "interrupted", "succeeded"]
    assert manifests[0].batched_with == ["b-1", "b-2", "b-3"]
    assert set(rows) == {4}, "rows that left the call were dropped, but the prompt masks cannot follow"
    for i in (0, 2, 3):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"job {i} differs from its render alone"


def test_the_cutoff_gives_each_of_two_prompts_in_one_call_what_its_own_call_gives(
    qwen: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    cutoff = [{"type": "cfg_cutoff", "step_ratio": 0.5}]
    specs = [make_spec(i, callbacks=cutoff, negative_prompt="blurry") for i in range(2)]
    expected = [alone(qwen, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    uncut = alone(qwen, storage, make_spec(0, negative_prompt="blurry"), "uncut")
    prepared = [prepare(JobContext(s, f"two-{i}"), qwen, storage) for i, s in enumerate(specs)]
    outcomes = denoise_batch(prepared, qwen)
    for i in range(2):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"prompt {i} got another prompt's guidance"
    assert max_diff(expected[0].images, uncut.images) > 0, "the cutoff changed nothing"


class SkipNegativeFrom:
    """The reference for the cutoff, by other means: the transformer runs every call, and from step `step` on
    the negative call's output (each step's second call) is replaced by the same step's positive output."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.calls = 0
        self.positive: Any = None

    def __call__(self, _module: Any, _args: Any, _kwargs: Any, output: Any) -> Any:
        step, negative = divmod(self.calls, 2)
        self.calls += 1
        if not negative:
            self.positive = output
            return None
        return self.positive if step >= self.step else None


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_the_cutoff_halves_the_transformer_calls_and_gives_the_positive_only_image(
    qwen: ModelRegistry, tmp_path: Path, kind: str
) -> None:
    overrides = {"strength": 1.0} if kind != "text2img" else {}
    base = {"num_inference_steps": 6, "guidance_scale": 4.0, "negative_prompt": "blurry", **overrides}
    spec = pipeline_spec(kind, tmp_path, MODEL, callbacks=[{"type": "cfg_cutoff", "step_index": 2}], **base)
    plain = pipeline_spec(kind, tmp_path, MODEL, **base)
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    storage = LocalStorage(tmp_path / "out")
    transformer = qwen.pipeline(MODEL, kind).transformer
    calls: list[float] = []
    counting = transformer.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(float(kw["timestep"][0])), with_kwargs=True
    )
    try:
        cut = render(JobContext(spec, inputs=inputs), registry=qwen, storage=storage)
    finally:
        counting.remove()
    assert cut.status == "succeeded" and len(cut.images) == 1
    per_step = [calls.count(t) for t in dict.fromkeys(calls)]
    assert per_step == [2, 2, 2, 1, 1, 1], per_step  # steps 0-2 guided, the rest one (positive) pass each
    assert type(transformer).__module__.startswith("diffusers."), "the cutoff left its class on the transformer"
    reference = transformer.register_forward_hook(SkipNegativeFrom(3), with_kwargs=True)
    try:
        skipped = render(JobContext(plain, inputs=inputs), registry=qwen, storage=storage)
    finally:
        reference.remove()
    uncut = render(JobContext(plain, inputs=inputs), registry=qwen, storage=storage)
    cut_pixels = stored_pixels(storage, cut.images[0])
    assert np.array_equal(cut_pixels, stored_pixels(storage, skipped.images[0])), "the cutoff is not positive-only"
    assert not np.array_equal(cut_pixels, stored_pixels(storage, uncut.images[0])), "the cutoff changed nothing"


def test_guidance_scale_is_true_cfg_with_an_empty_negative_prompt(qwen: ModelRegistry, tmp_path: Path) -> None:
    """A scale above 1 guides against an empty prompt (two passes a step); 1 or less runs one pass, any negative
    prompt unused."""
    storage = LocalStorage(tmp_path)
    calls: list[int] = []
    transformer = qwen.pipeline(MODEL).transformer
    handle = transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        guided = render(JobContext(make_spec(num_inference_steps=2)), registry=qwen, storage=storage)
        assert len(calls) == 4
        calls.clear()
        unguided = render(
            JobContext(make_spec(num_inference_steps=2, guidance_scale=1.0, negative_prompt="blurry")),
            registry=qwen,
            storage=storage,
        )
        assert len(calls) == 2
    finally:
        handle.remove()
    empty = render(JobContext(make_spec(num_inference_steps=2, negative_prompt=" ")), registry=qwen, storage=storage)
    images = [stored_pixels(storage, m.images[0]) for m in (guided, unguided, empty)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"pipeline": "controlnet", "control_image": "file:///c.png"},
            "^pipeline: 'tiny-qwen-image' \\(qwen-image\\) runs text2img, img2img, inpaint; got 'controlnet'",
        ),
        ({"clip_skip": 1}, "^clip_skip: 'tiny-qwen-image' \\(qwen-image\\) has no CLIP layers to skip"),
        ({"ip_adapter": {"image": "file:///s.png"}}, "^ip_adapter: 'tiny-qwen-image' \\(qwen-image\\) takes no IP"),
        ({"scheduler": "euler_a"}, "^scheduler: 'tiny-qwen-image' is a flow-matching model"),
        (
            {"scheduler": "dpmpp_2m"},
            "^scheduler: 'tiny-qwen-image' \\(qwen-image\\) cannot run 'dpmpp_2m': .* own sigma schedule.*use one of "
            "default, flow_euler, flow_euler_sde, unipc, lcm$",
        ),
    ],
)
def test_what_the_family_cannot_run_is_refused_before_any_work_naming_the_field(
    qwen: ModelRegistry, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedSpecError, match=message):
        prepare(JobContext(make_spec(**overrides)), qwen, LocalStorage(Path("/nonexistent")))


@pytest.mark.parametrize("sampler", [name for name in FLOW_SAMPLERS if name not in UNSIGMAED])
def test_every_flow_sampler_renders_the_same_image_twice(qwen: ModelRegistry, tmp_path: Path, sampler: str) -> None:
    storage = LocalStorage(tmp_path)
    spec = make_spec(scheduler=sampler, num_inference_steps=3)
    first = render(JobContext(spec), registry=qwen, storage=storage)
    second = render(JobContext(spec), registry=qwen, storage=storage)
    assert first.status == second.status == "succeeded" and first.scheduler is not None
    assert first.scheduler.name == sampler
    assert np.array_equal(stored_pixels(storage, first.images[0]), stored_pixels(storage, second.images[0]))


def test_the_tiny_lora_changes_the_image_and_the_next_job_renders_as_on_a_fresh_pipeline(
    qwen: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    plain = make_spec(num_inference_steps=3)
    before = render(JobContext(plain), registry=qwen, storage=storage)
    styled = render(
        JobContext(make_spec(num_inference_steps=3, loras=[{"name": "tiny-lora", "scale": 1.0}])),
        registry=qwen,
        storage=storage,
    )
    after = render(JobContext(plain), registry=qwen, storage=storage)
    assert styled.loras[0].name == "tiny-lora" and len(styled.loras[0].sha256) == 64
    first, lora, last = (stored_pixels(storage, m.images[0]) for m in (before, styled, after))
    assert np.abs(first.astype(int) - lora).mean() > 1.0, "the LoRA changed nothing"
    assert np.array_equal(first, last), "the LoRA leaked into the next job"


def test_the_family_is_found_and_the_manifest_and_the_png_name_it(qwen: ModelRegistry, tmp_path: Path) -> None:
    assert family_of("QwenImagePipeline") is FAMILIES["qwen-image"] is family_of("QwenImageInpaintPipeline")
    storage = LocalStorage(tmp_path)
    manifest = render(JobContext(make_spec(num_inference_steps=2)), registry=qwen, storage=storage)
    assert manifest.family == "qwen-image"
    data = storage.get(storage.name_of(manifest.images[0]) or "")
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        assert image.info["render:family"] == "qwen-image"


def test_the_example_spec_renders(qwen: ModelRegistry, tmp_path: Path) -> None:
    spec = RenderSpec.parse(json.loads((ROOT / "examples" / "text2img-qwen-image.json").read_text()))
    assert spec.model == MODEL and spec.width <= 128 and spec.height <= 128 and spec.num_inference_steps <= 10
    manifest = render(JobContext(spec), registry=qwen, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded" and len(manifest.images) == spec.num_images and manifest.frames
