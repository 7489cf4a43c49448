"""Stable Diffusion 3.5: a flow-matching transformer with CFG as one doubled batch (`[uncond, cond]`).

Its cutoff does not trim callback tensors (`diffusers.callbacks.SD3CFGCutoffCallback` keeps `[-1:]`: one row for
every prompt, and on img2img and inpaint the pooled embeddings are no callback tensor, so it returns two images for
one). `ConditionalHalfCutoff` turns the transformer to the conditional rows from the cutoff on instead, exact for
any number of prompts and images on every pipeline kind. A shared text2img call drops rows like SD's.

`a1111` prompts: each CLIP encoder sees the first 75 tokens, weighted (A1111's chunk, as diffusers cuts a plain
prompt), and T5 the whole prompt, weighted, padded to diffusers' 256 positions or to 512 when a span needs more.
The loop's `prompt_embeds` holds the doubled CFG batch, so the prompt and the negative prompt can both change at a
step; the pooled CLIP vectors stay the first span's (no callback tensor of img2img and inpaint carries them). The
loop reads `guidance_scale` at every step, so a guidance curve applies (above 1 throughout: at 1 or below the loop
would stop doubling its batch).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import tiny_sd3
from worker.models.families.base import Kind
from worker.models.families.flow import FlowFamily
from worker.models.families.guidance import ConditionalHalfCutoff
from worker.models.prompt_embeds import Encoded, chunks, encode_chunks, encode_t5, seen


def _penultimate(output: Any) -> torch.Tensor:
    hidden: torch.Tensor = output.hidden_states[-2]  # diffusers' SD3 layer (clip_skip does not apply to SD3)
    return hidden


class SD3Family(FlowFamily):
    name = "sd3"
    pipelines = {
        "text2img": StableDiffusion3Pipeline,
        "img2img": StableDiffusion3Img2ImgPipeline,
        "inpaint": StableDiffusion3InpaintPipeline,
    }
    tiny = {"tiny": tiny_sd3.build}
    prompt_encoding = True
    t5 = ("tokenizer_3", "text_encoder_3")
    t5_length = 256
    prompt_schedule_inputs = ("prompt_embeds",)
    guidance_curve = None

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        widths, pooled, tokens = [], [], {}
        for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            parts = chunks(tokenizer, prompt)[:1]  # the first 75 tokens, as A1111 and Forge give SD3's CLIPs
            embeds, vector = encode_chunks(getattr(pipe, name), parts, _penultimate, pooled=True)
            assert vector is not None
            widths.append(embeds)
            pooled.append(vector)
            tokens[name] = seen(parts)
        clip = torch.cat(widths, dim=-1)
        length = self.t5_sequence_length(pipe, spec)
        if pipe.text_encoder_3 is None:  # diffusers' rule for a checkpoint without T5: zeros in its place
            t5 = clip.new_zeros((1, length, pipe.transformer.config.joint_attention_dim))
        else:
            t5, tokens["text_encoder_3"] = encode_t5(pipe.text_encoder_3, pipe.tokenizer_3, prompt, length)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Encoded(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1), tokens, images=spec.num_images)

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        images = positive.images  # given embeddings are the call's whole batch: one row per image
        assert positive.pooled is not None and negative.pooled is not None
        return {
            "prompt": None,
            "negative_prompt": None,
            "num_images_per_prompt": 1,
            "prompt_embeds": positive.embeds.repeat(images, 1, 1),
            "negative_prompt_embeds": negative.embeds.repeat(images, 1, 1),
            "pooled_prompt_embeds": positive.pooled.repeat(images, 1),
            "negative_pooled_prompt_embeds": negative.pooled.repeat(images, 1),
        }

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        rows = positive.embeds.repeat(images, 1, 1)
        if guided:
            rows = torch.cat([negative.embeds.repeat(images, 1, 1), rows])
        return {"prompt_embeds": rows}

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        return ConditionalHalfCutoff(spec.step_ratio, spec.step_index, model=self.denoiser)

    def can_drop_rows(self, pipe: Any) -> bool:
        return "pooled_prompt_embeds" in getattr(pipe, "_callback_tensor_inputs", ())  # text2img, not img2img

    def batch_tensor_inputs(self, pipe: Any) -> list[str]:
        return ["latents", "prompt_embeds", "pooled_prompt_embeds"]

    def drop_rows(self, callback_kwargs: dict[str, Any], index: torch.Tensor, guided: torch.Tensor) -> None:
        callback_kwargs["latents"] = callback_kwargs["latents"][index]
        callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"][guided]
        callback_kwargs["pooled_prompt_embeds"] = callback_kwargs["pooled_prompt_embeds"][guided]
