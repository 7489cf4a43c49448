"""Result images as PNG with the generation parameters in their metadata.

The `parameters` text chunk follows the layout AUTOMATIC1111's web UI writes, which image viewers,
Civitai and ComfyUI's importers read: the prompt (LoRAs as `<lora:name:scale>` tags), a
`Negative prompt:` line, then one line of `Key: value` pairs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from producer.manifest import LoraRecord, SchedulerRecord
from producer.spec import RenderSpec


@dataclass(frozen=True)
class ImageParameters:
    """What made one image: the spec, its seed, and what the worker resolved (sampler, LoRA hashes)."""

    spec: RenderSpec
    seed: int
    scheduler: SchedulerRecord | None = None
    loras: Sequence[LoraRecord] = ()
    version: str | None = None
    family: str | None = None


def parameters_text(params: ImageParameters) -> str:
    """The `parameters` text chunk in the form image tools already read."""
    spec = params.spec
    tags = "".join(f" <lora:{lora.name}:{lora.scale:g}>" for lora in params.loras)
    lines = [spec.prompt + tags]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    pairs = [f"Steps: {spec.num_inference_steps}"]
    if params.scheduler is not None:
        pairs.append(f"Sampler: {params.scheduler.label}")
    pairs += [f"CFG scale: {spec.guidance_scale:g}", f"Seed: {params.seed}", f"Size: {spec.width}x{spec.height}"]
    pairs.append(f"Model: {spec.model}")
    if spec.pipeline in ("img2img", "inpaint"):
        pairs.append(f"Denoising strength: {spec.strength:g}")
    if spec.hires is not None:
        hires = spec.hires
        pairs += [
            f"Hires upscale: {hires.scale:g}",
            f"Hires steps: {hires.steps or spec.num_inference_steps}",
            f"Hires upscaler: {hires.upscaler.capitalize()}",
            f"Denoising strength: {hires.strength:g}",
        ]
    if spec.refiner is not None:
        pairs += [f"Refiner: {spec.refiner.model}", f"Refiner switch at: {spec.refiner.switch_at:g}"]
    if spec.clip_skip:
        pairs.append(f"Clip skip: {spec.clip_skip + 1}")  # A1111 counts the last layer as 1; diffusers as 0
    if params.loras:
        hashes = ", ".join(f"{lora.name}: {lora.sha256[:12]}" for lora in params.loras)
        pairs.append(f'Lora hashes: "{hashes}"')
    if params.version:
        pairs.append(f"Version: render-farm {params.version}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(n, 3, h, w) pixels in [0, 1] (a pipeline's `output_type="pt"`) as 8-bit PIL images, as diffusers makes them."""
    return list(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(pixels)))


def png_bytes(image: Image.Image, params: ImageParameters, *, task_id: str, index: int) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("render:task_id", task_id)
    info.add_text("render:index", str(index))
    if params.family:
        info.add_text("render:family", params.family)
    info.add_text("render:spec", json.dumps(params.spec.model_dump(mode="json"), sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
