"""Frames: preview pixels (made by the job's model family, `ModelFamily.preview`: no VAE) encoded and laid out.

`latents_to_rgb` is SD 1.5's and SDXL's linear preview (`worker.models.families.sd`), kept here by its old name.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from worker.models.families.sd import linear_preview as latents_to_rgb

__all__ = ["CONTENT_TYPES", "PIL_FORMATS", "contact_strip", "encode", "latents_to_rgb", "png_bytes"]

PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def contact_strip(pixels: np.ndarray, size: int) -> Image.Image:
    """One image per batch row, side by side, each scaled so its long edge is `size` pixels."""
    tiles = [Image.fromarray(row) for row in pixels]
    w, h = tiles[0].size
    scale = size / max(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    strip = Image.new("RGB", (tw * len(tiles), th))
    for i, tile in enumerate(tiles):
        strip.paste(tile.resize((tw, th), Image.Resampling.BILINEAR), (i * tw, 0))
    return strip


# Previews favour speed over size: they are made at every few steps of every job.
_SAVE_OPTIONS: dict[str, dict[str, int]] = {
    "webp": {"quality": 80, "method": 0},
    "jpeg": {"quality": 85},
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2


def encode(image: Image.Image, fmt: str) -> bytes:
    if fmt == "png":
        return png_bytes(np.asarray(image.convert("RGB")))
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[fmt], **_SAVE_OPTIONS[fmt])
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """(h, w, 3) uint8 -> an 8-bit RGB PNG: every row "Up"-filtered in numpy, deflated by zlib at level 1.

    Frames are encoded on a writer thread while the denoising loop runs. Pillow's PNG encoder holds
    the GIL throughout (and tries five filters per row); `zlib.compress` and `zlib.crc32` let it go,
    so the loop's Python between torch ops keeps running. On smooth previews (upscaled latents)
    the Up filter also compresses better than Pillow's adaptive choice.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"png_bytes needs (h, w, 3) uint8 pixels; got {pixels.shape} {pixels.dtype}")
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = _PNG_FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as the PNG filter is defined
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(filtered.data, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
