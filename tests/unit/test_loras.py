"""LoRAs on the real tiny pipelines through diffusers' own loaders: effect, file formats, errors, hygiene, cache."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from producer import ConfigError, ModelError, SpecError
from producer.spec import LoraRef
from worker.engine.stops import JobRevoked
from worker.models import ip_adapter
from worker.models.loras import adapter_name, state_dict_sha256, tiny_state_dict
from worker.models.registry import ModelRegistry
from worker.settings import LoraSource, ModelSource, WorkerSettings, default_models, load_settings

FAMILIES = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
TINY = [LoraRef(name="tiny-lora")]


def make_registry(loras: dict[str, LoraSource] | None = None, **options: Any) -> ModelRegistry:
    options.setdefault("max_cached", 2)
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, loras=loras, **options)


def pixels(pipe: Any, *, steps: int = 4, callback: Callable[..., Any] | None = None, **extra: Any) -> np.ndarray:
    return pipe(
        "a lighthouse at dusk",
        num_inference_steps=steps,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        callback_on_step_end=callback,
        **extra,
    ).images[0]


def job(registry: ModelRegistry, model: str, refs: Sequence[LoraRef], kind: str = "text2img", **extra: Any) -> Any:
    pipe = registry.pipeline(model, kind)
    with registry.loras_applied(model, pipe, refs) as applied:
        assert [(a.name, a.scale) for a in applied] == [(r.name, r.scale) for r in refs]
        return pixels(pipe, **extra)


def lora_layers(pipe: Any) -> list[Any]:
    modules = [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return [layer for m in modules if m is not None for layer in m.modules() if isinstance(layer, BaseTunerLayer)]


def all_off(pipe: Any) -> bool:
    return all(layer.disable_adapters for layer in lora_layers(pipe))


# --- LoRA files, made from the built-in weights -------------------------------------------------------------


def sgm_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet path as the original (sgm) UNet names it, as kohya does for SDXL.

    `down_blocks.1.attentions.0` -> `input_blocks.3.1` with one layer per block.
    """
    per_block = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
    raise ValueError(name)


def kohya(weights: dict[str, torch.Tensor], family: str, layers_per_block: int, alpha: float) -> dict[str, Any]:
    """The same LoRA in kohya's format: `lora_unet_*` / `lora_te*_*`, `lora_down` / `lora_up`, an `alpha` each.

    SD 1.x LoRAs name the UNet's modules as diffusers does, SDXL ones as the original (sgm) UNet does; the up
    weights absorb rank / alpha, a power of two here, so the product is the same float for float.
    """
    text = {"text_encoder": "lora_te" if family == "sd15" else "lora_te1", "text_encoder_2": "lora_te2"}
    out: dict[str, Any] = {}
    for key, down in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        component, _, module = key.removesuffix(".lora_A.weight").partition(".")
        if component == "unet":
            base = "lora_unet_" + (sgm_name(module, layers_per_block) if family == "sdxl" else module)
        else:
            base = f"{text[component]}_{module}"
        base = base.replace(".", "_")
        rank = down.shape[0]
        out[f"{base}.lora_down.weight"] = down
        out[f"{base}.lora_up.weight"] = weights[key.replace("lora_A", "lora_B")] * (rank / alpha)
        out[f"{base}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoraSource]:
    """The built-in tiny-lora of each family as a diffusers-format and a kohya-format file, and a UNet-only one."""
    root = tmp_path_factory.mktemp("loras")
    registry = make_registry()
    out: dict[str, LoraSource] = {}
    for model, family in FAMILIES.items():
        pipe = registry.pipeline(model)
        weights = tiny_state_dict(pipe)
        layers = pipe.unet.config.layers_per_block
        made = {
            "diffusers": weights,
            "kohya": kohya(weights, family, layers, alpha=1.0),
            "unet-only": kohya(
                {k: v for k, v in tiny_state_dict(pipe, seed=1).items() if k.startswith("unet.")},
                family,
                layers,
                alpha=8.0,
            ),
        }
        for form, tensors in made.items():
            path = root / f"{family}-{form}.safetensors"
            safetensors.torch.save_file(tensors, path)
            out[f"{family}-{form}"] = LoraSource(family=family, path=str(path))
    return out


@pytest.fixture(scope="module")
def registry(files: dict[str, LoraSource]) -> ModelRegistry:
    return make_registry({"tiny-lora": LoraSource(path="tiny"), **files})


# --- the effect ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_tiny_lora_changes_the_image_visibly_and_scale_zero_changes_nothing(
    registry: ModelRegistry, model: str
) -> None:
    base = job(registry, model, [])
    with_lora = job(registry, model, TINY)
    inverted = job(registry, model, [LoraRef(name="tiny-lora", scale=-1.0)])
    assert np.abs(with_lora - base).mean() > 0.05, "the tiny LoRA must change the image clearly"
    assert np.abs(inverted - with_lora).mean() > 0.05
    assert np.array_equal(job(registry, model, [LoraRef(name="tiny-lora", scale=0.0)]), base)
    assert np.array_equal(job(registry, model, []), base)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_built_in_sha256_is_that_of_its_safetensors_file(registry: ModelRegistry, model: str) -> None:
    pipe = registry.pipeline(model)
    with registry.loras_applied(model, pipe, TINY) as applied:
        pass
    family = FAMILIES[model]
    path = registry.loras[f"{family}-diffusers"].path
    assert applied[0].sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert applied[0].sha256 == state_dict_sha256(tiny_state_dict(pipe))


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_lora_files_in_both_formats_give_the_built_in_pixels(registry: ModelRegistry, model: str, form: str) -> None:
    """kohya's keys (sgm block names for SDXL, `alpha`) are converted by diffusers: same weights, same bytes."""
    name = f"{FAMILIES[model]}-{form}"
    pipe = registry.pipeline(model)
    with registry.loras_applied(model, pipe, [LoraRef(name=name)]) as applied:
        assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"} | (
            {"text_encoder_2"} if model == "tiny-sdxl" else set()
        )
        from_file = pixels(pipe)
    assert applied[0].sha256 == hashlib.sha256(Path(registry.loras[name].path).read_bytes()).hexdigest()
    assert np.array_equal(from_file, job(registry, model, TINY))


# --- refused before any model is loaded ---------------------------------------------------------------------


def refusal(registry: ModelRegistry, model: str, name: str) -> str:
    with pytest.raises(SpecError) as caught:
        registry.check_loras(model, [LoraRef(name="tiny-lora"), LoraRef(name=name)])
    message = str(caught.value)
    assert "\n" not in message
    assert not registry.is_loaded(model), "checked before any model loading"
    return message


def test_unknown_lora_names_the_allowlist() -> None:
    message = refusal(make_registry(), "tiny-sd15", "nope")
    assert message.startswith("loras[1].name: 'nope' is not on this worker's LoRA allowlist; use one of: tiny-lora")
    assert "RENDER_LORAS" in message


def test_lora_of_the_other_family(files: dict[str, LoraSource]) -> None:
    message = refusal(make_registry({"tiny-lora": LoraSource(path="tiny"), **files}), "tiny-sd15", "sdxl-kohya")
    assert message == (
        "loras[1].name: 'sdxl-kohya' is an sdxl LoRA; model 'tiny-sd15' is sd15; use an sd15 LoRA or an sdxl model"
    )


def test_built_in_lora_on_a_model_that_is_not_tiny() -> None:
    models = {**default_models(), "real": ModelSource(family="sd15", source="/models/sd15")}
    registry = ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32, max_cached=2)
    with pytest.raises(SpecError, match=r"^loras\[0\]\.name: 'tiny-lora' is the tiny models' built-in LoRA"):
        registry.check_loras("real", TINY)
    assert not registry.is_loaded("real")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        (b"not a safetensors file", "is not a safetensors file"),
        ("directory", "is a directory"),
        ({"unet.conv_in.weight": torch.zeros(2)}, "holds no LoRA weights"),
    ],
    ids=["missing", "not-safetensors", "directory", "no-lora-weights"],
)
def test_unusable_file_names_the_path(tmp_path: Path, content: Any, problem: str) -> None:
    path = tmp_path / "style.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        safetensors.torch.save_file(content, path)
    elif content == "directory":
        path.mkdir()
    message = refusal(
        make_registry({"tiny-lora": LoraSource(path="tiny"), "style": LoraSource(family="sd15", path=str(path))}),
        "tiny-sd15",
        "style",
    )
    assert message.startswith(f"loras[1]: LoRA 'style' cannot be used: {path} {problem}")
    assert message.endswith("fix its RENDER_LORAS entry")


def test_render_loras_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().loras == {"tiny-lora": LoraSource(path="tiny")}
    monkeypatch.setenv("RENDER_LORAS", '{"my-style": {"family": "sd15", "path": "/loras/my-style.safetensors"}}')
    monkeypatch.setenv("RENDER_MAX_CACHED_LORAS", "3")
    settings = load_settings()
    registry = ModelRegistry.from_settings(WorkerSettings(**{**settings.model_dump(), "device": "cpu"}))
    assert registry.loras == {"my-style": LoraSource(family="sd15", path="/loras/my-style.safetensors")}
    assert registry.max_cached_loras == 3
    for value, fragment in [
        ('{"x": {"family": "sd15", "path": "/loras/x.ckpt"}}', "RENDER_LORAS (x.path): must be a .safetensors file"),
        (
            '{"x": {"path": "/loras/x.safetensors"}}',
            'RENDER_LORAS (x): a LoRA file needs "family": the family of its models',
        ),
        ('{"x y": {"path": "tiny"}}', "RENDER_LORAS: LoRA name 'x y' cannot be used in a spec"),
    ]:
        monkeypatch.setenv("RENDER_LORAS", value)
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_settings()


# --- hygiene: a job without LoRAs renders as a fresh pipeline would -------------------------------------------


def revoke_at(step: int) -> Callable[..., Any]:
    def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == step:
            raise JobRevoked(i + 1)
        return kwargs

    return callback


def interrupt_at(step: int) -> Callable[..., Any]:
    def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == step:
            pipe._interrupt = True
        return kwargs

    return callback


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_no_lora_job_after_lora_jobs_revoked_and_interrupted_ones_gives_fresh_bytes(model: str) -> None:
    registry = make_registry()
    fresh = job(registry, model, [])
    with_lora = job(registry, model, TINY)
    assert np.array_equal(job(registry, model, []), fresh)

    with pytest.raises(JobRevoked):
        job(registry, model, [LoraRef(name="tiny-lora", scale=0.7)], callback=revoke_at(1))
    pipe = registry.pipeline(model)
    assert lora_layers(pipe) and all_off(pipe), "kept loaded, switched off"
    assert np.array_equal(job(registry, model, []), fresh)

    job(registry, model, [LoraRef(name="tiny-lora", scale=-0.5)], callback=interrupt_at(1))
    assert all_off(pipe)
    assert np.array_equal(job(registry, model, []), fresh)
    assert np.array_equal(job(registry, model, TINY), with_lora), "scales are set, not accumulated"


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_img2img_variant_shares_the_models_adapters(model: str) -> None:
    registry = make_registry()
    init = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    img2img: dict[str, Any] = {"kind": "img2img", "image": init, "strength": 0.75}
    fresh = job(registry, model, [], **img2img)
    with_lora_text2img = job(registry, model, TINY)
    base_layer = next(layer for layer in lora_layers(registry.pipeline(model)))
    loaded = base_layer.lora_A[adapter_name("tiny-lora")].weight

    with_lora = job(registry, model, TINY, **img2img)
    assert base_layer.lora_A[adapter_name("tiny-lora")].weight is loaded, "the adapter is reused, not reloaded"
    assert np.abs(with_lora - fresh).mean() > 0.02
    assert not np.array_equal(with_lora, with_lora_text2img)
    assert all_off(registry.pipeline(model, "img2img"))
    assert np.array_equal(job(registry, model, [], **img2img), fresh)


def test_lora_with_ip_adapter_then_neither_gives_fresh_bytes() -> None:
    registry = make_registry()
    model = "tiny-sd15"
    fresh = job(registry, model, [])
    pipe = registry.pipeline(model)
    face = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    with registry.loras_applied(model, pipe, TINY), ip_adapter.attached(pipe, registry.ip_adapter(model), 0.6):
        pixels(pipe, ip_adapter_image=face)
    assert np.array_equal(job(registry, model, []), fresh)


# --- the cache ----------------------------------------------------------------------------------------------


def test_least_recently_used_lora_is_evicted_and_reloaded(files: dict[str, LoraSource]) -> None:
    registry = make_registry(files, max_cached_loras=1)
    model = "tiny-sd15"
    pipe = registry.pipeline(model)
    a, b = [LoraRef(name="sd15-diffusers")], [LoraRef(name="sd15-unet-only")]
    first_a = job(registry, model, a)
    assert pipe.get_list_adapters() == {
        "unet": [adapter_name("sd15-diffusers")],
        "text_encoder": [adapter_name("sd15-diffusers")],
    }
    first_b = job(registry, model, b)
    assert pipe.get_list_adapters() == {"unet": [adapter_name("sd15-unet-only")]}, (
        "a evicted, with its text-encoder layers"
    )
    assert not np.array_equal(first_a, first_b)
    assert np.array_equal(job(registry, model, a), first_a)
    assert np.array_equal(job(registry, model, b), first_b)

    both = job(registry, model, [*a, *b])  # a job's own LoRAs are never evicted, whatever the cap
    assert sorted(pipe.get_list_adapters()["unet"]) == sorted(map(adapter_name, ["sd15-diffusers", "sd15-unet-only"]))
    assert not np.array_equal(both, first_a) and not np.array_equal(both, first_b)
    assert np.array_equal(job(registry, model, a), first_a)
    assert pipe.get_list_adapters()["unet"] == [adapter_name("sd15-diffusers")]


def test_evicting_the_adapter_that_was_last_active(files: dict[str, LoraSource]) -> None:
    registry = make_registry(files, max_cached_loras=2)
    a, b, c = (LoraRef(name=name) for name in ("sd15-diffusers", "sd15-unet-only", "sd15-kohya"))
    first_a = job(registry, "tiny-sd15", [a])
    job(registry, "tiny-sd15", [b])
    job(registry, "tiny-sd15", [a, c])  # evicts b, the one active last, while a stays
    assert registry.pipeline("tiny-sd15").get_list_adapters()["unet"] == [adapter_name(a.name), adapter_name(c.name)]
    assert np.array_equal(job(registry, "tiny-sd15", [a]), first_a)


def test_a_changed_file_is_reloaded(tmp_path: Path, files: dict[str, LoraSource]) -> None:
    path = tmp_path / "style.safetensors"
    path.write_bytes(Path(files["sd15-diffusers"].path).read_bytes())
    registry = make_registry({"tiny-lora": LoraSource(path="tiny"), "style": LoraSource(family="sd15", path=str(path))})
    style = [LoraRef(name="style")]
    before = job(registry, "tiny-sd15", style)
    assert np.array_equal(before, job(registry, "tiny-sd15", TINY))

    path.write_bytes(Path(files["sd15-unet-only"].path).read_bytes())
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    pipe = registry.pipeline("tiny-sd15")
    with registry.loras_applied("tiny-sd15", pipe, style) as applied:
        after = pixels(pipe)
    assert applied[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not np.array_equal(after, before)


def test_a_model_evicted_and_loaded_again_gets_its_loras_again() -> None:
    registry = make_registry(max_cached=1)
    with_lora = job(registry, "tiny-sd15", TINY)
    job(registry, "tiny-sdxl", [])  # evicts tiny-sd15, and what the registry knew of its adapters
    assert not registry.is_loaded("tiny-sd15")
    assert np.array_equal(job(registry, "tiny-sd15", TINY), with_lora)


def test_a_file_that_does_not_fit_the_model_fails_cleanly(files: dict[str, LoraSource]) -> None:
    mislabelled = LoraSource(family="sd15", path=files["sdxl-diffusers"].path)  # SDXL shapes, said to be SD 1.5
    registry = make_registry({"tiny-lora": LoraSource(path="tiny"), "mislabelled": mislabelled})
    fresh = job(registry, "tiny-sd15", [])
    with pytest.raises(ModelError, match=r"^loras\[1\]: could not load LoRA 'mislabelled' from .*size mismatch") as e:
        job(registry, "tiny-sd15", [*TINY, LoraRef(name="mislabelled")])
    assert "\n" not in str(e.value) and str(e.value).endswith("in the diffusers or kohya format")
    pipe = registry.pipeline("tiny-sd15")
    assert adapter_name("mislabelled") not in str(pipe.get_list_adapters()), "no half-loaded adapter is left"
    assert all_off(pipe)
    assert np.array_equal(job(registry, "tiny-sd15", []), fresh)
