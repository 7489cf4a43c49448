"""The original-layout (LDM) files of tests.single_files load back through diffusers bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from tests.single_files import (
    SDXL_OPEN_CLIP_PREFIX,
    truncate,
    write_diffusers_transformer,
    write_sd15_checkpoint,
    write_sdxl_checkpoint,
)
from worker.models import tiny_flux, tiny_sd15, tiny_sdxl


def assert_same_weights(original: Any, loaded: Any) -> None:
    """Every torch component of `loaded` has exactly `original`'s tensors, names and dtypes."""
    modules = {name: part for name, part in original.components.items() if isinstance(part, torch.nn.Module)}
    assert modules, "the pipeline has no torch components to compare"
    for name, module in modules.items():
        want, got = module.state_dict(), loaded.components[name].state_dict()
        assert sorted(got) == sorted(want), f"{name}: different weight names"
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{name}.{key} differs"


def image_bytes(pipe: Any) -> bytes:
    """A 2-step 64x64 render from a fixed generator, as raw pixel bytes."""
    out = pipe(
        "a red fox",
        num_inference_steps=2,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    )
    return bytes(out.images.tobytes())


def open_clip_encoder(path: Path, config_dir: Path) -> CLIPTextModelWithProjection:
    """`text_encoder_2` read from the file's OpenCLIP embedder with diffusers' own conversion."""
    model = CLIPTextModelWithProjection.from_pretrained(config_dir / "text_encoder_2", local_files_only=True)
    converted = convert_open_clip_checkpoint(model, load_file(path), prefix=SDXL_OPEN_CLIP_PREFIX)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def test_sd15_checkpoint_loads_back_bit_identical(tmp_path: Path) -> None:
    pipe = tiny_sd15.build()
    pipe.save_pretrained(tmp_path / "config")
    path = write_sd15_checkpoint(pipe, tmp_path / "sd15.safetensors")
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in load_file(path))

    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)

    assert_same_weights(pipe, loaded)
    assert image_bytes(loaded) == image_bytes(pipe)


def test_sdxl_checkpoint_loads_back_bit_identical(tmp_path: Path) -> None:
    pipe = tiny_sdxl.build()
    pipe.save_pretrained(tmp_path / "config")
    path = write_sdxl_checkpoint(pipe, tmp_path / "sdxl.safetensors")
    keys = load_file(path)
    assert f"{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in keys
    assert f"{SDXL_OPEN_CLIP_PREFIX}text_projection" in keys

    # diffusers tells SDXL's two encoders apart by width; the tiny ones share one, so embedder 1 is read explicitly
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path),
        config=str(tmp_path / "config"),
        local_files_only=True,
        text_encoder_2=open_clip_encoder(path, tmp_path / "config"),
    )

    assert_same_weights(pipe, loaded)
    assert image_bytes(loaded) == image_bytes(pipe)


def test_diffusers_picks_the_sdxl_encoder_by_width(tmp_path: Path) -> None:
    """Why the test above passes text_encoder_2: when this fails, diffusers reads the tiny file unaided."""
    pipe = tiny_sdxl.build()
    pipe.save_pretrained(tmp_path / "config")
    path = write_sdxl_checkpoint(pipe, tmp_path / "sdxl.safetensors")

    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tmp_path / "config"), local_files_only=True
    )

    projection = loaded.text_encoder_2.state_dict()["text_projection.weight"]
    assert projection.is_meta, "diffusers now loads tiny SDXL's text_encoder_2 itself; drop the explicit encoder"


def test_sd15_layout_indices_follow_the_config(tmp_path: Path) -> None:
    """The tiny UNet (2 blocks, 1 layer each) lands where the original's index arithmetic puts it."""
    keys = load_file(write_sd15_checkpoint(tiny_sd15.build(), tmp_path / "sd15.safetensors"))
    unet = {key.removeprefix("model.diffusion_model.") for key in keys if key.startswith("model.diffusion_model.")}
    blocks = {".".join(key.split(".")[:3]) for key in unet if key.split(".")[0].endswith("blocks")}
    assert {"input_blocks.2.0", "output_blocks.1.2"} <= blocks  # the down and up samplers
    assert "input_blocks.3.1" in blocks and "output_blocks.0.1" in blocks  # the cross-attention blocks
    assert "input_blocks.2.0.op.weight" in unet and "output_blocks.1.2.conv.weight" in unet
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_write_diffusers_transformer_keeps_diffusers_keys(tmp_path: Path) -> None:
    pipe = tiny_flux.build()

    path = write_diffusers_transformer(pipe, tmp_path / "transformer.safetensors")

    saved, want = load_file(path), pipe.transformer.state_dict()
    assert sorted(saved) == sorted(want)
    assert all(torch.equal(saved[key], tensor) for key, tensor in want.items())


def test_truncate_leaves_an_unreadable_copy(tmp_path: Path) -> None:
    path = write_sd15_checkpoint(tiny_sd15.build(), tmp_path / "sd15.safetensors")

    broken = truncate(path, tmp_path / "broken.safetensors")

    assert broken.stat().st_size < path.stat().st_size
    assert path.read_bytes().startswith(broken.read_bytes())
    with pytest.raises(SafetensorError):
        load_file(broken)
    with pytest.raises(ValueError, match="missing must be between"):
        truncate(path, tmp_path / "empty.safetensors", missing=path.stat().st_size)
