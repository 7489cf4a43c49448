"""Classifier-free-guidance cutoff callbacks, correct for any number of images and prompts.

diffusers' official `SDCFGCutoffCallback` / `SDXLCFGCutoffCallback` keep `tensor[-1:]` of the
guided batch, which is `[uncond x n, cond x n]`: for n > 1 that keeps one row where n are
needed and the next UNet call fails. These subclasses keep the conditional half instead, and do
nothing when guidance was already off (the batch was never doubled then). `ConditionalHalfCutoff` cuts
where no callback can reach every conditioning tensor (SD3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.callbacks import (
    IPAdapterScaleCutoffCallback,
    PipelineCallback,
    SDCFGCutoffCallback,
    SDXLCFGCutoffCallback,
)

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


CUTOFF_EXTRA = {"text2img": [], "img2img": [], "inpaint": ["mask", "masked_image_latents"], "controlnet": ["image"]}
"""What a cutoff trims besides the official callback's inputs, per pipeline kind (SD 1.5 and SDXL)."""


def cutoff_callback(cls: Any, spec: CfgCutoff, extra: list[str]) -> Any:
    """`cls` (a cutoff callback class) at the spec's step, trimming its own tensor inputs and `extra`."""
    # The official constructor defaults cutoff_step_ratio to 1.0 and rejects a step index unless the
    # ratio is passed as None explicitly, so both are always passed.
    callback = cls(cutoff_step_ratio=spec.step_ratio, cutoff_step_index=spec.step_index)
    callback.tensor_inputs = [*cls.tensor_inputs, *extra]
    return callback


def ip_adapter_scale_cutoff_callback(spec: IpAdapterScaleCutoff) -> Any:
    """The official callback as it is; the per-job unload (`worker.models.ip_adapter.attached`) resets the scale."""
    return IPAdapterScaleCutoffCallback(cutoff_step_ratio=spec.step_ratio, cutoff_step_index=spec.step_index)


class ConditionalHalfCutoff(PipelineCallback):
    """A CFG cutoff that needs no callback tensor: from the cutoff on, the loop's model runs on the conditional half
    of its doubled batch only and answers for both halves with that output, so the pipeline's
    `uncond + s * (cond - uncond)` is `cond` exactly (`cond - cond` is 0). Batch-safe for any number of prompts and
    images, on every pipeline kind (SD3's img2img and inpaint keep their pooled embeddings out of reach of
    callbacks), and half the model's work after the cutoff, as a real cutoff gives.

    It halves through forward hooks, not by replacing `forward`, so it composes with what else holds the model (a
    resume's replay turns the model off by replacing `forward`, and puts it back at its checkpoint's step).
    `release()` after the call removes the hooks, however the call ended.
    """

    tensor_inputs: list[str] = []

    def __init__(self, step_ratio: float | None, step_index: int | None, *, model: str) -> None:
        # PipelineCallback.__init__ validates the official callbacks' arguments, which are passed as they are.
        self.step_ratio = step_ratio
        self.step_index = step_index
        self.model_attr = model
        self._hooks: list[Any] = []

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        cutoff = _cutoff_step(pipeline, self.step_ratio, self.step_index)
        if step_index == cutoff and not self._hooks and pipeline.do_classifier_free_guidance:
            self._halve(getattr(pipeline, self.model_attr))
        return callback_kwargs

    def _halve(self, model: Any) -> None:
        halved: list[bool] = [False]

        def conditional_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            sample = args[0] if args else kwargs["hidden_states"]
            rows = sample.shape[0]
            halved[0] = rows % 2 == 0
            if not halved[0]:
                return None

            def half(value: Any) -> Any:
                return value[rows // 2 :] if isinstance(value, torch.Tensor) and value.shape[:1] == (rows,) else value

            return tuple(half(a) for a in args), {name: half(value) for name, value in kwargs.items()}

        def both_halves(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if not halved[0]:
                return None
            if isinstance(output, tuple):
                return (torch.cat([output[0], output[0]]), *output[1:])
            output.sample = torch.cat([output.sample, output.sample])
            return output

        self._hooks = [
            model.register_forward_pre_hook(conditional_inputs, with_kwargs=True),
            model.register_forward_hook(both_halves, with_kwargs=True),
        ]

    def release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


_STATE = "_negative_pass_cutoff"  # the transformer attribute holding a cut's state while it is on


class _Cut:
    """A cut's state on its transformer: which call of the step is running, and the positive call's output."""

    def __init__(self) -> None:
        self.call: str | None = None
        self.positive: Any = None


_ANSWERING: dict[type, type] = {}


def _answering(base: type) -> type:
    """`base` (a transformer class) whose negative ("uncond") call returns the same step's positive ("cond") output
    without running. The loop names each call with `cache_context`, so the negative call is known by its name."""

    if base in _ANSWERING:
        return _ANSWERING[base]

    class PositiveAnswersNegative(base):
        @contextlib.contextmanager
        def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
            cut: _Cut = self.__dict__[_STATE]
            cut.call = name
            try:
                with super().cache_context(name, **kwargs):
                    yield
            finally:
                cut.call = None

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            cut: _Cut = self.__dict__[_STATE]
            if cut.call == "uncond" and cut.positive is not None:
                return cut.positive
            output = super().__call__(*args, **kwargs)
            if cut.call == "cond":
                cut.positive = output
            return output

    PositiveAnswersNegative.__name__ = PositiveAnswersNegative.__qualname__ = base.__name__
    _ANSWERING[base] = PositiveAnswersNegative
    return PositiveAnswersNegative


class NegativePassCutoff(PipelineCallback):
    """The CFG cutoff of loops that run the negative prompt as a separate pass decided before the loop (true CFG:
    Qwen-Image, Flux.1 with `true_cfg_scale`): from the step after the cutoff on, the negative pass is not run and the
    positive output stands for it, so `neg + s * (pos - neg)` is `pos` exactly (Qwen's renorm ratio is then 1).

    It changes the transformer's class for the call (a subclass that answers the negative call), not its `forward`
    and not the pipeline's attribute: a resume's replay turns the model off by replacing `forward` and puts it back at
    its checkpoint's step, and the pipeline's config follows its attributes. `release()` after the call puts the
    class back, however the call ended. These pipelines read no callback tensor for guidance, so it asks for none.
    """

    tensor_inputs: list[str] = []

    def __init__(self, step_ratio: float | None, step_index: int | None) -> None:
        # PipelineCallback.__init__ validates the official callbacks' arguments, which are passed as they are.
        self.step_ratio = step_ratio
        self.step_index = step_index
        self._cut: tuple[Any, type] | None = None  # the transformer and its own class, while the cut is on

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        if step_index == _cutoff_step(pipeline, self.step_ratio, self.step_index) and self._cut is None:
            model = pipeline.transformer
            own = type(model)
            model.__dict__[_STATE] = _Cut()
            model.__class__ = _answering(own)
            self._cut = (model, own)
        return callback_kwargs

    def release(self) -> None:
        if self._cut is not None:
            model, own = self._cut
            model.__class__ = own
            model.__dict__.pop(_STATE, None)
            self._cut = None
