"""Flux.1: a flow-matching transformer whose guidance is distilled into the model.

Flux.1 [dev] feeds `guidance_scale` to the transformer as an embedding and [schnell] has none: either way the loop
makes one pass per step, with no unconditional rows, so there is nothing for a CFG cutoff to cut and no negative
prompt to condition on (both are refused, saying why). Its latents are packed 2x2 patches, (B, (H/16)(W/16), 64);
a preview and a decode unpack them first. Per-row tensors the callbacks cannot reach (the pooled CLIP vector, the
guidance) are fixed before the loop, so rows that leave a shared call stay in it, unused.
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
from producer.spec import CfgCutoff, RenderSpec
from worker.models import tiny_flux
from worker.models.families.base import Kind
from worker.models.families.flow import FlowFamily
from worker.models.families.guidance import NegativePassCutoff


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
