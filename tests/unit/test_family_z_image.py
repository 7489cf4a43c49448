"""Z-Image (base and Turbo) through every callback, on the tiny pipelines and the real diffusers loop: what works,
and a clear refusal, naming the spec's field, for what does not."""

from __future__ import annotations

import io
import json
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
from worker.models import tiny_z_image
from worker.models.families import FAMILIES, family_of
from worker.models.families.z_image import NEEDS_OWN_SIGMAS, ZImageFamily
from worker.models.flow_sampling import FLOW_SAMPLERS, make_flow_scheduler
from worker.models.registry import ModelRegistry
from worker.settings import LoraSource, ModelSource, WorkerSettings, default_loras
from worker.storage import LocalStorage

BASE, TURBO = "tiny-z-image", "tiny-z-image-turbo"
MODELS = [BASE, TURBO]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "text2img-z-image.json"


def registry_of() -> ModelRegistry:
    return ModelRegistry(
        {BASE: ModelSource(family="z-image", source="tiny"), TURBO: ModelSource(family="z-image", source="tiny-turbo")},
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_cached=2,
        loras=default_loras(),
    )


@pytest.fixture(scope="module")
def zi() -> ModelRegistry:
    return registry_of()


def make_spec(model: str, i: int = 0, **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": f"a lighthouse, take {i}", "num_inference_steps": 6, "width": 64, "height": 64}
    if model == BASE:
        data["guidance_scale"] = 4.0
    return RenderSpec.parse({**data, "seed": 100 + i, **overrides})


class Passes:
    """Counts the rows (images) of each transformer call: the transformer takes a list of per-image latents."""

    def __init__(self, transformer: Any) -> None:
        self.rows: list[int] = []
        self.handle = transformer.register_forward_pre_hook(lambda _module, args: self.rows.append(len(args[0])))

    def __enter__(self) -> Passes:
        return self

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()


def test_two_builds_are_identical_and_the_family_is_found() -> None:
    for builder in (tiny_z_image.build, tiny_z_image.build_turbo):
        first, second = builder(), builder()
        for component in ("transformer", "text_encoder", "vae"):
            a, b = getattr(first, component).state_dict(), getattr(second, component).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
        pad = first.transformer.cap_pad_token.detach()
        assert bool(torch.isfinite(pad).all()) and float(pad.abs().sum()) > 0, "the pad tokens are not drawn"
    turbo, base = tiny_z_image.build_turbo(), tiny_z_image.build()
    assert not torch.equal(turbo.transformer.x_pad_token, base.transformer.x_pad_token), "Turbo has base's weights"
    assert isinstance(FAMILIES["z-image"], ZImageFamily)
    assert family_of("ZImagePipeline") is family_of("ZImageInpaintPipeline") is FAMILIES["z-image"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint", "controlnet"])
def test_every_pipeline_kind_renders_the_same_pixels_twice(
    zi: ModelRegistry, tmp_path: Path, model: str, kind: str
) -> None:
    spec = pipeline_spec(
        kind, tmp_path, model, num_inference_steps=4, **({"strength": 0.8} if kind in ("img2img", "inpaint") else {})
    )
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    storage = LocalStorage(tmp_path / "out")
    manifest = render(JobContext(spec, inputs=inputs), registry=zi, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1, manifest.error
    assert manifest.scheduler is not None and manifest.scheduler.label == "Euler (flow)"
    assert manifest.family == "z-image"
    again = render(JobContext(spec, inputs=inputs), registry=zi, storage=storage)
    image = stored_pixels(storage, manifest.images[0])
    assert np.array_equal(stored_pixels(storage, again.images[0]), image)
    if kind == "controlnet":  # the control image is used: the same job as text2img differs
        plain_spec = pipeline_spec("text2img", tmp_path, model, num_inference_steps=4)
        plain = render(JobContext(plain_spec), registry=zi, storage=storage)
        assert np.abs(stored_pixels(storage, plain.images[0]).astype(int) - image).mean() > 1.0


def test_a_controlnet_job_resumes_byte_for_byte(zi: ModelRegistry, tmp_path: Path) -> None:
    spec = pipeline_spec("controlnet", tmp_path, BASE, num_inference_steps=6, negative_prompt="blurry")
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    check_resume(zi, tmp_path, spec, 4, inputs=inputs)


def test_a_controlnet_variant_first_built_after_a_lora_job_loads(tmp_path: Path) -> None:
    """The ControlNet borrows the transformer's refiners, which a LoRA job has wrapped in LoRA layers."""
    registry = registry_of()
    path = tmp_path / "z-image-style.safetensors"
    safetensors.torch.save_file(z_image_lora(registry.pipeline(BASE)), str(path))
    registry.loras = {"style": LoraSource(family="z-image", path=str(path))}
    storage = LocalStorage(tmp_path / "out")
    lora = render(
        JobContext(make_spec(BASE, loras=[{"name": "style", "scale": 1.0}])), registry=registry, storage=storage
    )
    assert lora.status == "succeeded"
    spec = pipeline_spec("controlnet", tmp_path, BASE, num_inference_steps=2)
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    manifest = render(JobContext(spec, inputs=inputs), registry=registry, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 1, manifest.error


@pytest.mark.parametrize("model", MODELS)
def test_a_revoke_stops_at_the_next_step_with_no_decode_and_no_image(
    zi: ModelRegistry, tmp_path: Path, model: str
) -> None:
    revoke = RevokeAt(2)
    decodes: list[int] = []
    handle = zi.pipeline(model).vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(1))
    try:
        manifest = render(JobContext(make_spec(model), hooks=[revoke]), registry=zi, storage=LocalStorage(tmp_path))
    finally:
        handle.remove()
    assert manifest.status == "revoked" and manifest.images == [] and manifest.steps_completed == 2
    assert revoke.calls == 2, "the loop went on past the revoking step"
    assert decodes == [], "a revoked job was decoded"


@pytest.mark.parametrize("model", MODELS)
def test_a_step_budget_interrupts_with_its_partial_image_and_frames_are_stored_at_the_asked_steps(
    zi: ModelRegistry, tmp_path: Path, model: str
) -> None:
    callbacks = [{"type": "step_budget", "max_steps": 4}, {"type": "frames", "every": 2, "format": "png"}]
    manifest = render(JobContext(make_spec(model, callbacks=callbacks)), registry=zi, storage=LocalStorage(tmp_path))
    assert manifest.status == "interrupted" and manifest.interrupted_by == "max_steps" and len(manifest.images) == 1
    assert manifest.steps_completed == 4
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-002.png", "step-004.png"]
    with Image.open(tmp_path / manifest.task_id / "frames" / "step-002.png") as frame:
        assert frame.size[0] > 0 and frame.mode == "RGB"
        assert np.asarray(frame).std() > 0, "the preview is flat"


@pytest.mark.parametrize("model", MODELS)
def test_a_resumed_job_makes_the_uninterrupted_image_byte_for_byte(
    zi: ModelRegistry, tmp_path: Path, model: str
) -> None:
    spec = make_spec(model, callbacks=[{"type": "frames", "every": 2}], num_images=2)
    manifest = check_resume(zi, tmp_path, spec, 4)
    assert manifest.resumed_from_step == 3


def test_a_job_cut_off_before_its_checkpoint_resumes_byte_for_byte(zi: ModelRegistry, tmp_path: Path) -> None:
    """The replay turns the transformer off; the cutoff still turns guidance off at its step, as it did before."""
    cutoff = [{"type": "cfg_cutoff", "step_index": 1}, {"type": "frames", "every": 2}]
    check_resume(zi, tmp_path, make_spec(BASE, callbacks=cutoff, negative_prompt="blurry"), 4)


@pytest.mark.parametrize("model", MODELS)
def test_four_compatible_jobs_share_calls_and_a_revoke_of_one_leaves_the_others_as_alone(
    zi: ModelRegistry, tmp_path: Path, model: str
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec(model, i) for i in range(4)]
    specs[2] = make_spec(model, 2, callbacks=[{"type": "step_budget", "max_steps": 3}])
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(zi, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    hooks: list[list[Any]] = [[], [RevokeAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"b-{i}", hooks=hooks[i]), zi, storage) for i, s in enumerate(specs)]
    with Passes(zi.pipeline(model).transformer) as passes:
        outcomes = denoise_batch(prepared, zi)
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]
    assert [m.status for m in manifests] == ["succeeded", "revoked", "interrupted", "succeeded"]
    assert manifests[0].batched_with == ["b-1", "b-2", "b-3"]
    # One call for the four: the base guides (positive and negative rows), Turbo does not; rows that left stay in.
    assert set(passes.rows) == {8 if model == BASE else 4} and len(passes.rows) == 6, passes.rows
    for i in (0, 2, 3):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1, f"job {i} differs from its render alone"


def test_the_cutoff_halves_the_passes_from_its_step_and_gives_the_unguided_steps_diffusers_gives(
    zi: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    pipe = zi.pipeline(BASE)
    cut = make_spec(BASE, negative_prompt="blurry", callbacks=[{"type": "cfg_cutoff", "step_index": 2}])
    with Passes(pipe.transformer) as passes:
        manifest = render(JobContext(cut), registry=zi, storage=storage)
    assert manifest.status == "succeeded"
    assert passes.rows == [2, 2, 2, 1, 1, 1], "guidance did not end after step 2"
    uncut = render(JobContext(make_spec(BASE, negative_prompt="blurry")), registry=zi, storage=storage)
    image = stored_pixels(storage, manifest.images[0])
    assert np.abs(image.astype(int) - stored_pixels(storage, uncut.images[0])).max() > 0, "the cutoff changed nothing"

    # The rule, straight on diffusers: guidance off (scale 0) from step 3 on, no worker callbacks.
    def guidance_off(pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if step == 2:
            pipeline._guidance_scale = 0.0
        return kwargs

    direct = pipe(
        prompt=cut.prompt,
        negative_prompt="blurry",
        guidance_scale=4.0,
        num_inference_steps=6,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(manifest.seed)],
        output_type="pil",
        callback_on_step_end=guidance_off,
    ).images[0]
    assert int(np.abs(np.asarray(direct, dtype=int) - image).max()) <= 1, "the cutoff is not guidance off"


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_the_cutoff_on_image_pipelines_returns_one_image_and_halves_the_passes(
    zi: ModelRegistry, tmp_path: Path, kind: str
) -> None:
    strength = {"strength": 1.0} if kind != "controlnet" else {}
    cutoff = [{"type": "cfg_cutoff", "step_ratio": 0.5}]
    spec = pipeline_spec(kind, tmp_path, BASE, num_inference_steps=6, callbacks=cutoff, **strength)
    inputs = load_inputs(spec, WorkerSettings(input_roots=[str(tmp_path)]))
    with Passes(zi.pipeline(BASE, kind).transformer) as passes:
        manifest = render(JobContext(spec, inputs=inputs), registry=zi, storage=LocalStorage(tmp_path / "out"))
    assert manifest.status == "succeeded" and len(manifest.images) == 1
    assert passes.rows == [2, 2, 2, 2, 1, 1], passes.rows


def test_turbo_refuses_a_cfg_cutoff_and_a_negative_prompt_saying_why_and_runs_unguided(
    zi: ModelRegistry, tmp_path: Path
) -> None:
    nowhere = LocalStorage(Path("/nonexistent"))
    spec = make_spec(TURBO, callbacks=[{"type": "frames", "every": 2}, {"type": "cfg_cutoff", "step_ratio": 0.5}])
    with pytest.raises(
        UnsupportedSpecError, match=r"^callbacks\[1\]: 'tiny-z-image-turbo' \(z-image\) is Z-Image-Turbo, .*no negative"
    ):
        prepare(JobContext(spec), zi, nowhere)
    with pytest.raises(UnsupportedSpecError, match=r"^negative_prompt: 'tiny-z-image-turbo' .*takes no negative"):
        prepare(JobContext(make_spec(TURBO, negative_prompt="blurry")), zi, nowhere)
    storage = LocalStorage(tmp_path)
    with Passes(zi.pipeline(TURBO).transformer) as passes:
        guided = render(JobContext(make_spec(TURBO, guidance_scale=7.5)), registry=zi, storage=storage)
    plain = render(JobContext(make_spec(TURBO, guidance_scale=0.0)), registry=zi, storage=storage)
    assert passes.rows == [1] * 6, "Turbo ran a negative pass"
    assert np.array_equal(stored_pixels(storage, guided.images[0]), stored_pixels(storage, plain.images[0]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scheduler": "euler_a"}, "^scheduler: 'tiny-z-image' is a flow-matching model"),
        (
            {"scheduler": "dpmpp_2m"},
            "^scheduler: 'tiny-z-image' \\(z-image\\) pipelines pass their own sigma schedule, which 'dpmpp_2m' cannot "
            "take; use one of default, flow_euler, flow_euler_sde, lcm$",
        ),
        ({"scheduler": "unipc"}, "^scheduler: 'tiny-z-image' \\(z-image\\) .* which 'unipc' cannot take"),
        (
            {"cache": {"type": "taylorseer"}},
            "^cache.type: 'tiny-z-image' \\(z-image\\) takes no 'taylorseer' step cache in this worker "
            "\\(it takes: none\\)",
        ),
        ({"cache": {"type": "first_block"}}, "^cache.type: 'tiny-z-image' \\(z-image\\) takes no 'first_block'"),
        ({"clip_skip": 1}, "^clip_skip: 'tiny-z-image' \\(z-image\\) has no CLIP layers to skip"),
        ({"ip_adapter": {"image": "file:///s.png"}}, "^ip_adapter: 'tiny-z-image' \\(z-image\\) takes no IP-Adapter"),
    ],
)
def test_what_the_family_cannot_run_is_refused_before_any_work_naming_the_field(
    zi: ModelRegistry, overrides: dict[str, Any], message: str
) -> None:
    """Step caches: ZImageTransformer2DModel has no diffusers CacheMixin (`enable_cache`) in 0.42.1."""
    assert not hasattr(zi.pipeline(BASE).transformer, "enable_cache")
    with pytest.raises(UnsupportedSpecError, match=message):
        prepare(JobContext(make_spec(BASE, **overrides)), zi, LocalStorage(Path("/nonexistent")))


@pytest.mark.parametrize(
    ("sampler", "error", "message"),
    [("dpmpp_2m", ValueError, "does not support custom sigmas"), ("unipc", TypeError, "can't multiply sequence")],
)
def test_the_refused_samplers_cannot_run_the_z_image_loop_in_diffusers(
    zi: ModelRegistry, sampler: str, error: type[Exception], message: str
) -> None:
    """Why they are refused: if a diffusers release lets them take sigmas, this fails and the refusal can go."""
    pipe = zi.pipeline(BASE)
    checkpoint = pipe.scheduler
    pipe.scheduler = make_flow_scheduler(sampler, checkpoint)[0]
    try:
        with pytest.raises(error, match=message):
            pipe(prompt="a lighthouse", num_inference_steps=2, width=64, height=64, output_type="latent")
    finally:
        pipe.scheduler = checkpoint


@pytest.mark.parametrize("sampler", [name for name in FLOW_SAMPLERS if name not in NEEDS_OWN_SIGMAS])
def test_every_flow_sampler_renders_the_same_image_twice(zi: ModelRegistry, tmp_path: Path, sampler: str) -> None:
    storage = LocalStorage(tmp_path)
    spec = make_spec(BASE, scheduler=sampler, num_inference_steps=4)
    first = render(JobContext(spec), registry=zi, storage=storage)
    second = render(JobContext(spec), registry=zi, storage=storage)
    assert first.status == second.status == "succeeded" and first.scheduler is not None, first.error
    assert first.scheduler.name == sampler
    assert np.array_equal(stored_pixels(storage, first.images[0]), stored_pixels(storage, second.images[0]))


def z_image_lora(pipe: Any, seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA in diffusers' format on the Z-Image transformer's attention projections (`.attention.`)."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, module in pipe.transformer.named_modules():
        if ".attention." in f"{name}." and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=generator) * 4.0 / rank**0.5
            weights |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
    return weights


def lora_renders(registry: ModelRegistry, model: str, name: str, storage: LocalStorage) -> list[np.ndarray]:
    """The pixels of a plain job, a job with the LoRA `name`, and the plain job again."""
    plain = make_spec(model)
    before = render(JobContext(plain), registry=registry, storage=storage)
    styled = render(
        JobContext(make_spec(model, loras=[{"name": name, "scale": 1.0}])), registry=registry, storage=storage
    )
    after = render(JobContext(plain), registry=registry, storage=storage)
    assert styled.status == "succeeded" and styled.loras[0].name == name, styled.error
    assert len(styled.loras[0].sha256) == 64
    return [stored_pixels(storage, m.images[0]) for m in (before, styled, after)]


@pytest.mark.parametrize("model", MODELS)
def test_a_lora_file_changes_the_image_and_the_next_job_renders_as_on_a_fresh_pipeline(
    tmp_path: Path, model: str
) -> None:
    registry = registry_of()
    path = tmp_path / "z-image-style.safetensors"
    safetensors.torch.save_file(z_image_lora(registry.pipeline(model)), str(path))
    registry.loras = {"style": LoraSource(family="z-image", path=str(path))}
    first, lora, last = lora_renders(registry, model, "style", LocalStorage(tmp_path / "out"))
    assert np.abs(first.astype(int) - lora).mean() > 1.0, "the LoRA changed nothing"
    assert np.array_equal(first, last), "the LoRA leaked into the next job"
    registry.loras = {"style": LoraSource(family="flux", path=str(path))}
    with pytest.raises(
        UnsupportedSpecError, match=f"loras\\[0\\].name: 'style' is an flux LoRA; model '{model}' is z-"
    ):
        prepare(JobContext(make_spec(model, loras=[{"name": "style", "scale": 1.0}])), registry, LocalStorage(tmp_path))


def test_the_built_in_tiny_lora_changes_the_image(tmp_path: Path) -> None:
    first, lora, last = lora_renders(registry_of(), BASE, "tiny-lora", LocalStorage(tmp_path))
    assert np.abs(first.astype(int) - lora).mean() > 1.0 and np.array_equal(first, last)


def test_the_manifest_and_the_png_name_the_family(zi: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    manifest = render(JobContext(make_spec(TURBO, num_inference_steps=2)), registry=zi, storage=storage)
    assert manifest.family == "z-image"
    data = storage.get(storage.name_of(manifest.images[0]) or "")
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        assert image.info["render:family"] == "z-image"


def test_the_example_spec_renders(zi: ModelRegistry, tmp_path: Path) -> None:
    spec = RenderSpec.parse(json.loads(EXAMPLE.read_text()))
    assert spec.model == BASE and spec.width <= 128 and spec.height <= 128 and spec.num_inference_steps <= 10
    manifest = render(JobContext(spec), registry=zi, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded" and len(manifest.images) == spec.num_images, manifest.error
    assert len(manifest.frames) == spec.num_inference_steps // 2  # every 2 steps, the images side by side
