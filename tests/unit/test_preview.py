"""The linear latents-to-RGB preview and the frame strip."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine.preview import contact_strip, encode, latents_to_rgb, png_bytes


def test_zero_latents_map_to_the_bias() -> None:
    zeros = torch.zeros(2, 4, 3, 5)
    assert latents_to_rgb(zeros, "sdxl")[0, 0, 0].tolist() == [150, 140, 130]
    assert latents_to_rgb(zeros, "sd15")[1, 2, 4].tolist() == [127, 127, 127]
    assert latents_to_rgb(zeros, "sdxl").shape == (2, 3, 5, 3)


def test_sdxl_factors_are_diffusers_callback_guide_factors() -> None:
    latents = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert latents_to_rgb(latents, "sdxl")[0, 0, 0].tolist() == [210, 200, 190]  # bias + first column (60, 60, 60)
    latents = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert latents_to_rgb(latents, "sdxl")[0, 0, 0].tolist() == [90, 135, 140]  # bias + (-60, -5, 10)


def test_values_are_clamped_not_wrapped() -> None:
    big = torch.full((1, 4, 1, 1), 100.0)
    assert latents_to_rgb(big, "sdxl").dtype == torch.uint8
    assert latents_to_rgb(big, "sd15")[0, 0, 0].tolist() == [255, 255, 255]
    assert latents_to_rgb(-big, "sd15")[0, 0, 0].tolist() == [0, 0, 0]


def test_strip_scales_each_tile_to_the_long_edge() -> None:
    pixels = np.zeros((3, 8, 16, 3), dtype=np.uint8)
    strip = contact_strip(pixels, 64)
    assert strip.size == (3 * 64, 32)


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_encode_formats(fmt: str, magic: bytes) -> None:
    image = contact_strip(np.full((1, 8, 8, 3), 200, dtype=np.uint8), 16)
    assert encode(image, fmt).startswith(magic)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (37, 64), (128, 256)])
def test_png_round_trips_every_pixel(shape: tuple[int, int]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    decoded = Image.open(BytesIO(png_bytes(pixels)))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), pixels)


def test_png_encode_of_a_strip_decodes_to_the_strip() -> None:
    strip = contact_strip(np.random.default_rng(1).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8), 48)
    assert np.array_equal(np.asarray(Image.open(BytesIO(encode(strip, "png")))), np.asarray(strip))


def test_png_refuses_what_is_not_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 3), dtype=np.float32))
