"""img2img, inpaint and ControlNet on both tiny models: guidance observed at every step, inputs checked first."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer import RenderSpec, SpecError
from tests.helpers import SIZE, pipeline_spec, pixels, png
from worker.engine.inputs import load_inputs
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.engine.stops import JobRevoked
from worker.models.registry import ModelRegistry
from worker.settings import WorkerSettings
from worker.storage import LocalStorage


@pytest.fixture
def inputs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


@pytest.fixture
def settings(inputs_dir: Path) -> WorkerSettings:
    return WorkerSettings(input_roots=[str(inputs_dir)], max_input_bytes=200_000, max_input_pixels=1024 * 1024)


class Spy:
    def __init__(self, module: Any) -> None:
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.batches.append((args[0] if args else kwargs["sample"]).shape[0])


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
@pytest.mark.parametrize("cutoff", [{"step_ratio": 0.5}, {"step_index": 2}], ids=["ratio", "index"])
@pytest.mark.parametrize("num_images", [1, 2])
def test_guidance_is_cut_at_the_asked_step(
    registry: ModelRegistry,
    settings: WorkerSettings,
    inputs_dir: Path,
    tmp_path: Path,
    model: str,
    kind: str,
    cutoff: dict[str, Any],
    num_images: int,
) -> None:
    spec = pipeline_spec(kind, inputs_dir, model, num_images=num_images, callbacks=[{"type": "cfg_cutoff", **cutoff}])
    pipe = registry.pipeline(model, kind)
    spies = [Spy(pipe.unet)] + ([Spy(pipe.controlnet)] if kind == "controlnet" else [])
    try:
        manifest = render(
            JobContext(spec, inputs=load_inputs(spec, settings)),
            registry=registry,
            storage=LocalStorage(tmp_path / "out"),
        )
    finally:
        for spy in spies:
            spy.handle.remove()
    steps = spec.denoising_steps  # 8 for img2img/inpaint at strength 0.8, else 10
    cut = cutoff.get("step_index", int(steps * cutoff.get("step_ratio", 0)))
    expected = [2 * num_images] * (cut + 1) + [num_images] * (steps - cut - 1)
    for spy in spies:
        assert spy.batches == expected
    assert manifest.status == "succeeded" and len(manifest.images) == num_images
    assert (manifest.steps_planned, manifest.steps_completed) == (steps, steps)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_variants_share_the_loaded_weights(registry: ModelRegistry, kind: str) -> None:
    base = registry.pipeline("tiny-sd15")
    assert registry.pipeline("tiny-sd15", kind).unet is base.unet
    assert registry.pipeline("tiny-sd15", kind) is registry.pipeline("tiny-sd15", kind)


def test_inline_base64_input(
    registry: ModelRegistry, settings: WorkerSettings, inputs_dir: Path, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), "teal").save(buffer, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    spec = RenderSpec.parse(
        {
            "model": "tiny-sd15",
            "pipeline": "img2img",
            "prompt": "p",
            "width": SIZE,
            "height": SIZE,
            "num_inference_steps": 4,
            "image": data,
        }
    )
    loaded = load_inputs(spec, settings)
    assert loaded["image"].getpixel((0, 0)) == (0, 128, 128)
    manifest = render(JobContext(spec, inputs=loaded), registry=registry, storage=LocalStorage(tmp_path))
    assert manifest.status == "succeeded" and manifest.steps_planned == 3


def bad(folder: Path, **fields: str) -> RenderSpec:
    base = {
        "model": "tiny-sd15",
        "pipeline": "inpaint",
        "prompt": "p",
        "width": SIZE,
        "height": SIZE,
        "image": png(folder / "ok.png"),
        "mask_image": png(folder / "okmask.png", mode="L"),
    }
    return RenderSpec.parse({**base, **fields})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: {"image": (d / "missing.png").as_uri()}, "image: .*missing.png does not exist"),
        (lambda d: {"image": "file:///etc/hostname"}, "image: /etc/hostname is outside the allowed input roots"),
        (lambda d: {"image": f"file://{d}/../../etc/hostname"}, "image: /.*/etc/hostname is outside the allowed"),
        (lambda d: {"image": d.as_uri()}, "image: .* is a directory"),
        (lambda d: {"mask_image": png(d / "small.png", (32, 32), "L")}, "mask_image: is 32x32 but the spec asks for"),
        (lambda d: {"image": png(d / "huge.png", (512, 512))}, "image: the image is .* bytes, over the 200000-byte"),
        (lambda d: {"image": "data:image/png;base64,@@@"}, "image: the inline image is not valid base64"),
        (
            lambda d: {"image": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()},
            "image: not a readable PNG, JPEG or WebP image",
        ),
    ],
)
def test_bad_image_inputs_are_refused_before_any_work(
    settings: WorkerSettings, inputs_dir: Path, make: Any, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        load_inputs(bad(inputs_dir, **make(inputs_dir)), settings)


def test_truncated_image_is_refused(settings: WorkerSettings, inputs_dir: Path) -> None:
    whole = Path(png(inputs_dir / "whole.png").removeprefix("file://")).read_bytes()
    (inputs_dir / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SpecError, match="image: not a readable PNG"):
        load_inputs(bad(inputs_dir, image=(inputs_dir / "cut.png").as_uri()), settings)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pipeline": "img2img"}, "image: pipeline 'img2img' needs it"),
        ({"pipeline": "inpaint", "image": "file:///a.png"}, "mask_image: pipeline 'inpaint' needs it"),
        ({"pipeline": "controlnet"}, "control_image: pipeline 'controlnet' needs it"),
        ({"image": "file:///a.png"}, "image: pipeline 'text2img' does not use it"),
        ({"pipeline": "img2img", "image": "http://example.com/a.png"}, "image: must be s3://bucket/key"),
        ({"pipeline": "img2img", "image": "file:///a.png", "strength": 0.05}, "strength: 0.05 x num_inference_steps"),
        (
            {
                "pipeline": "img2img",
                "image": "file:///a.png",
                "strength": 0.5,
                "callbacks": [{"type": "cfg_cutoff", "step_index": 6}],
            },
            "less than the 5 steps img2img runs",
        ),
    ],
)
def test_spec_checks_inputs_against_the_pipeline(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        RenderSpec.parse({"model": "tiny-sd15", "prompt": "p", "num_inference_steps": 10, **fields})


class ScaleSpy:
    """At every UNet call: the batch, the IP-Adapter scale in force, and the rows of its image embeddings."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[tuple[int, float, int]] = []
        self.handle = pipe.unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        processor = next(p for n, p in module.attn_processors.items() if n.endswith("attn2.processor"))
        embeds = (kwargs.get("added_cond_kwargs") or {}).get("image_embeds")
        rows = embeds[0].shape[0] if embeds else 0
        self.calls.append(((args[0] if args else kwargs["sample"]).shape[0], float(processor.scale[0]), rows))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint", "controlnet"])
@pytest.mark.parametrize("mode", ["ratio", "index"])
def test_ip_adapter_scale_cutoff_and_cfg_cutoff_together(
    registry: ModelRegistry,
    settings: WorkerSettings,
    inputs_dir: Path,
    tmp_path: Path,
    model: str,
    kind: str,
    mode: str,
) -> None:
    style = png(inputs_dir / "style.png", (48, 40))
    ip_cut = {"step_ratio": 0.25} if mode == "ratio" else {"step_index": 1}
    spec = pipeline_spec(
        kind,
        inputs_dir,
        model,
        num_images=2,
        ip_adapter={"image": style, "scale": 0.7},
        callbacks=[{"type": "ip_adapter_scale_cutoff", **ip_cut}, {"type": "cfg_cutoff", "step_index": 4}],
    )
    spy = ScaleSpy(registry.pipeline(model, kind))
    try:
        manifest = render(
            JobContext(spec, inputs=load_inputs(spec, settings)), registry=registry, storage=LocalStorage(tmp_path)
        )
    finally:
        spy.handle.remove()
    steps = spec.denoising_steps
    ip_off = ip_cut.get("step_index", int(steps * ip_cut.get("step_ratio", 0))) + 1
    expected = [(4 if i <= 4 else 2, 0.7 if i < ip_off else 0.0, 4 if i <= 4 else 2) for i in range(steps)]
    assert spy.calls == expected  # embeddings follow the batch through the CFG cutoff
    assert manifest.status == "succeeded"


def test_a_job_after_an_ip_adapter_job_renders_as_on_a_fresh_pipeline(
    registry: ModelRegistry, settings: WorkerSettings, inputs_dir: Path, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    plain = pipeline_spec("text2img", inputs_dir, num_images=2)
    ip_job = pipeline_spec(
        "text2img",
        inputs_dir,
        ip_adapter={"image": png(inputs_dir / "s.png")},
        callbacks=[{"type": "ip_adapter_scale_cutoff", "step_index": 2}],
    )
    render(JobContext(ip_job, inputs=load_inputs(ip_job, settings)), registry=registry, storage=storage)
    after = render(plain, registry=registry, storage=storage)
    pipe = registry.pipeline("tiny-sd15")
    assert pipe.image_encoder is None and not any(
        "IPAdapter" in type(p).__name__ for p in pipe.unet.attn_processors.values()
    )

    fresh = ModelRegistry(registry.models, device=registry.device, dtype=registry.dtype)
    again = render(plain, registry=fresh, storage=storage)

    assert [pixels(storage, u) for u in after.images] == [pixels(storage, u) for u in again.images]


class RevokeAtTwo:
    def on_step(self, info: Any) -> None:
        if info.steps_completed == 2:
            raise JobRevoked(2)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_a_job_after_a_revoked_and_an_interrupted_one_renders_as_on_a_fresh_pipeline(
    registry: ModelRegistry, settings: WorkerSettings, inputs_dir: Path, tmp_path: Path, kind: str
) -> None:
    storage = LocalStorage(tmp_path)
    cut = pipeline_spec(kind, inputs_dir, callbacks=[{"type": "cfg_cutoff", "step_index": 1}])
    budget = pipeline_spec(kind, inputs_dir, callbacks=[{"type": "step_budget", "max_steps": 2}])
    job = pipeline_spec(kind, inputs_dir, num_images=2)
    assert (
        render(
            JobContext(cut, inputs=load_inputs(cut, settings), hooks=[RevokeAtTwo()]),
            registry=registry,
            storage=storage,
        ).status
        == "revoked"
    )
    assert (
        render(JobContext(budget, inputs=load_inputs(budget, settings)), registry=registry, storage=storage).status
        == "interrupted"
    )
    after = render(JobContext(job, inputs=load_inputs(job, settings)), registry=registry, storage=storage)
    fresh = ModelRegistry(registry.models, device=registry.device, dtype=registry.dtype)
    again = render(JobContext(job, inputs=load_inputs(job, settings)), registry=fresh, storage=storage)
    assert [pixels(storage, u) for u in after.images] == [pixels(storage, u) for u in again.images]


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_a1111_prompts_with_weights_and_editing_run_on_every_pipeline_kind(
    registry: ModelRegistry, settings: WorkerSettings, inputs_dir: Path, tmp_path: Path, model: str, kind: str
) -> None:
    """Weights, a prompt switch after a CFG cutoff and two images on the image pipelines: the plain-equivalent
    `a1111` prompt gives the `plain` image, a weight changes it, and the switch reaches every row."""
    storage = LocalStorage(tmp_path / "out")

    def image(**overrides: Any) -> bytes:
        spec = pipeline_spec(kind, inputs_dir, model, num_images=2, **overrides)
        manifest = render(JobContext(spec, inputs=load_inputs(spec, settings)), registry=registry, storage=storage)
        assert manifest.status == "succeeded" and len(manifest.images) == 2, manifest.error
        return pixels(storage, manifest.images[1])

    plain = image(prompt="a red fox")
    assert image(prompt="a red fox", prompt_syntax="a1111") == plain
    assert image(prompt="a (red:1.4) fox", prompt_syntax="a1111") != plain
    edited = image(
        prompt="a [red:blue:4] fox",
        prompt_syntax="a1111",
        negative_prompt="blurry",
        callbacks=[{"type": "cfg_cutoff", "step_index": 1}],
    )
    assert edited != plain
