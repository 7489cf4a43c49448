"""Flux.2 [klein]: a flow-matching transformer with a Qwen3 text encoder, in two variants.

klein base runs true classifier-free guidance as a second transformer pass against an empty prompt, and decides
every step whether to run it (`pipe.do_classifier_free_guidance` reads `pipe._guidance_scale`): a cutoff sets
the scale to 1 at its step and the loop makes one pass per step from then on. The step-distilled klein makes one
pass whatever the scale: a cutoff has nothing to cut there and is refused once the model is loaded (the spec
names a model, not its variant). Neither takes a negative prompt (the pipeline always uses "").

The loop's latents are (B, (H/16)(W/16), 128): the VAE's 32 channels patchified 2x2 and normalised by its
BatchNorm's running statistics; a preview and a decode unpack and de-normalise them as the pipeline does.

Kinds: diffusers 0.42.1 has no klein img2img pipeline. `Flux2KleinPipeline`'s `image` is an edit reference that
ignores `strength` and runs every step, which the worker's step counts (`num_inference_steps x strength` for
img2img) would not match; img2img runs `Flux2KleinInpaintPipeline` with a mask covering the whole image instead:
the image noised to `strength` and denoised, as img2img means. Flux.2 has no ControlNet in diffusers.

`a1111` prompts: no weights or BREAK. The prompt reaches the transformer as three intermediate layers of a causal
Qwen3 stacked per token, the prompt wrapped in a chat template: A1111's rule (scale a token's final embedding,
restore the mean) has no tested counterpart there, and LLM hidden states carry a few huge outlier channels that
dominate any mean, so weights are refused rather than guessed. A prompt is encoded whole up to the pipeline's 512
positions (template included) and refused beyond. Every prompt is padded to those 512 positions with no text mask,
so prompt editing (which replaces `prompt_embeds`) is exact. There is no negative prompt to edit. A guidance curve
cannot apply: klein base mixes its passes with the call's `guidance_scale` argument, read once before the loop
(only whether to run the negative pass is read each step).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline
from diffusers.callbacks import PipelineCallback
from PIL import Image

from producer.errors import UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import tiny_flux2
from worker.models.families.base import Kind
from worker.models.families.flow import FlowFamily, check_llm_positions, refuse_weights
from worker.models.prompt_embeds import Encoded

MOST_POSITIONS = 512
"""The positions of a prompt klein's pipelines take (their `max_sequence_length`, chat template included)."""


def _denormalised(vae: Any, patches: torch.Tensor) -> torch.Tensor:
    """(n, 128, h/2, w/2) normalised patch latents -> (n, 32, h, w) VAE latents, as the pipeline does before
    decoding."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches.device, patches.dtype)
    latents: torch.Tensor = Flux2KleinPipeline._unpatchify_latents(patches * std + mean)
    return latents


class GuidanceScaleCutoff(PipelineCallback):
    """Ends klein base's negative pass at the cutoff step by setting the guidance scale to 1: the loop reads it every
    step, so each later step makes one transformer call and takes its output as it is. No callback tensor changes
    (the negative embeddings stay, unused), so it is exact for any number of rows and on every pipeline kind."""

    tensor_inputs: list[str] = []

    def __init__(self, step_ratio: float | None, step_index: int | None) -> None:
        # PipelineCallback.__init__ validates the official callbacks' arguments, which are passed as they are.
        self.step_ratio = step_ratio
        self.step_index = step_index

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        cutoff = self.step_index if self.step_index is not None else int(pipeline.num_timesteps * self.step_ratio)
        if step_index == cutoff:
            pipeline._guidance_scale = 1.0
        return callback_kwargs


class Flux2Family(FlowFamily):
    name = "flux2"
    pipelines = {
        "text2img": Flux2KleinPipeline,
        "img2img": Flux2KleinInpaintPipeline,
        "inpaint": Flux2KleinInpaintPipeline,
    }
    tiny = {"tiny": tiny_flux2.build, "tiny-distilled": tiny_flux2.build_distilled}
    step_caches = frozenset({"taylorseer"})  # first_block fails in its loop (diffusers 0.42.1)
    prompt_encoding = True  # editing and long prompts; its `check_prompts` refuses weights
    prompt_schedule_inputs = ("prompt_embeds",)
    guidance_curve = (
        "mixes its two passes with the call's guidance_scale argument, read once before the loop (only whether to "
        "run the negative pass is read each step)"
    )

    def check_prompts(self, spec: RenderSpec, model: str) -> None:
        super().check_prompts(spec, model)
        refuse_weights(
            spec, model, self.name, "its prompt is stacked hidden layers of an LLM, where A1111's weighting is untested"
        )

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        if negative:
            return Encoded(torch.empty(0), images=spec.num_images)  # the pipeline encodes its own "" negative
        embeds = pipe._get_qwen3_prompt_embeds(
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            prompt=prompt.text(),
            device=pipe._execution_device,
            max_sequence_length=MOST_POSITIONS,
        )
        tokens = {"text_encoder": _positions(pipe, prompt.text())}
        return Encoded(embeds, None, tokens, images=spec.num_images)

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        return {"prompt": None, "prompt_embeds": positive.embeds}  # repeated for its images by the pipeline

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        return {"prompt_embeds": positive.embeds.repeat(images, 1, 1)}

    def check(self, spec: RenderSpec, model: str) -> None:
        super().check(spec, model)
        if spec.negative_prompt:
            raise UnsupportedSpecError(
                f"negative_prompt: {model!r} ({self.name}) guides against an empty prompt and takes no negative "
                "prompt; leave it empty"
            )

    def check_loaded(self, pipe: Any, spec: RenderSpec) -> None:
        super().check_loaded(pipe, spec)
        check_llm_positions(spec, spec.model, self.name, lambda text: _positions(pipe, text), MOST_POSITIONS)
        # Whether the model is distilled is known only once it is loaded (its pipeline config says).
        if not pipe.config.is_distilled:
            return
        for index, callback in enumerate(spec.callbacks):
            if isinstance(callback, CfgCutoff):
                raise UnsupportedSpecError(
                    f"callbacks[{index}]: {spec.model!r} ({self.name}) is step-distilled: it makes one transformer "
                    "pass per step, with no unconditional pass to cut: remove the cfg_cutoff"
                )

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        return GuidanceScaleCutoff(spec.step_ratio, spec.step_index)

    def adjust_arguments(self, spec: RenderSpec, arguments: dict[str, Any]) -> None:
        arguments.pop("negative_prompt", None)  # refused in `check`; the pipeline has no such argument
        if "strength" in arguments:
            # The klein inpaint pipeline runs ceil(steps x strength) steps where the others run the floor the worker
            # counts (`spec.denoising_steps`): half a step under that floor makes it run exactly those, whatever
            # the float rounding of steps x strength.
            arguments["strength"] = (spec.denoising_steps - 0.5) / spec.num_inference_steps
        if spec.pipeline == "img2img":
            image = arguments["image"]  # one image, or a hires pass's list of them (a row each)
            first: Image.Image = image[0] if isinstance(image, list) else image
            arguments["mask_image"] = Image.new("L", first.size, 255)  # redo everywhere: img2img

    def unpacked(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # The pipeline's latent ids list the patches row by row (`_prepare_latent_ids`), so a reshape places them.
        side = pipe.vae_scale_factor * 2
        rows, columns = height // side, width // side
        patches = latents.reshape(latents.shape[0], rows, columns, latents.shape[-1]).permute(0, 3, 1, 2)
        return _denormalised(pipe.vae, patches)

    def vae_pixels(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        # `unpacked` already undid the BatchNorm normalisation; this VAE has no scaling factor or shift.
        vae = pipe.vae
        image: torch.Tensor = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return image

    def can_drop_rows(self, pipe: Any) -> bool:
        # The negative embeddings are no callback tensor: rows can leave only while the negative pass is off
        # (distilled, a scale of 1, or after a cutoff, when they are never read again).
        return not pipe.do_classifier_free_guidance

    def batch_tensor_inputs(self, pipe: Any) -> list[str]:
        return ["latents", "prompt_embeds"]

    def drop_rows(self, callback_kwargs: dict[str, Any], index: torch.Tensor, guided: torch.Tensor) -> None:
        # The text and latent ids keep their rows: the transformer reads only their first.
        callback_kwargs["latents"] = callback_kwargs["latents"][index]
        callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"][index]


def _positions(pipe: Any, text: str) -> int:
    """The positions klein's encoder fills with `text` (before its padding): the pipeline's chat template around it."""
    messages = [{"role": "user", "content": text}]
    templated = pipe.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return len(pipe.tokenizer(templated)["input_ids"])


FAMILY = Flux2Family()
