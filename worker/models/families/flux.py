"""Flux.1: a flow-matching transformer whose guidance is distilled into the model.

Flux.1 [dev] feeds `guidance_scale` to the transformer as an embedding and [schnell] has none: either way the loop
makes one pass per step, with no unconditional rows, so there is nothing for a CFG cutoff to cut and no negative
prompt to condition on (both are refused, saying why). Its latents are packed 2x2 patches, (B, (H/16)(W/16), 64);
a preview and a decode unpack them first. Per-row tensors the callbacks cannot reach (the pooled CLIP vector, the
guidance) are fixed before the loop, so rows that leave a shared call stay in it, unused.

`a1111` prompts: T5 reads the whole prompt, weighted, in diffusers' 512 positions (a longer one is refused, never
cut); the CLIP encoder gives a pooled vector alone, of the first 75 tokens unweighted (a weight scales per-token
embeddings; a pooled vector has none). A prompt schedule replaces `prompt_embeds`, the one text tensor the loop
lets a callback replace: the pooled vector stays the first span's. The negative prompt cannot change (its true-CFG
embeddings are fixed before the loop), and a guidance curve cannot apply: the distilled guidance is an embedding
made once before the loop, and `true_cfg_scale` is read once before it too.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from diffusers import (
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
)

from producer.errors import UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import tiny_flux
from worker.models.families.base import Kind
from worker.models.families.flow import FlowFamily, given_embeddings
from worker.models.families.guidance import NegativePassCutoff
from worker.models.prompt_embeds import Encoded, chunks, encode_t5, seen


class FluxFamily(FlowFamily):
    name = "flux"
    pipelines = {
        "text2img": FluxPipeline,
        "img2img": FluxImg2ImgPipeline,
        "inpaint": FluxInpaintPipeline,
        "controlnet": FluxControlNetPipeline,
    }
    tiny = {"tiny": tiny_flux.build, "tiny-schnell": tiny_flux.build_schnell}
    controlnet_class = FluxControlNetModel
    step_caches = frozenset({"first_block", "taylorseer"})
    control_image_argument = "control_image"

    def tiny_controlnet(self, base: Any, seed: int = 0) -> Any:
        torch.manual_seed(seed)
        config = base.transformer.config
        with warnings.catch_warnings():  # diffusers' own module imports a name it deprecated, and says so
            warnings.filterwarnings("ignore", message="`FluxPosEmbed` is deprecated", category=FutureWarning)
            return FluxControlNetModel.from_transformer(
                base.transformer,
                num_layers=1,
                num_single_layers=0,
                attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads,
                load_weights_from_transformer=False,
            )

    true_cfg = True
    prompt_encoding = True
    t5 = ("tokenizer_2", "text_encoder_2")
    prompt_schedule_inputs = ("prompt_embeds",)
    negative_schedule = "its true-CFG pass reads negative embeddings fixed before the loop, which no callback reaches"
    guidance_curve = (
        "is guidance-distilled: its guidance is an embedding made once before the loop, and its true_cfg_scale is "
        "read once before the loop too"
    )

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        if negative and spec.true_cfg_scale <= 1:
            return Encoded(torch.empty(0), images=spec.num_images)  # no negative pass: nothing to encode
        first = chunks(pipe.tokenizer, prompt)[:1]  # its first 75 tokens, unweighted: a pooled vector alone
        ids = torch.tensor([first[0].ids], device=pipe.text_encoder.device)
        pooled = pipe.text_encoder(ids, output_hidden_states=False).pooler_output.to(dtype=pipe.text_encoder.dtype)
        length = self.t5_sequence_length(pipe, spec)
        embeds, count = encode_t5(pipe.text_encoder_2, pipe.tokenizer_2, prompt, length)
        tokens = {"text_encoder": seen(first), "text_encoder_2": count}
        return Encoded(embeds, pooled, tokens, images=spec.num_images)

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        return given_embeddings(positive, negative, "pooled")

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        return {"prompt_embeds": positive.embeds.repeat(images, 1, 1)}  # one pass per step: no negative rows

    def check(self, spec: RenderSpec, model: str) -> None:
        super().check(spec, model)
        true_cfg = spec.true_cfg_scale > 1
        for index, callback in enumerate(spec.callbacks):
            if isinstance(callback, CfgCutoff) and not true_cfg:
                raise UnsupportedSpecError(
                    f"callbacks[{index}]: {model!r} ({self.name}) has distilled guidance; there is no unconditional "
                    "pass to cut: remove the cfg_cutoff (or guide by a negative prompt with true_cfg_scale > 1)"
                )
        if spec.negative_prompt and not true_cfg:
            raise UnsupportedSpecError(
                f"negative_prompt: {model!r} ({self.name}) has distilled guidance and takes a negative prompt only "
                "with true_cfg_scale > 1; leave it empty or set true_cfg_scale"
            )
        if true_cfg and not spec.negative_prompt:
            raise UnsupportedSpecError(
                f"true_cfg_scale: {model!r} ({self.name}) runs its second pass on the negative prompt; give a "
                "negative_prompt or leave true_cfg_scale at 1"
            )

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        # Reached only with true CFG (`check`): its negative pass is decided before the loop, so it is answered.
        return NegativePassCutoff(spec.step_ratio, spec.step_index)

    def adjust_arguments(self, spec: RenderSpec, arguments: dict[str, Any]) -> None:
        arguments["true_cfg_scale"] = spec.true_cfg_scale

    def unpacked(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        unpacked: torch.Tensor = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return unpacked
