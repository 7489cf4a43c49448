"""Flux.1 and SD3.5 through every callback, on the tiny pipelines and the real diffusers loop: what works on each
family, and a clear refusal, naming the spec's field, for what does not."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
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
from worker.models.flow_sampling import FLOW_SAMPLERS
from worker.models.loras import tiny_state_dict
from worker.models.registry import ModelRegistry
from worker.settings import LoraSource, WorkerSettings, default_models
from worker.storage import LocalStorage

DIT = ["tiny-flux", "tiny-flux-schnell", "tiny-sd3"]


@pytest.fixture(scope="module")
def dit() -> ModelRegistry:
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, max_cached=4)


def make_spec(model: str, i: int = 0, **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": f"a lighthouse, take {i}", "num_inference_steps": 6, "width": 64, "height": 64}
    return RenderSpec.parse({**data, "seed": 100 + i, **overrides})


KINDS = [(model, kind) for model in DIT for kind in ("text2img", "img2img", "inpaint")] + [("tiny-flux", "controlnet")]


@pytest.mark.parametrize(("model", "kind"), KINDS)
def test_every_pipeline_kind_renders_and_the_manifest_names_the_sampler(
    dit: ModelRegistry, tmp_path: Path, model: str, kind: str
) -> None:
    spec = pipeline_spec(
        kind, tmp_path, model, num_inference_steps=4, **({"strength": 0.8} if kind != "text2img" else {})
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    storage = LocalStorage(tmp_path / "out")
    manifest = render(JobContext(spec, inputs=inputs), registry=dit, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    assert manifest.scheduler is not None and manifest.scheduler.label == "Euler (flow)"
    again = render(JobContext(spec, inputs=inputs), registry=dit, storage=storage)
    assert np.array_equal(stored_pixels(storage, again.images[0]), stored_pixels(storage, manifest.images[0]))


@pytest.mark.parametrize("model", DIT)
def test_a_revoke_stops_at_the_next_step_with_no_decode_and_no_image(
    dit: ModelRegistry, tmp_path: Path, model: str
) -> None:
    revoke = RevokeAt(2)
    decodes: list[int] = []
    vae = dit.pipeline(model).vae
    handle = vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(1))
    try:
        manifest = render(JobContext(make_spec(model), hooks=[revoke]), registry=dit, storage=LocalStorage(tmp_path))
    finally:
        handle.remove()
    assert manifest.status == "revoked" and manifest.images == [] and manifest.steps_completed == 2
    assert revoke.calls == 2, "the loop went on past the revoking step"
    assert decodes == [], "a revoked job was decoded"


@pytest.mark.parametrize("model", DIT)
def test_a_step_budget_interrupts_with_its_partial_image_and_frames_are_stored_at_the_asked_steps(
    dit: ModelRegistry, tmp_path: Path, model: str
) -> None:
    callbacks = [{"type": "step_budget", "max_steps": 4}, {"type": "frames", "every": 2, "format": "png"}]
    manifest = render(JobContext(make_spec(model, callbacks=callbacks)), registry=dit, storage=LocalStorage(tmp_path))
    assert manifest.status == "interrupted" and manifest.interrupted_by == "max_steps" and len(manifest.images) == 1
    assert manifest.steps_completed == 4
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-002.png", "step-004.png"]
    with Image.open(tmp_path / manifest.task_id / "frames" / "step-002.png") as frame:
        assert frame.size[0] > 0 and frame.mode == "RGB"


@pytest.mark.parametrize("model", DIT)
def test_a_resumed_job_makes_the_uninterrupted_image_byte_for_byte(
    dit: ModelRegistry, tmp_path: Path, model: str
) -> None:
    manifest = check_resume(dit, tmp_path, make_spec(model, callbacks=[{"type": "frames", "every": 2}]), 4)
    assert manifest.resumed_from_step == 3


def test_an_sd3_job_cut_off_before_its_checkpoint_resumes_byte_for_byte(dit: ModelRegistry, tmp_path: Path) -> None:
    """The replay turns the transformer off and the cutoff halves it: both hold it at once, and let go in turn."""
    cutoff = [{"type": "cfg_cutoff", "step_index": 1}, {"type": "frames", "every": 2}]
    check_resume(dit, tmp_path, make_spec("tiny-sd3", callbacks=cutoff, negative_prompt="blurry"), 4)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_four_compatible_jobs_share_calls_and_a_revoke_of_one_leaves_the_others_as_alone(
    dit: ModelRegistry, tmp_path: Path, model: str
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec(model, i) for i in range(4)]
    specs[2] = make_spec(model, 2, callbacks=[{"type": "step_budget", "max_steps": 3}])
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(dit, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    hooks: list[list[Any]] = [[], [RevokeAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"b-{i}", hooks=hooks[i]), dit, storage) for i, s in enumerate(specs)]
    outcomes = denoise_batch(prepared, dit)
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]
    assert [m.status for m in manifests] == ["succeeded", "revoked", "interrupted", "succeeded"]
    assert manifests[0].batched_with == ["b-1", "b-2", "b-3"]
    for i in (0, 2, 3):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"job {i} differs from its render alone"


def test_the_sd3_cutoff_gives_each_of_two_prompts_in_one_call_what_its_own_call_gives(
    dit: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    cutoff = [{"type": "cfg_cutoff", "step_ratio": 0.5}]
    specs = [make_spec("tiny-sd3", i, callbacks=cutoff, negative_prompt="blurry") for i in range(2)]
    expected = [alone(dit, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    uncut = alone(dit, storage, make_spec("tiny-sd3", 0, negative_prompt="blurry"), "uncut")
    prepared = [prepare(JobContext(s, f"two-{i}"), dit, storage) for i, s in enumerate(specs)]
    outcomes = denoise_batch(prepared, dit)
    for i in range(2):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"prompt {i} got another prompt's guidance"
    assert max_diff(expected[0].images, uncut.images) > 0, "the cutoff changed nothing"


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_the_sd3_cutoff_on_image_pipelines_returns_one_image_per_prompt_and_halves_the_passes(
    dit: ModelRegistry, tmp_path: Path, kind: str
) -> None:
    spec = pipeline_spec(
        kind,
        tmp_path,
        "tiny-sd3",
        num_inference_steps=6,
        strength=1.0,
        callbacks=[{"type": "cfg_cutoff", "step_index": 2}],
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    rows: list[int] = []
    transformer = dit.pipeline("tiny-sd3", kind).transformer
    # Inside the transformer (its patch embedding): the rows it really runs on, after the cutoff's halving.
    handle = transformer.pos_embed.register_forward_pre_hook(lambda _module, args: rows.append(args[0].shape[0]))
    try:
        manifest = render(JobContext(spec, inputs=inputs), registry=dit, storage=LocalStorage(tmp_path / "out"))
    finally:
        handle.remove()
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    assert rows[:3] == [2, 2, 2] and set(rows[3:]) == {1}, rows
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks, "the cutoff left its hooks"


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-flux-schnell"])
def test_flux_refuses_a_cfg_cutoff_and_a_negative_prompt_saying_why(dit: ModelRegistry, model: str) -> None:
    spec = make_spec(model, callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}])
    with pytest.raises(
        UnsupportedSpecError, match=r"^callbacks\[0\]: .* has distilled guidance; there is no unconditional pass to cut"
    ):
        prepare(JobContext(spec), dit, LocalStorage(Path("/nonexistent")))
    with pytest.raises(UnsupportedSpecError, match="^negative_prompt: .*distilled guidance"):
        prepare(JobContext(make_spec(model, negative_prompt="blurry")), dit, LocalStorage(Path("/nonexistent")))


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        (
            "tiny-flux",
            {"scheduler": "euler_a"},
            "^scheduler: 'tiny-flux' is a flow-matching model and takes one of default, flow_euler",
        ),
        ("tiny-sd15", {"scheduler": "flow_euler"}, "^scheduler: 'tiny-sd15' \\(sd15\\) takes one of: default, euler"),
        ("tiny-sd3", {"clip_skip": 1}, "^clip_skip: 'tiny-sd3' \\(sd3\\) has no CLIP layers to skip"),
        (
            "tiny-sd3",
            {"pipeline": "controlnet", "control_image": "file:///c.png"},
            "^pipeline: 'tiny-sd3' \\(sd3\\) runs text2img, img2img, inpaint; got 'controlnet'",
        ),
        (
            "tiny-sd3",
            {"ip_adapter": {"image": "file:///s.png"}},
            "^ip_adapter: 'tiny-sd3' \\(sd3\\) takes no IP-Adapter",
        ),
    ],
)
def test_what_a_family_cannot_run_is_refused_before_any_work_naming_the_field(
    dit: ModelRegistry, model: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedSpecError, match=message):
        prepare(JobContext(make_spec(model, **overrides)), dit, LocalStorage(Path("/nonexistent")))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("sampler", list(FLOW_SAMPLERS))
def test_every_flow_sampler_renders_the_same_image_twice(
    dit: ModelRegistry, tmp_path: Path, model: str, sampler: str
) -> None:
    storage = LocalStorage(tmp_path)
    spec = make_spec(model, scheduler=sampler, num_inference_steps=4)
    first = render(JobContext(spec), registry=dit, storage=storage)
    second = render(JobContext(spec), registry=dit, storage=storage)
    assert first.status == second.status == "succeeded" and first.scheduler is not None
    assert first.scheduler.name == sampler
    assert np.array_equal(stored_pixels(storage, first.images[0]), stored_pixels(storage, second.images[0]))


def test_each_family_is_found_from_the_pipeline_class_a_model_index_names() -> None:
    assert {name: family_of(f.pipelines["text2img"].__name__) for name, f in FAMILIES.items()} == FAMILIES
    assert family_of("StableDiffusion3Img2ImgPipeline") is FAMILIES["sd3"]
    assert family_of("WanPipeline") is None


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("tiny-flux", "flux"),
        ("tiny-sd3", "sd3"),
        ("tiny-qwen-image", "qwen-image"),
        ("tiny-z-image", "z-image"),
        ("tiny-flux2", "flux2"),
        ("tiny-chroma", "chroma"),
    ],
)
def test_a_lora_file_changes_the_image_and_the_next_job_renders_as_on_a_fresh_pipeline(
    tmp_path: Path, model: str, family: str
) -> None:
    models = {model: default_models()[model]}
    registry = ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32)
    path = tmp_path / f"{family}-style.safetensors"
    safetensors.torch.save_file(tiny_state_dict(registry.pipeline(model)), str(path))
    registry.loras = {"style": LoraSource(family=family, path=str(path))}
    storage = LocalStorage(tmp_path / "out")
    plain = make_spec(model)
    before = render(JobContext(plain), registry=registry, storage=storage)
    styled = render(
        JobContext(make_spec(model, loras=[{"name": "style", "scale": 1.0}])), registry=registry, storage=storage
    )
    after = render(JobContext(plain), registry=registry, storage=storage)
    assert styled.loras[0].name == "style" and len(styled.loras[0].sha256) == 64
    first, lora, last = (stored_pixels(storage, m.images[0]) for m in (before, styled, after))
    assert np.abs(first.astype(int) - lora).mean() > 0.5, "the LoRA changed nothing"  # Flux.2: 0.93
    assert np.array_equal(first, last), "the LoRA leaked into the next job"
    other = "sd15" if family != "sd15" else "sdxl"
    registry.loras = {"style": LoraSource(family=other, path=str(path))}
    with pytest.raises(
        UnsupportedSpecError, match=f"loras\\[0\\].name: 'style' is an {other} LoRA; model '{model}' is {family}"
    ):
        prepare(JobContext(make_spec(model, loras=[{"name": "style", "scale": 1.0}])), registry, storage)


@pytest.mark.parametrize(
    ("model", "family"), [("tiny-sd15", "sd15"), ("tiny-flux-schnell", "flux"), ("tiny-sd3", "sd3")]
)
def test_the_manifest_and_the_png_name_the_family(dit: ModelRegistry, tmp_path: Path, model: str, family: str) -> None:
    storage = LocalStorage(tmp_path)
    manifest = render(JobContext(make_spec(model, num_inference_steps=2)), registry=dit, storage=storage)
    assert manifest.family == family
    data = storage.get(storage.name_of(manifest.images[0]) or "")
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        assert image.info["render:family"] == family


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-flux"])
def test_a_controlnet_variant_first_built_after_a_lora_job_loads(tmp_path: Path, model: str) -> None:
    """The tiny ControlNet is shaped from the model; LoRA layers in the shared model must not break it."""
    registry = ModelRegistry({model: default_models()[model]}, device=torch.device("cpu"), dtype=torch.float32)
    storage = LocalStorage(tmp_path / "out")
    lora = render(
        JobContext(make_spec(model, loras=[{"name": "tiny-lora", "scale": 1.0}])), registry=registry, storage=storage
    )
    assert lora.status == "succeeded"
    spec = pipeline_spec("controlnet", tmp_path, model, num_inference_steps=2)
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    manifest = render(JobContext(spec, inputs=inputs), registry=registry, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1


def test_flux_true_cfg_runs_a_negative_pass_that_the_cutoff_stops_exactly(dit: ModelRegistry, tmp_path: Path) -> None:
    """Flux.1 with `true_cfg_scale` runs the negative prompt as a second transformer call per step, decided before
    the loop; its cutoff answers that call with the positive output from the cutoff on (calls per step 2 -> 1)."""
    storage = LocalStorage(tmp_path)
    calls: list[int] = []
    transformer = dit.pipeline("tiny-flux").transformer
    handle = transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    true_cfg = {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}

    def run(**overrides: Any) -> tuple[int, np.ndarray]:
        before = len(calls)
        manifest = render(JobContext(make_spec("tiny-flux", **overrides)), registry=dit, storage=storage)
        assert manifest.status == "succeeded"
        return len(calls) - before, stored_pixels(storage, manifest.images[0])

    try:
        uncut_calls, uncut = run(**true_cfg)
        cut_calls, cut = run(**true_cfg, callbacks=[{"type": "cfg_cutoff", "step_index": 2}])
        late_calls, late = run(**true_cfg, callbacks=[{"type": "cfg_cutoff", "step_index": 5}])
        _, distilled = run()
    finally:
        handle.remove()
    assert (uncut_calls, cut_calls, late_calls) == (12, 3 * 2 + 3, 12)
    assert np.array_equal(late, uncut), "a cutoff at the last step changed the image"
    assert not np.array_equal(cut, uncut) and not np.array_equal(cut, distilled)
    assert (
        type(transformer).__name__ == "FluxTransformer2DModel" and "_negative_pass_cutoff" not in transformer.__dict__
    )
