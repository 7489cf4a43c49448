"""Classifier-free-guidance cutoff, correct for any number of images per prompt.

diffusers' official `SDCFGCutoffCallback` / `SDXLCFGCutoffCallback` keep `tensor[-1:]` of the
guided batch, which is `[uncond x n, cond x n]`: for n > 1 that keeps one row where n are
needed and the next UNet call fails. These subclasses keep the conditional half instead, and do
nothing when guidance was already off (the batch was never doubled then).
"""

from __future__ import annotations

from typing import Any

from diffusers.callbacks import IPAdapterScaleCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

from producer.spec import CfgCutoff, IpAdapterScaleCutoff


def _cutoff_step(pipeline: Any, ratio: float | None, index: int | None) -> int:
    return index if index is not None else int(pipeline.num_timesteps * ratio)


def _conditional_half(name: str, tensor: Any) -> Any:
    if tensor is None:
        return None
    if name == "image_embeds":  # the IP-Adapter's list, read by the loop every step: trimmed in place
        tensor[:] = [embeds.chunk(2)[1] for embeds in tensor]
        return tensor
    if name == "add_time_ids":
        return tensor[-1:].repeat(tensor.shape[0] // 2, 1)
    return tensor.chunk(2)[1]


def _cut(callback: Any, pipeline: Any, step_index: int, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
    config = callback.config
    if step_index != _cutoff_step(pipeline, config.cutoff_step_ratio, config.cutoff_step_index):
        return callback_kwargs
    if pipeline.do_classifier_free_guidance:
        for name in callback.tensor_inputs:
            callback_kwargs[name] = _conditional_half(name, callback_kwargs[name])
    pipeline._guidance_scale = 0.0
    return callback_kwargs


class BatchSafeSDCFGCutoffCallback(SDCFGCutoffCallback):
    """`SDCFGCutoffCallback` that keeps the whole conditional half of the batch."""

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        return _cut(self, pipeline, step_index, callback_kwargs)


class BatchSafeSDXLCFGCutoffCallback(SDXLCFGCutoffCallback):
    """`SDXLCFGCutoffCallback` that keeps the whole conditional half of the batch."""

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        return _cut(self, pipeline, step_index, callback_kwargs)


_BY_FAMILY: dict[str, Any] = {"sd15": BatchSafeSDCFGCutoffCallback, "sdxl": BatchSafeSDXLCFGCutoffCallback}
_EXTRA = {"text2img": [], "img2img": [], "inpaint": ["mask", "masked_image_latents"], "controlnet": ["image"]}


def cfg_cutoff_callback(family: str, spec: CfgCutoff, kind: str = "text2img", ip_adapter: bool = False) -> Any:
    # The official constructor defaults cutoff_step_ratio to 1.0 and rejects a step index unless the
    # ratio is passed as None explicitly, so both are always passed.
    callback = _BY_FAMILY[family](cutoff_step_ratio=spec.step_ratio, cutoff_step_index=spec.step_index)
    callback.tensor_inputs = [*type(callback).tensor_inputs, *_EXTRA[kind], *(["image_embeds"] if ip_adapter else [])]
    return callback


def ip_adapter_scale_cutoff_callback(spec: IpAdapterScaleCutoff) -> Any:
    """The official callback as it is; the per-job unload (`worker.models.ip_adapter.attached`) resets the scale."""
    return IPAdapterScaleCutoffCallback(cutoff_step_ratio=spec.step_ratio, cutoff_step_index=spec.step_index)
