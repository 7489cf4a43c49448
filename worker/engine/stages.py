"""A job's second stage: A1111's hires fix and SDXL's base + refiner ensemble, a second pipeline call after the first.

- `hires`: text2img at the spec's size, its latents upscaled (`latent`: resized as they are, bilinear; `lanczos`:
  decoded, resized with PIL's LANCZOS, encoded again by the img2img pipeline), then the model's img2img pipeline at
  `hires.strength` for `hires.steps`.
- `refiner`: the base runs text2img with `denoising_end=switch_at` and hands its latents over as they are
  (`output_type="latent"`); the refiner's img2img pipeline runs with `denoising_start=switch_at` (diffusers'
  documented ensemble: the two calls split one schedule of `num_inference_steps`).

One callback stack serves both calls (`CallbackStack.stage_callbacks`): progress, the step budget and checkpoints
count over both stages. A resume into the second stage skips the first: its call gets a stand-in `image` of the
right shape, which the checkpoint's latents replace at its step (the model-off replay of
`worker.engine.callbacks.checkpoint`), so the stand-in's content never reaches the image.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from producer.manifest import StageName, StageRecord
from producer.spec import RenderSpec, guidance_at
from worker.engine.callbacks.prompts import encode_plan
from worker.engine.callbacks.steps import steps_over
from worker.engine.outputs import pil_images
from worker.models.families import ModelFamily
from worker.models.registry import ModelRegistry


def stage_name(spec: RenderSpec) -> StageName | None:
    """The spec's second stage (`hires`, `refiner`), or None for a job of one stage."""
    if spec.hires is not None:
        return "hires"
    if spec.refiner is not None:
        return "refiner"
    return None


def second_pipeline(spec: RenderSpec, registry: ModelRegistry) -> Any:
    """The second stage's pipeline: the model's img2img pipeline (hires), or the refiner's (kept with the base's)."""
    if spec.refiner is not None:
        return registry.refiner(spec.model, spec.refiner.model)
    return registry.pipeline(spec.model, "img2img")


def plan(spec: RenderSpec, first: Any, second: Any) -> list[StageRecord]:
    """Each stage's planned sampler steps, from the schedulers the calls will run (`first`'s and `second`'s, set up
    for the job): diffusers' own arithmetic for img2img strength and for the `denoising_end`/`denoising_start`
    split."""
    steps = spec.num_inference_steps
    if spec.hires is not None:
        return [
            StageRecord(name="base", steps_planned=steps),
            StageRecord(name="hires", steps_planned=spec.hires_steps),
        ]
    assert spec.refiner is not None
    switch = spec.refiner.switch_at
    base = copy.deepcopy(first.scheduler)
    base.set_timesteps(steps, device="cpu")
    cutoff = _cutoff(base, switch)
    base_calls = int((base.timesteps >= cutoff).sum())
    refiner = copy.deepcopy(second.scheduler)
    refiner.set_timesteps(steps, device="cpu")
    calls = int((refiner.timesteps < _cutoff(refiner, switch)).sum())
    if refiner.order == 2 and calls % 2 == 0:  # diffusers' rule for second-order schedulers
        calls += 1
    return [
        StageRecord(name="base", steps_planned=steps_over(base_calls, first)),
        StageRecord(name="refiner", steps_planned=steps_over(calls, second)),
    ]


def _cutoff(scheduler: Any, switch_at: float) -> int:
    """The timestep at which the base hands over: `denoising_end`'s and `denoising_start`'s discrete cutoff."""
    train = scheduler.config.num_train_timesteps
    return int(round(train - switch_at * train))


def first_stage_arguments(spec: RenderSpec) -> dict[str, Any]:
    """What the first call adds to its arguments: a refiner's base stops at `switch_at`."""
    return {"denoising_end": spec.refiner.switch_at} if spec.refiner is not None else {}


def first_output(spec: RenderSpec) -> str:
    """The first call's `output_type`: its latents as they are, or pixels for a `lanczos` hires pass (decoded by
    the pipeline itself, whatever its family's latents look like)."""
    return "pt" if spec.hires is not None and spec.hires.upscaler == "lanczos" else "latent"


def hand_over(spec: RenderSpec, pipe: Any, first: torch.Tensor) -> Any:
    """The second call's `image` from the first call's output (`first_output`): the latents themselves (refiner),
    resized (hires `latent`), or the pixels resized with LANCZOS, as images (hires `lanczos`)."""
    if spec.hires is None:
        return first
    width, height = spec.hires_size
    if spec.hires.upscaler == "latent":
        scale = pipe.vae_scale_factor
        return torch.nn.functional.interpolate(first, size=(height // scale, width // scale), mode="bilinear")
    return upscaled_images(first, (width, height))


def upscaled_images(pixels: torch.Tensor, size: tuple[int, int]) -> Image.Image | list[Image.Image]:
    """(n, 3, h, w) pixels in [0, 1] as 8-bit images resized to `size` (width, height) with PIL's LANCZOS."""
    images = pil_images(pixels)
    return _one_or_list([image.resize(size, Image.Resampling.LANCZOS) for image in images])


def _one_or_list(images: list[Image.Image]) -> Image.Image | list[Image.Image]:
    """One image as itself (families' img2img arguments read `image.size`), several as a list (a row each)."""
    return images[0] if len(images) == 1 else images


def second_size(spec: RenderSpec) -> tuple[int, int]:
    """The second stage's image size (width, height): the hires size, or the job's own (a refiner's)."""
    return spec.hires_size if spec.hires is not None else (spec.width, spec.height)


def stand_in(spec: RenderSpec, family: ModelFamily, second: Any) -> Any:
    """The second call's `image` when a resume skips the first stage: of the hand-over's shape, zeros. Latents where
    the hand-over is latents or the family's img2img takes them (SD's 4 channels), else black images."""
    width, height = second_size(spec)
    if spec.refiner is not None or family.latent_hires:
        scale = second.vae_scale_factor
        channels = int(second.vae.config.latent_channels)
        model = family.model(second)
        return torch.zeros(
            (spec.num_images, channels, height // scale, width // scale), dtype=model.dtype, device=model.device
        )
    return _one_or_list([Image.new("RGB", (width, height)) for _ in range(spec.num_images)])


def stage_spec(spec: RenderSpec) -> RenderSpec:
    """The second stage as an img2img spec of its own steps and strength (what families' argument rules read)."""
    if spec.hires is None:
        return spec.model_copy(update={"pipeline": "img2img", "refiner": None})
    steps = spec.hires.steps or spec.num_inference_steps
    update = {"pipeline": "img2img", "strength": spec.hires.strength, "num_inference_steps": steps, "hires": None}
    return spec.model_copy(update=update)


def second_arguments(
    spec: RenderSpec, family: ModelFamily, second: Any, image: Any, seeds: Sequence[int]
) -> dict[str, Any]:
    """The second call's arguments (callbacks aside): the spec's prompt (an `a1111` prompt's last span), guidance
    at `guidance_scale` (a curve's last value), and the stage's own steps."""
    steps = spec.denoising_steps
    scale = spec.guidance_scale if spec.guidance is None else guidance_at(spec.guidance, steps - 1, steps)
    arguments: dict[str, Any] = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or None,
        "image": image,
        "guidance_scale": scale,
        "num_images_per_prompt": spec.num_images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
    }
    if "height" in inspect.signature(second.__call__).parameters:  # flow families' img2img: else its default size
        width, height = second_size(spec)
        arguments |= {"width": width, "height": height}
    if spec.hires is not None:
        arguments |= {
            "num_inference_steps": spec.hires.steps or spec.num_inference_steps,
            "strength": spec.hires.strength,
        }
    else:
        assert spec.refiner is not None
        arguments |= {"num_inference_steps": spec.num_inference_steps, "denoising_start": spec.refiner.switch_at}
    # The family adjusts them as for an img2img job of the stage's steps and strength (Flux.2's mask, Qwen's size).
    family.adjust_arguments(stage_spec(spec), arguments)
    if spec.prompt_syntax == "a1111" and family.prompt_encoding:
        _, positive, negative = encode_plan(second, family, spec, last_only=True).spans[-1]
        arguments.update(family.conditioning_arguments(positive, negative))
    else:
        arguments.update(family.clip_skip_arguments(second, spec))
    return arguments
