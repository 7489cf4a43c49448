"""The allowlist, the per-process cache, the offline tokenizer and the real-checkpoint path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer import ModelError, RenderSpec
from tests.helpers import pixels
from worker.engine.inputs import load_inputs
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.models import tiny_sd15, tiny_sdxl
from worker.models.registry import ModelRegistry, resolve_device, resolve_dtype
from worker.models.tokenizer import tiny_clip_tokenizer
from worker.settings import ModelSource, WorkerSettings, default_models
from worker.storage import LocalStorage

CPU = torch.device("cpu")


def test_tokenizer_covers_every_byte_offline() -> None:
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer("Ünïcode — 東京 🦊", truncation=True, max_length=77).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert str(tokenizer.decode(ids, skip_special_tokens=True)).replace(" ", "") == "ünïcode—東京🦊"  # CLIP lowercases


def test_tiny_models_are_deterministic() -> None:
    a, b = tiny_sd15.build(), tiny_sd15.build()
    assert all(
        torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True)
    )
    xl = tiny_sdxl.build()
    assert xl.unet.config.addition_embed_type == "text_time" and xl.vae.config.scaling_factor == 0.13025
    assert a.vae_scale_factor == xl.vae_scale_factor == 8


def test_cache_keeps_the_most_recent_models() -> None:
    registry = ModelRegistry(default_models(), device=CPU, dtype=torch.float32, max_cached=1)
    first = registry.pipeline("tiny-sd15")
    assert registry.pipeline("tiny-sd15") is first
    registry.pipeline("tiny-sdxl")
    assert registry.is_loaded("tiny-sdxl") and not registry.is_loaded("tiny-sd15")


def test_model_outside_the_allowlist() -> None:
    registry = ModelRegistry({}, device=CPU, dtype=torch.float32)
    with pytest.raises(ModelError, match=r"'tiny-sd15' is not on this worker's allowlist; use one of: \(none\)"):
        registry.pipeline("tiny-sd15")


def test_device_and_dtype_resolution() -> None:
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(ModelError, match="RENDER_DEVICE=cuda but no CUDA device is visible"):
            resolve_device("cuda")


@pytest.mark.parametrize(("family", "module"), [("sd15", tiny_sd15), ("sdxl", tiny_sdxl)])
def test_a_checkpoint_directory_loads_through_from_pretrained(tmp_path: Path, family: Any, module: Any) -> None:
    """The real-checkpoint path, on a directory saved from the tiny model: same weights, same pixels."""
    module.build().save_pretrained(tmp_path / "checkpoint")
    models = {**default_models(), "on-disk": ModelSource(family=family, source=str(tmp_path / "checkpoint"))}
    registry = ModelRegistry(models, device=CPU, dtype=torch.float32, max_cached=2)
    storage = LocalStorage(tmp_path / "out")
    spec = {"prompt": "a fox", "num_inference_steps": 4, "width": 64, "height": 64, "seed": 5}
    from_disk = render(RenderSpec.parse({"model": "on-disk", **spec}), registry=registry, storage=storage)
    built = render(RenderSpec.parse({"model": f"tiny-{family}", **spec}), registry=registry, storage=storage)

    assert pixels(storage, from_disk.images[0]) == pixels(storage, built.images[0])


def test_a_missing_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    models = {"gone": ModelSource(family="sd15", source=str(tmp_path / "nothing-here"))}
    registry = ModelRegistry(models, device=CPU, dtype=torch.float32)
    with pytest.raises(ModelError, match="could not load sd15 model from .*nothing-here"):
        registry.pipeline("gone")


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_an_ip_adapter_from_disk_matches_the_built_one(tmp_path: Path, weights_format: str) -> None:
    """The real-checkpoint IP-Adapter path, on files saved from the tiny one: same weights, same pixels."""
    import safetensors.torch

    from worker.models.ip_adapter import tiny_parts

    base = tiny_sd15.build()
    base.save_pretrained(tmp_path / "checkpoint")
    parts = tiny_parts(base.unet)
    parts.image_encoder.save_pretrained(tmp_path / "image_encoder")
    parts.feature_extractor.save_pretrained(tmp_path / "image_encoder")
    weights = tmp_path / f"ip-adapter.{weights_format}"
    if weights_format == "bin":
        torch.save(parts.state_dict, weights)
    else:
        flat = {f"{group}.{key}": t.contiguous() for group, ts in parts.state_dict.items() for key, t in ts.items()}
        safetensors.torch.save_file(flat, weights)
    models = {
        **default_models(),
        "on-disk": ModelSource(
            family="sd15",
            source=str(tmp_path / "checkpoint"),
            ip_adapter=str(weights),
            image_encoder=str(tmp_path / "image_encoder"),
        ),
    }
    registry = ModelRegistry(models, device=CPU, dtype=torch.float32, max_cached=2)
    storage = LocalStorage(tmp_path / "out")
    Image.new("RGB", (40, 40), "orange").save(tmp_path / "style.png")
    spec: dict[str, Any] = {
        "prompt": "a fox",
        "num_inference_steps": 4,
        "width": 64,
        "height": 64,
        "seed": 5,
        "ip_adapter": {"image": (tmp_path / "style.png").as_uri(), "scale": 0.8},
    }
    settings = WorkerSettings(input_roots=[str(tmp_path)])

    def render_with(model: str, scale: float) -> np.ndarray:
        parsed = RenderSpec.parse({"model": model, **spec, "ip_adapter": {**spec["ip_adapter"], "scale": scale}})
        manifest = render(JobContext(parsed, inputs=load_inputs(parsed, settings)), registry=registry, storage=storage)
        return np.frombuffer(pixels(storage, manifest.images[0]), dtype=np.uint8).astype(int)

    from_disk, built = render_with("on-disk", 0.8), render_with("tiny-sd15", 0.8)
    # Weights loaded from disk run through other memory layouts: a rounding step apart at most, never more.
    assert np.abs(from_disk - built).max() <= 1
    assert np.abs(render_with("tiny-sd15", 0.0) - built).max() > 8, "the adapter changes the image"
