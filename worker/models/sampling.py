"""What a job sets on a cached pipeline for its own run: the sampler (scheduler) and clip skip.

Each job gets a scheduler of its own, made from the checkpoint's scheduler config with the options
the A1111/ComfyUI name stands for, and the checkpoint's scheduler goes back when the job ends. A
fresh object per job also means no sampler state (a multistep solver's history of model outputs,
a step counter) can leak from one job into the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from producer.errors import UnsupportedSpecError
from producer.spec import RenderSpec


@dataclass(frozen=True)
class Sampler:
    """A sampler name as A1111 writes it, the diffusers class, and the options that make it that sampler."""

    label: str
    cls: Any
    options: dict[str, Any] = field(default_factory=dict)


# Options are explicit where a checkpoint's own config could otherwise change the sampler's meaning
# (a config with Karras sigmas on must not turn "dpmpp_2m" into DPM++ 2M Karras). Everything else,
# the beta schedule, timestep spacing and prediction type, comes from the checkpoint.
SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("Euler", EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_a": Sampler("Euler a", EulerAncestralDiscreteScheduler),
    "heun": Sampler("Heun", HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m": Sampler(
        "DPM++ 2M",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": Sampler(
        "DPM++ 2M Karras",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": Sampler(
        "DPM++ 2M SDE Karras",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": Sampler("DDIM", DDIMScheduler),
    "unipc": Sampler("UniPC", UniPCMultistepScheduler),
    "lcm": Sampler("LCM", LCMScheduler),
}
_LABELS = {sampler.cls.__name__: sampler.label for sampler in SAMPLERS.values() if not sampler.options}
_LABELS["EulerDiscreteScheduler"] = "Euler"


@dataclass(frozen=True)
class SchedulerUsed:
    """The scheduler a job ran with, as the manifest records it."""

    name: str
    label: str
    cls: str
    options: dict[str, Any]


def make_scheduler(name: str, checkpoint_scheduler: Any) -> tuple[Any, SchedulerUsed]:
    """A new scheduler for one job: `name`'s class and options over the checkpoint's scheduler config."""
    config = checkpoint_scheduler.config
    if name == "default":
        cls: Any = type(checkpoint_scheduler)
        options: dict[str, Any] = {}
        label = _LABELS.get(cls.__name__, cls.__name__)
    else:
        sampler = SAMPLERS[name]
        cls, options, label = sampler.cls, sampler.options, sampler.label
    return cls.from_config(config, **options), SchedulerUsed(name, label, cls.__name__, dict(options))


@contextmanager
def scheduled(
    pipe: Any, name: str, make: Callable[[str, Any], tuple[Any, SchedulerUsed]] | None = None
) -> Iterator[SchedulerUsed]:
    """Run `pipe` with a fresh `name` scheduler (made by `make`, the family's; A1111's table by default); the
    checkpoint's own is back on exit, whatever happened."""
    checkpoint_scheduler = pipe.scheduler
    pipe.scheduler, used = (make or make_scheduler)(name, checkpoint_scheduler)
    try:
        yield used
    finally:
        pipe.scheduler = checkpoint_scheduler


def clip_skip_arguments(pipe: Any, spec: RenderSpec, prompt: str | list[str] | None = None) -> dict[str, Any]:
    """The pipeline arguments that apply `spec.clip_skip` (none when it is 0) to `prompt` (default: the spec's;
    a shared call passes its list, one prompt per row).

    SDXL takes diffusers' own `clip_skip`. Stable Diffusion 1.5's reads `text_encoder.text_model`, which
    transformers 5 removed from `CLIPTextModel` (an AttributeError in diffusers 0.42; a test watches for the
    fix), so its prompt embeddings are made here exactly as diffusers makes them and passed in instead: one row
    per prompt. The negative prompt is still the pipeline's to encode (without clip skip, as diffusers does).
    """
    if not spec.clip_skip:
        return {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"clip_skip": spec.clip_skip}
    prompts = spec.prompt if prompt is None else prompt
    return {"prompt": None, "prompt_embeds": _skipped_embeddings(pipe, prompts, spec.clip_skip)}


def _skipped_embeddings(pipe: Any, prompt: str | list[str], clip_skip: int) -> Any:
    encoder = pipe.text_encoder
    tokens = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)[-1]
    final_layer_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_layer_norm(hidden[-(clip_skip + 1)]).to(dtype=encoder.dtype)


def check_clip_skip(pipe: Any, spec: RenderSpec) -> None:
    """clip_skip must leave at least one text-encoder layer; SDXL skips in both of its encoders."""
    if not spec.clip_skip:
        return
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    depth = min(int(e.config.num_hidden_layers) for e in encoders)
    if spec.clip_skip > depth - 1:
        raise UnsupportedSpecError(
            f"clip_skip: {spec.model!r} has {depth} text-encoder layers, so clip_skip can be at most {depth - 1}; "
            f"got {spec.clip_skip}"
        )
