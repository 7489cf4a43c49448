"""Result images as PNG with the generation parameters in their metadata."""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from producer.spec import RenderSpec


def parameters_text(spec: RenderSpec, seed: int) -> str:
    """The `parameters` text chunk in the form image tools already read."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    lines.append(
        f"Steps: {spec.num_inference_steps}, CFG scale: {spec.guidance_scale}, Seed: {seed}, "
        f"Size: {spec.width}x{spec.height}, Model: {spec.model}"
    )
    return "\n".join(lines)


def png_bytes(image: Image.Image, spec: RenderSpec, *, task_id: str, seed: int, index: int) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters_text(spec, seed))
    info.add_text("render:task_id", task_id)
    info.add_text("render:index", str(index))
    info.add_text("render:spec", json.dumps(spec.model_dump(mode="json"), sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
