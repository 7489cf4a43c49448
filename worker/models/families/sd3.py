"""Stable Diffusion 3.5: a flow-matching transformer with CFG as one doubled batch (`[uncond, cond]`).

Its cutoff does not trim callback tensors (`diffusers.callbacks.SD3CFGCutoffCallback` keeps `[-1:]`: one row for
every prompt, and on img2img and inpaint the pooled embeddings are no callback tensor, so it returns two images for
one). `ConditionalHalfCutoff` turns the transformer to the conditional rows from the cutoff on instead, exact for
any number of prompts and images on every pipeline kind. A shared text2img call drops rows like SD's.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

from producer.spec import CfgCutoff
from worker.models import tiny_sd3
from worker.models.families.base import Kind
from worker.models.families.flow import FlowFamily
from worker.models.families.guidance import ConditionalHalfCutoff


class SD3Family(FlowFamily):
    name = "sd3"
    pipelines = {
        "text2img": StableDiffusion3Pipeline,
        "img2img": StableDiffusion3Img2ImgPipeline,
        "inpaint": StableDiffusion3InpaintPipeline,
    }
    tiny = {"tiny": tiny_sd3.build}

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
