"""A job's pipeline calls: the arguments from its spec, one call with its callbacks (its `a1111` prompt encoded
first), or two for a job of two stages (`worker.engine.stages`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from producer.spec import RenderSpec
from worker.engine import stages
from worker.engine.callbacks.prompts import encode_plan
from worker.engine.record import Prepared, stage_ran, totals
from worker.models.families import ModelFamily
from worker.models.registry import ModelRegistry
from worker.models.sampling import scheduled


def _pipeline_inputs(spec: RenderSpec, inputs: dict[str, Image.Image], control_argument: str) -> dict[str, Any]:
    extra = {"ip_adapter_image": inputs["ip_adapter_image"]} if spec.ip_adapter else {}
    return {**extra, **_image_inputs(spec, inputs, control_argument)}


def _image_inputs(spec: RenderSpec, inputs: dict[str, Image.Image], control_argument: str) -> dict[str, Any]:
    if spec.pipeline == "img2img":
        return {"image": inputs["image"], "strength": spec.strength}
    if spec.pipeline == "inpaint":
        return {
            "image": inputs["image"],
            "mask_image": inputs["mask_image"],
            "strength": spec.strength,
            "width": spec.width,
            "height": spec.height,
        }
    size = {"width": spec.width, "height": spec.height}
    if spec.pipeline == "controlnet":
        return {
            control_argument: inputs["control_image"],
            "controlnet_conditioning_scale": spec.controlnet_conditioning_scale,
            **size,
        }
    return size


def pipeline_arguments(
    spec: RenderSpec, inputs: Mapping[str, Image.Image], seeds: Sequence[int], family: ModelFamily | None = None
) -> dict[str, Any]:
    """The keyword arguments `render()` calls the pipeline with, callbacks aside (benchmarks call it bare); `family`
    names the argument a ControlNet's image goes in (SD's `image` by default)."""
    control_argument = family.control_image_argument if family is not None else "image"
    return {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or None,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.first_guidance_scale,
        "num_images_per_prompt": spec.num_images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        **_pipeline_inputs(spec, dict(inputs), control_argument),
    }


def run(pipe: Any, prepared: Prepared, registry: ModelRegistry) -> torch.Tensor:
    """The job's pipeline call (or its two stages' calls) on `pipe`: its images, pixels on the CPU."""
    spec, record = prepared.spec, prepared.record
    seeds = [record.image_seed(i) for i in range(spec.num_images)]
    arguments = pipeline_arguments(spec, prepared.job.inputs, seeds, prepared.family)
    prepared.family.adjust_arguments(spec, arguments)
    if stages.stage_name(spec) is not None:
        return _run_stages(pipe, prepared, registry, arguments, seeds)
    prepared.stack.start()
    started = time.perf_counter()
    decoded = None
    try:
        with torch.inference_mode():
            pixels = _call(pipe, prepared, arguments, prepared.stack.multi, first=True)
        decoded = time.perf_counter()
    finally:
        # The step callbacks mark where denoising ended; what follows the last one is the VAE decode.
        last_step = prepared.stack.control.last_step_end or time.perf_counter()
        record.ran(pipe, started, last_step, prepared.stack.control.steps_completed, decoded)
    return pixels


def _call(
    pipe: Any, prepared: Prepared, arguments: dict[str, Any], multi: Any, *, first: bool, output_type: str = "pt"
) -> torch.Tensor:
    """One pipeline call of the job with `multi`, its callbacks (`first`: the job's first stage, which encodes an
    `a1111` prompt's spans); its images (pixels on the CPU) or, `output_type="latent"`, its latents as they are."""
    spec, record, stack = prepared.spec, prepared.record, prepared.stack
    if stack.checkpoint is not None:
        stack.checkpoint.bind(pipe, arguments["generator"])
    try:
        if first and spec.prompt_syntax == "a1111" and prepared.family.prompt_encoding:
            plan = encode_plan(pipe, prepared.family, spec)
            _, positive, negative = plan.spans[0]
            arguments.update(prepared.family.conditioning_arguments(positive, negative))
            record.prompt_tokens = plan.tokens
            if stack.prompts is not None:
                stack.prompts.plan = plan
        elif first:
            arguments.update(prepared.family.clip_skip_arguments(pipe, spec))
        prepared.family.before_call(spec, record.image_seed(0))
        output = pipe(
            **arguments,
            output_type=output_type,
            callback_on_step_end=multi,
            # Passed, not left to the callback object: Flux, SD3 img2img and others ignore its tensor_inputs.
            callback_on_step_end_tensor_inputs=list(dict.fromkeys(multi.tensor_inputs)),
        )
        images: torch.Tensor = output.images
        return images if output_type == "latent" else images.cpu()
    finally:
        stack.release()


def _run_stages(
    pipe: Any, prepared: Prepared, registry: ModelRegistry, arguments: dict[str, Any], seeds: list[int]
) -> torch.Tensor:
    """A job of two stages (`worker.engine.stages`): the first call ends with latents, the second makes the image;
    a budget spent in the first ends the job with the first stage's image. A resume into the second skips the first."""
    spec, record, stack, family = prepared.spec, prepared.record, prepared.stack, prepared.family
    loading = time.perf_counter()
    second = stages.second_pipeline(spec, registry)
    record.timings.load = (record.timings.load or 0.0) + time.perf_counter() - loading
    with scheduled(second, spec.scheduler, family.make_scheduler):
        record.stages = first_record, second_record = stages.plan(spec, pipe, second)
        stack.plan(first_record.steps_planned + second_record.steps_planned)
        stack.start()
        resume = stack.checkpoint.resume if stack.checkpoint is not None else None
        with torch.inference_mode():
            if resume is not None and resume.stage == 1:
                first_record.steps_completed = first_record.steps_planned
                image = stages.stand_in(spec, family, second)
            else:
                output_type = stages.first_output(spec)
                started, decoded = time.perf_counter(), None
                try:
                    arguments |= stages.first_stage_arguments(spec)
                    first = _call(pipe, prepared, arguments, stack.multi, first=True, output_type=output_type)
                    decoded = time.perf_counter() if output_type != "latent" else None
                finally:
                    last, done = stack.control.last_step_end, stack.control.steps_completed
                    stage_ran(record, first_record, started, last, done, decoded)
                if stack.budget is not None and stack.budget.interrupted_by is not None:  # the first stage's image
                    if output_type == "latent":
                        handed = time.perf_counter()
                        first = family.decode(pipe, first, spec.height, spec.width)
                        first_record.decode = time.perf_counter() - handed
                        totals(record)
                    return first
                image = stages.hand_over(spec, pipe, first)
            offset = first_record.steps_planned
            width, height = stages.second_size(spec)
            multi = stack.stage_callbacks(1, second_record.name, offset, (height, width))
            second_arguments = stages.second_arguments(spec, family, second, image, seeds)
            started, decoded = time.perf_counter(), None
            try:
                pixels = _call(second, prepared, second_arguments, multi, first=False)
                decoded = time.perf_counter()
            finally:
                last = stack.control.last_step_end
                stage_ran(record, second_record, started, last, stack.control.steps_completed - offset, decoded)
    return pixels
