"""Chroma: a Flux.1-derived flow-matching transformer with real classifier-free guidance and a T5 encoder alone.

Unlike Flux.1, Chroma's guidance is not distilled: with `guidance_scale` > 1 each step runs the transformer twice, a
positive pass and a separate negative pass (the negative prompt, or "" when none is given), and mixes them as
`neg + s * (pos - neg)`. The loop asks `pipe.do_classifier_free_guidance` (`_guidance_scale > 1`) at every step, so a
cutoff sets `_guidance_scale` to 1 at its step: from the next step on the negative pass is skipped and the step uses
the positive output alone, what `guidance_scale=1` gives (2 -> 1 transformer calls per step). With `guidance_scale`
<= 1 there is no negative pass: a cutoff or a negative prompt would do nothing and is refused, saying why.

Its latents are Flux's packed 2x2 patches, (B, (H/16)(W/16), 64); a preview and a decode unpack them first. diffusers
0.42.1 has text2img, img2img and inpaint pipelines for it, and no ControlNet. Per-row tensors the callbacks cannot
reach (the attention masks, the negative prompt's embeddings) are fixed before the loop, so rows that leave a shared
call stay in it, unused, as on Flux.1.

`a1111` prompts: its T5 reads the whole prompt, weighted, in diffusers' 512 positions (a longer one is refused,
never cut), with the padding masked as diffusers masks it. A prompt schedule replaces `prompt_embeds`; the
transformer's text mask is fixed before the loop, so every span of the prompt is shown as many positions as its
longest span fills (a shorter span's own padding embeddings fill the rest). The negative prompt cannot change (its
pass reads embeddings and a mask fixed before the loop), and a guidance curve cannot apply: the loop mixes its two
passes with the call's `guidance_scale` argument, read once (only whether to run the negative pass is read each
step).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers import ChromaImg2ImgPipeline, ChromaInpaintPipeline, ChromaPipeline, DPMSolverMultistepScheduler
from diffusers.callbacks import PipelineCallback

from producer.errors import UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import tiny_chroma
from worker.models.families.base import Kind, prompt_spans
from worker.models.families.flow import FlowFamily, given_embeddings
from worker.models.prompt_embeds import Encoded, encode_t5, t5_positions


class NegativePassCutoff(PipelineCallback):
    """A CFG cutoff for loops that decide at every step whether to run their negative pass (Chroma's): at the cutoff
    step `_guidance_scale` becomes 1, so `do_classifier_free_guidance` is False from the next step on. No tensor is
    trimmed (the negative pass is a separate call, not half of a doubled batch), so it is exact for any number of
    prompts and images, on every pipeline kind, and in a shared call (the rows share the cutoff step)."""

    tensor_inputs: list[str] = []

    def __init__(self, step_ratio: float | None, step_index: int | None) -> None:
        # PipelineCallback.__init__ validates the official callbacks' arguments; the spec has validated these.
        self.step_ratio = step_ratio
        self.step_index = step_index

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        ratio = self.step_ratio if self.step_ratio is not None else 1.0
        cutoff = self.step_index if self.step_index is not None else int(pipeline.num_timesteps * ratio)
        if step_index == cutoff and pipeline.do_classifier_free_guidance:
            pipeline._guidance_scale = 1.0  # > 1 runs the negative pass; 1 is the positive output alone
        return callback_kwargs


class FlowSigmasDPMSolver(DPMSolverMultistepScheduler):
    """DPM++ on flow sigmas that takes the `sigmas` Chroma's loops always pass (a plain linspace of the step count).

    FluxPipeline drops those sigmas when the scheduler has `use_flow_sigmas` and passes the step count instead; the
    Chroma pipelines copied the rest of Flux's loop but not that, and diffusers' `retrieve_timesteps` refuses sigmas
    to a scheduler whose `set_timesteps` has no `sigmas` parameter. Taking their count does what Flux does: the
    solver makes its own flow sigmas for that many steps, shifted by the pipeline's `mu`.
    """

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        if sigmas is not None:
            num_inference_steps = len(sigmas)
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, mu=mu, timesteps=timesteps)


class ChromaFamily(FlowFamily):
    name = "chroma"
    pipelines = {
        "text2img": ChromaPipeline,
        "img2img": ChromaImg2ImgPipeline,
        "inpaint": ChromaInpaintPipeline,
    }
    tiny = {"tiny": tiny_chroma.build}
    prompt_encoding = True
    t5 = ("tokenizer", "text_encoder")
    prompt_schedule_inputs = ("prompt_embeds",)
    negative_schedule = "its negative pass reads embeddings and a mask fixed before the loop, which no callback reaches"
    guidance_curve = (
        "mixes its two passes with the call's guidance_scale argument, read once before the loop (only whether to "
        "run the negative pass is read each step)"
    )

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        if negative and spec.first_guidance_scale <= 1:
            return Encoded(torch.empty(0), images=spec.num_images)  # no negative pass: nothing to encode
        length = self.t5_sequence_length(pipe, spec)
        embeds, count = encode_t5(pipe.text_encoder, pipe.tokenizer, prompt, length, masked=True)
        # diffusers shows the transformer the tokens, the end token and the first padding position; a schedule's
        # spans share one mask (it is fixed before the loop): its longest span's.
        shown = count + 1
        if not negative:
            spans = dict(prompt_spans(spec))["prompt"]
            shown = max([shown, *(t5_positions(pipe.tokenizer, each) for _, each in spans)])
        mask = (torch.arange(length, device=embeds.device) <= shown).to(embeds.dtype).unsqueeze(0)
        return Encoded(embeds, None, {"text_encoder": count}, mask=mask, images=spec.num_images)

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        return given_embeddings(positive, negative, "mask")

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        return {"prompt_embeds": positive.embeds.repeat(images, 1, 1)}  # the negative pass is a separate call

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        with warnings.catch_warnings():  # diffusers' Chroma model uses a name diffusers deprecated, and says so
            warnings.filterwarnings("ignore", message="`FluxPosEmbed` is deprecated", category=FutureWarning)
            yield

    def variant(self, base: Any, kind: Kind, extra: Mapping[str, Any]) -> Any:
        config = base.transformer.config
        if kind == "inpaint" and "guidance_embeds" not in config:
            # diffusers 0.42.1's ChromaInpaintPipeline reads `transformer.config.guidance_embeds` (copied from Flux's)
            # and ChromaTransformer2DModel has no such setting, so every inpaint call fails. Chroma has no guidance
            # embedding and the value read is never used: False states that, and the call runs.
            base.transformer.register_to_config(guidance_embeds=False)
        return super().variant(base, kind, extra)

    def check(self, spec: RenderSpec, model: str) -> None:
        super().check(spec, model)
        if spec.guidance_scale > 1:
            return
        for index, callback in enumerate(spec.callbacks):
            if isinstance(callback, CfgCutoff):
                raise UnsupportedSpecError(
                    f"callbacks[{index}]: {model!r} ({self.name}) runs no negative pass at guidance_scale "
                    f"{spec.guidance_scale:g} (<= 1), so there is nothing to cut: remove the cfg_cutoff or raise "
                    "guidance_scale above 1"
                )
        if spec.negative_prompt:
            raise UnsupportedSpecError(
                f"negative_prompt: {model!r} ({self.name}) runs no negative pass at guidance_scale "
                f"{spec.guidance_scale:g} (<= 1), so the negative prompt would be ignored: leave it empty or raise "
                "guidance_scale above 1"
            )

    def make_scheduler(self, name: str, checkpoint_scheduler: Any) -> tuple[Any, Any]:
        scheduler, used = super().make_scheduler(name, checkpoint_scheduler)
        if type(scheduler) is DPMSolverMultistepScheduler:
            # The same object with a `set_timesteps` that takes Chroma's sigmas: its config (the flow shift and the
            # dynamic-shift keys `make_flow_scheduler` wrote in) stays as made, which a copy through `from_config`
            # would drop.
            scheduler.__class__ = FlowSigmasDPMSolver
        return scheduler, used

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        return NegativePassCutoff(spec.step_ratio, spec.step_index)

    def unpacked(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        unpacked: torch.Tensor = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return unpacked


FAMILY = ChromaFamily()
