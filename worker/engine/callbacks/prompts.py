"""Prompts that change during the loop: A1111 prompt editing (`[from:to:when]`) and guidance curves.

A prompt schedule is encoded whole before the loop (every span of the prompt and of its negative, once each), the
first span goes into the pipeline call, and `PromptScheduleCallback` puts the next span's embeddings into the loop
at the end of the step before it applies: the callback guide's "changing the prompt embeddings at each timestep".
It reads the pipeline's CFG state at that moment, so after a CFG cutoff it hands over the conditional rows only; it
runs after the cutoff in the chain for that reason. A resume replays the steps before its checkpoint through the
same callbacks, so the spans after a switch come back as they were.

`GuidanceCurveCallback` sets `_guidance_scale` for the next step, on families whose loop reads it every step; once a
CFG cutoff has ended guidance (scale 0), the curve no longer applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers.callbacks import PipelineCallback

from producer import prompt_syntax
from producer.spec import Guidance, RenderSpec, guidance_at
from worker.models.families import ModelFamily
from worker.models.prompt_embeds import Encoded


@dataclass
class PromptPlan:
    """A job's prompts encoded for each span: (first step, prompt, negative prompt), in step order."""

    spans: list[tuple[int, Encoded, Encoded]]

    @property
    def tokens(self) -> dict[str, int]:
        """The most tokens each encoder saw of the prompt, over its spans."""
        most: dict[str, int] = {}
        for _, positive, _ in self.spans:
            for name, count in positive.tokens.items():
                most[name] = max(most.get(name, 0), count)
        return most


def switch_steps(spec: RenderSpec) -> list[int]:
    """The steps at which the spec's prompt or negative prompt changes (none for a `plain` prompt)."""
    if spec.prompt_syntax != "a1111":
        return []
    steps = spec.denoising_steps
    found = set(prompt_syntax.switch_steps(spec.prompt, steps))
    if spec.negative_prompt:
        found |= set(prompt_syntax.switch_steps(spec.negative_prompt, steps))
    return sorted(found)


def encode_plan(pipe: Any, family: ModelFamily, spec: RenderSpec, *, last_only: bool = False) -> PromptPlan:
    """Every span of the spec's `a1111` prompts encoded on `pipe`'s text encoders (each distinct text once); with
    `last_only`, the last span alone (a second stage runs the prompts as they end)."""
    steps = spec.denoising_steps
    positive = prompt_syntax.schedule(spec.prompt, steps)
    negative = prompt_syntax.schedule(spec.negative_prompt, steps) if spec.negative_prompt else []
    encoded: dict[tuple[Any, bool], Encoded] = {}

    def encode(text: prompt_syntax.Weighted, is_negative: bool) -> Encoded:
        key = (text, is_negative)
        if key not in encoded:
            encoded[key] = family.prompt_conditioning(pipe, spec, text, negative=is_negative)
        return encoded[key]

    def at(spans: list[prompt_syntax.Span], step: int) -> prompt_syntax.Weighted:
        current = prompt_syntax.Weighted(())
        for span in spans:
            if span.first_step <= step:
                current = span.prompt
        return current

    starts = sorted({0, *(span.first_step for span in positive), *(span.first_step for span in negative)})
    if last_only:
        starts = starts[-1:]
    return PromptPlan([(step, encode(at(positive, step), False), encode(at(negative, step), True)) for step in starts])


class PromptScheduleCallback(PipelineCallback):
    """Puts each span's prompt embeddings into the loop at the end of the step before the span begins."""

    def __init__(self, family: ModelFamily, images: int) -> None:
        # PipelineCallback.__init__ validates cutoff arguments that a schedule does not have.
        self.family = family
        self.images = images
        self.plan: PromptPlan | None = None  # bound by the render, once the pipeline's encoders have made it

    @property
    def tensor_inputs(self) -> list[str]:
        return list(self.family.prompt_schedule_inputs)

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        assert self.plan is not None, "PromptScheduleCallback: the render binds the plan before the call"
        for first_step, positive, negative in self.plan.spans:
            if first_step == step_index + 1:
                # Flux.1 and Qwen-Image have no such property (their negative pass is decided before the loop).
                guided = bool(getattr(pipeline, "do_classifier_free_guidance", False))
                callback_kwargs.update(self.family.loop_conditioning(positive, negative, self.images, guided))
        return callback_kwargs


class GuidanceCurveCallback(PipelineCallback):
    """Sets the guidance scale of the next step from the spec's curve (the first step's is the call's own)."""

    tensor_inputs: list[str] = []

    def __init__(self, guidance: Guidance) -> None:
        self.guidance = guidance

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        steps = pipeline.num_timesteps
        if step_index + 1 < steps and pipeline.guidance_scale > 0:  # a cutoff's 0 ends guidance for good
            pipeline._guidance_scale = guidance_at(self.guidance, step_index + 1, steps)
        return callback_kwargs
