"""Z-Image: a flow-matching transformer whose CFG is a separate negative pass, decided afresh every step.

The loop reads `pipe._guidance_scale` at every step and runs the negative pass only while it is above 0 (its rule is
`pos + s * (pos - neg)`: 0 is unguided), so a CFG cutoff sets it to 0 at its step and each step after it is one
transformer pass, on the positive rows, exactly as an unguided step. Z-Image-Turbo is distilled to run unguided: it
has no negative pass to cut or to condition on, so a cfg_cutoff and a negative prompt are refused, and its calls run
with `guidance_scale` 0 whatever the spec says (as Flux.1 [schnell] ignores it). Base and Turbo share one
architecture and differ in weights only, and `check` sees the model's allowlist name alone, so a model is Turbo
when its name says so ("turbo").

Its latents are plain (B, 16, H/8, W/8) VAE latents (the transformer patchifies them itself); the transformer takes
and returns Python lists of per-image tensors, and the prompt embeddings are lists of per-prompt tensors of their own
lengths. The pipelines always hand the sampler their own sigma schedule as a list, which the multistep solvers
cannot take (DPM++ 2M takes none, UniPC fails on a list): both are refused. A shared call runs (the latents, seeded
per row, are one tensor), but rows cannot leave it: the loop fixes its batch size before it starts and splits the
transformer's output into positive and negative halves by it, so dropped rows would shift that split; rows that
leave stay in the call, unused, as Flux.1's do. ControlNet is `ZImageControlNetPipeline` (its control image is
`control_image`); the ControlNet borrows the transformer's embedders and refiners when the pipeline is built. No
step cache: the transformer has no diffusers `CacheMixin` (`enable_cache`) in 0.42.1, so `cache` is refused.

`a1111` prompts: no weights or BREAK. The transformer's caption embedder begins with an RMSNorm over each token
(`cap_embedder`), which divides out a per-token scale, so A1111's weights would do nothing. A prompt is encoded
whole up to the pipeline's 512 positions (chat template included) and refused beyond. Prompt editing replaces
`prompt_embeds`, per-image tensors of each span's own length (no mask), so a switch is exact; the negative prompt
cannot change (no callback can ask for `negative_prompt_embeds`). The loop reads `_guidance_scale` every step, so a
guidance curve applies, above 0 throughout (0 is unguided here, and ends guidance for good); not on Turbo.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
)
from diffusers.callbacks import PipelineCallback

from producer.errors import UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import flow_sampling, tiny_z_image
from worker.models.families.base import Kind, ModelOff
from worker.models.families.flow import FlowFamily, check_llm_positions, refuse_weights
from worker.models.prompt_embeds import Encoded

MOST_POSITIONS = 512
"""The positions of a prompt Z-Image's pipelines keep (their `max_sequence_length`, chat template included)."""

NEEDS_OWN_SIGMAS = ("dpmpp_2m", "unipc")
"""Flow samplers that cannot take the sigma list the Z-Image pipelines always pass: DPM++ 2M's `set_timesteps` takes
no `sigmas`, and UniPC's shifts them as an array and fails on a list."""


def is_turbo(model: str) -> bool:
    """Whether the allowlisted `model` is Z-Image-Turbo (distilled, unguided): its name says so."""
    return "turbo" in model.lower()


class GuidanceOffCutoff(PipelineCallback):
    """A CFG cutoff for loops that read `_guidance_scale` every step and guide only while it is above 0: set to 0 at
    the cutoff step, every later step is one unguided pass. Nothing to trim (the negative embeddings are a separate
    list the loop stops using) and nothing to undo (each call sets `_guidance_scale` from its arguments)."""

    tensor_inputs: list[str] = []

    def __init__(self, step_ratio: float | None, step_index: int | None) -> None:
        # PipelineCallback.__init__ validates the official callbacks' arguments, which are passed as they are.
        self.step_ratio = step_ratio
        self.step_index = step_index

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        cutoff = (
            self.step_index if self.step_index is not None else int(pipeline.num_timesteps * (self.step_ratio or 0))
        )
        if step_index == cutoff:
            pipeline._guidance_scale = 0.0
        return callback_kwargs


def _zeros(sample: Any) -> Any:
    """The transformer's "output" while a resume's replay turns it off: zeros shaped like its input list."""
    if isinstance(sample, list | tuple):
        return [each.new_zeros(each.shape) for each in sample]
    return sample.new_zeros(sample.shape)


class ZImageFamily(FlowFamily):
    name = "z-image"
    pipelines = {
        "text2img": ZImagePipeline,
        "img2img": ZImageImg2ImgPipeline,
        "inpaint": ZImageInpaintPipeline,
        "controlnet": ZImageControlNetPipeline,
    }
    tiny = {"tiny": tiny_z_image.build, "tiny-turbo": tiny_z_image.build_turbo}
    controlnet_class = ZImageControlNetModel
    control_image_argument = "control_image"
    prompt_encoding = True  # editing and long prompts; its `check_prompts` refuses weights
    prompt_schedule_inputs = ("prompt_embeds",)
    negative_schedule = "no callback can ask its loop for negative_prompt_embeds"
    guidance_curve = None  # the loop reads `_guidance_scale` at every step

    guidance_floor = (0.0, "its loop stops guiding for good")  # it guides at any scale above 0

    def check_prompts(self, spec: RenderSpec, model: str) -> None:
        refuse_weights(spec, model, self.name, "its transformer RMS-normalises each caption token, undoing a weight")
        if spec.guidance is not None and is_turbo(model):
            raise UnsupportedSpecError(
                f"guidance: {model!r} ({self.name}) is Z-Image-Turbo, distilled to run without CFG; remove `guidance`"
            )
        super().check_prompts(spec, model)

    def check_loaded(self, pipe: Any, spec: RenderSpec) -> None:
        super().check_loaded(pipe, spec)
        check_llm_positions(spec, spec.model, self.name, lambda text: _positions(pipe, text), MOST_POSITIONS)

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        if negative and (spec.first_guidance_scale <= 0 or is_turbo(spec.model)):
            return Encoded(torch.empty(0), images=spec.num_images)  # no negative pass: nothing to encode
        (embeds,) = pipe._encode_prompt([prompt.text()], pipe._execution_device, max_sequence_length=MOST_POSITIONS)
        return Encoded(embeds.unsqueeze(0), None, {"text_encoder": embeds.shape[0]}, images=spec.num_images)

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        # Lists of per-prompt tensors, which the pipeline repeats for its images itself.
        arguments: dict[str, Any] = {"prompt": None, "negative_prompt": None, "prompt_embeds": [positive.embeds[0]]}
        if negative.embeds.numel():
            arguments["negative_prompt_embeds"] = [negative.embeds[0]]
        return arguments

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        return {"prompt_embeds": [positive.embeds[0]] * images}  # the negative rows are a list of their own

    def tiny_controlnet(self, base: Any, seed: int = 0) -> Any:
        # Its shared parts come from `base`'s transformer when the pipeline is built (`from_transformer`), so a LoRA
        # already in the transformer is no obstacle: only the control blocks are made here.
        return tiny_z_image.tiny_controlnet(seed)

    def check_sampler(self, name: str, model: str) -> None:
        flow_sampling.check_flow_sampler(name, model)
        if name in NEEDS_OWN_SIGMAS:
            takes = [each for each in flow_sampling.flow_sampler_names() if each not in NEEDS_OWN_SIGMAS]
            raise UnsupportedSpecError(
                f"scheduler: {model!r} ({self.name}) pipelines pass their own sigma schedule, which {name!r} cannot "
                f"take; use one of {', '.join(takes)}"
            )

    def check(self, spec: RenderSpec, model: str) -> None:
        super().check(spec, model)
        if not is_turbo(model):
            return
        for index, callback in enumerate(spec.callbacks):
            if isinstance(callback, CfgCutoff):
                raise UnsupportedSpecError(
                    f"callbacks[{index}]: {model!r} ({self.name}) is Z-Image-Turbo, distilled to run without CFG; "
                    "there is no negative pass to cut: remove the cfg_cutoff"
                )
        if spec.negative_prompt:
            raise UnsupportedSpecError(
                f"negative_prompt: {model!r} ({self.name}) is Z-Image-Turbo, distilled to run without CFG, and takes "
                "no negative prompt; leave it empty"
            )

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        return GuidanceOffCutoff(spec.step_ratio, spec.step_index)

    def adjust_arguments(self, spec: RenderSpec, arguments: dict[str, Any]) -> None:
        if is_turbo(spec.model):
            arguments["guidance_scale"] = 0.0  # unguided: one pass per step, as Turbo is meant to run

    def unpacked(self, pipe: Any, latents: Any, height: int, width: int) -> torch.Tensor:
        # A tensor in diffusers 0.42's loops; stacked should a loop hand over its per-image list.
        return torch.stack(list(latents)) if isinstance(latents, list | tuple) else latents

    def can_drop_rows(self, pipe: Any) -> bool:
        return False

    def model_off(self, pipe: Any) -> ModelOff:
        return ModelOff(self.model(pipe), _zeros)


def _positions(pipe: Any, text: str) -> int:
    """The positions Z-Image's encoder fills with `text`: the pipeline's chat template around it."""
    messages = [{"role": "user", "content": text}]
    templated = pipe.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return len(pipe.tokenizer(templated)["input_ids"])


FAMILY = ZImageFamily()
