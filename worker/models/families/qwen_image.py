"""Qwen-Image: a flow-matching MMDiT with true classifier-free guidance, run as two transformer calls per step.

The spec's `guidance_scale` is Qwen's `true_cfg_scale`. Qwen only guides when it is given a negative prompt, so a
job with a scale above 1 and no negative prompt gets an empty one, as SD and SD3 guide against an empty prompt; the
scale also goes on as `guidance_scale`, which only a guidance-distilled transformer (`guidance_embeds`) reads.

The pipeline decides before its loop whether to guide, so no callback can turn guidance off. `NegativePassCutoff`
ends it from the cutoff on by answering the loop's negative transformer call with the positive call's output,
without running it: the loop's `neg + s * (pos - neg)` is then `pos` exactly and its renormalisation ratio is 1, and
the transformer runs once a step instead of twice, as a real cutoff gives.

Latents are 2x2 patches of a 16-channel, 5-D (B, C, frames, h, w) Wan-style VAE's latents normalised by its
per-channel mean and std, packed to (B, seq, 64). A shared call keeps rows that leave it: the prompt masks and the
negative prompt's embeddings and mask are fixed before the loop and no callback can slice them.

`a1111` prompts: no weights or BREAK. The transformer puts every text token through an RMSNorm first (`txt_norm`),
which divides out a per-token scale, so A1111's weights would do nothing. A long prompt is encoded whole up to the
pipeline's limit of 1024 positions (its default `max_sequence_length` of 512 would cut it silently) and refused
beyond. Prompt editing replaces `prompt_embeds`; the text mask is fixed before the loop, so every span is padded
with zeros to the longest span's length and shown whole (a shorter span also shows its zero padding). The negative
prompt cannot change (its embeddings and mask are fixed before the loop), nor can the guidance scale: it is
`true_cfg_scale`, which the pipeline reads once before the loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline, QwenImagePipeline

from producer.errors import UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import flow_sampling, tiny_qwen_image
from worker.models.families.base import Kind, prompt_spans
from worker.models.families.flow import FlowFamily, check_llm_positions, refuse_weights
from worker.models.families.guidance import NegativePassCutoff
from worker.models.prompt_embeds import Encoded

MOST_POSITIONS = 1024
"""The longest prompt Qwen-Image's pipelines take (`max_sequence_length` above it is an error)."""

UNSIGMAED = frozenset({"dpmpp_2m"})
"""Flow samplers whose `set_timesteps` takes no `sigmas`, which Qwen's pipelines always pass (Flux's leave them out
for a scheduler with flow sigmas)."""


class _IgnoredGuidanceWarning(logging.Filter):
    """Drops the pipelines' warning that `guidance_scale` is ignored by a transformer without a guidance embedding:
    the family passes it on purpose, for the guidance-distilled variants that read it, and every job would log it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ignored since the model is not guidance-distilled" not in record.getMessage()


for _pipeline in (QwenImagePipeline, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline):
    logging.getLogger(_pipeline.__module__).addFilter(_IgnoredGuidanceWarning())


class QwenImageFamily(FlowFamily):
    name = "qwen-image"
    # Edit pipelines (QwenImageEdit*) need an image processor and an edit-trained transformer: img2img is the
    # image-conditioned kind this family runs (its `strength` is the spec's).
    pipelines = {
        "text2img": QwenImagePipeline,
        "img2img": QwenImageImg2ImgPipeline,
        "inpaint": QwenImageInpaintPipeline,
    }
    tiny = {"tiny": tiny_qwen_image.build}
    step_caches = frozenset({"first_block", "taylorseer"})
    prompt_encoding = True  # editing and long prompts; its `check_prompts` refuses weights
    prompt_schedule_inputs = ("prompt_embeds",)
    negative_schedule = "its negative pass reads embeddings and a mask fixed before the loop, which no callback reaches"
    guidance_curve = "guides by true_cfg_scale, which its pipeline reads once before the loop"

    def check_prompts(self, spec: RenderSpec, model: str) -> None:
        super().check_prompts(spec, model)
        refuse_weights(spec, model, self.name, "its transformer RMS-normalises each text token, undoing a weight")

    def check_loaded(self, pipe: Any, spec: RenderSpec) -> None:
        super().check_loaded(pipe, spec)
        check_llm_positions(spec, spec.model, self.name, lambda text: _positions(pipe, text), MOST_POSITIONS)

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        if negative and spec.first_guidance_scale <= 1:
            return Encoded(torch.empty(0), images=spec.num_images)  # no negative pass: nothing to encode
        embeds, _ = pipe._get_qwen_prompt_embeds([prompt.text()], pipe._execution_device)
        count = embeds.shape[1]
        length = count
        if not negative:  # the mask is fixed before the loop: every span as long as the longest
            spans = dict(prompt_spans(spec))["prompt"]
            length = max([count, *(_positions(pipe, each.text()) for _, each in spans)])
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - count))
        mask = torch.ones((1, length), dtype=torch.long, device=embeds.device)
        return Encoded(embeds, None, {"text_encoder": count}, mask=mask, images=spec.num_images)

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        # The pipeline repeats given embeddings for its images itself; 1024 lifts its default cut at 512 positions.
        arguments: dict[str, Any] = {"prompt": None, "negative_prompt": None, "max_sequence_length": MOST_POSITIONS}
        arguments |= {"prompt_embeds": positive.embeds, "prompt_embeds_mask": positive.mask}
        if negative.mask is not None:
            arguments |= {"negative_prompt_embeds": negative.embeds, "negative_prompt_embeds_mask": negative.mask}
        return arguments

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        return {"prompt_embeds": positive.embeds.repeat(images, 1, 1)}  # the negative pass is a separate call

    def check_sampler(self, name: str, model: str) -> None:
        super().check_sampler(name, model)
        if name in UNSIGMAED:
            others = ", ".join(each for each in flow_sampling.flow_sampler_names() if each not in UNSIGMAED)
            raise UnsupportedSpecError(
                f"scheduler: {model!r} ({self.name}) cannot run {name!r}: Qwen-Image's pipelines pass their own sigma "
                f"schedule, which that solver's set_timesteps does not take; use one of {others}"
            )

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        return NegativePassCutoff(spec.step_ratio, spec.step_index)

    def adjust_arguments(self, spec: RenderSpec, arguments: dict[str, Any]) -> None:
        scale = arguments["guidance_scale"]
        arguments["true_cfg_scale"] = scale
        if scale <= 1:  # no guidance: a negative prompt would be encoded for nothing (and warned about)
            arguments["negative_prompt"] = None
        elif arguments.get("negative_prompt") is None:
            prompt = arguments["prompt"]
            arguments["negative_prompt"] = "" if isinstance(prompt, str) else [""] * len(prompt)
        image = arguments.get("image")
        if spec.pipeline == "img2img" and image is not None and "width" not in arguments:
            # Qwen's img2img renders at 1024 px unless told: the input image's size, as other families' img2img.
            first = image[0] if isinstance(image, list) else image  # a hires pass's list: a row each
            arguments["width"], arguments["height"] = first.size

    def unpacked(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        frames: torch.Tensor = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return frames[:, :, 0]  # (B, C, 1, h, w): one frame

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)

    def vae_pixels(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        # A Wan-style 5-D VAE: one frame, and a per-channel mean and std instead of a scaling factor.
        vae = pipe.vae
        z = latents.to(vae.device, vae.dtype).unsqueeze(2)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(shape)
        image: torch.Tensor = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
        return image

    def can_drop_rows(self, pipe: Any) -> bool:
        # The prompt masks and the negative prompt's embeddings are no callback tensors: rows cannot be sliced out.
        return False


def _positions(pipe: Any, text: str) -> int:
    """The positions Qwen-Image's encoder keeps of `text`: its prompt template's, less the dropped system turn."""
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(text))["input_ids"]
    return len(ids) - int(pipe.prompt_template_encode_start_idx)


FAMILY = QwenImageFamily()
