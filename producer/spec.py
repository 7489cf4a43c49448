"""The render spec: the one contract between applications and workers.

A spec is validated twice, in the producer before it is enqueued and again in the worker, so a
bad spec is a `SpecError` naming the field, never a crash deep inside diffusers.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from producer.errors import SpecError

SPEC_VERSION: Literal[1] = 1
MAX_STEPS = 150
MAX_IMAGES = 8
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_SEED = 2**63 - 1

PipelineKind = Literal["text2img", "img2img", "inpaint", "controlnet"]
IMAGE_SCHEMES = ("s3://", "file://", "data:image/png;base64,", "data:image/jpeg;base64,", "data:image/webp;base64,")
MAX_INLINE_CHARS = 14_000_000  # ~10 MiB of image as base64; larger inputs go by s3:// or file://

# Which image inputs each pipeline needs; every other one is refused, so a forgotten field is never silently ignored.
NEEDS: dict[str, frozenset[str]] = {
    "text2img": frozenset(),
    "img2img": frozenset({"image"}),
    "inpaint": frozenset({"image", "mask_image"}),
    "controlnet": frozenset({"control_image"}),
}
IMAGE_FIELDS = ("image", "mask_image", "control_image")
FrameFormat = Literal["png", "webp", "jpeg"]
SchedulerName = Literal[
    "default",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde_karras",
    "ddim",
    "unipc",
    "lcm",
    "flow_euler",
    "flow_euler_sde",
]
"""Sampler names: A1111's for SD 1.5 and SDXL; flow_euler, flow_euler_sde, dpmpp_2m, unipc and lcm for the
flow-matching families (Flux.1, SD3.5). The worker refuses a name the model's family does not run."""
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__  # type: ignore[attr-defined]
SCHEDULER_MAX_STEPS: dict[str, int] = {"lcm": 50}
"""Samplers that run fewer than MAX_STEPS steps. LCM picks its steps from a schedule of `original_inference_steps`
(50 in diffusers' LCMScheduler) and refuses more; every other sampler runs up to its 1000 training timesteps."""
MAX_CLIP_SKIP = 12  # the worker checks the model's own text-encoder depth (layers - 1)
MAX_LORAS = 4
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


MAX_DEADLINE_SECONDS = 7 * 24 * 3600.0
"""A job's `deadline_seconds` is at most a week (the time its records live by default)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Cutoff(_Strict):
    """A cutoff fires at the end of one denoising step, like diffusers' official callbacks.

    With `step_index=i` the change applies from step i+1 on; with `step_ratio=r` the step is
    `int(steps * r)`. A cutoff on the last step (or r = 1.0) therefore changes nothing.
    """

    step_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    step_index: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> _Cutoff:
        if (self.step_ratio is None) == (self.step_index is None):
            raise ValueError("give exactly one of step_ratio (0 < r <= 1) or step_index (0 <= i < num_inference_steps)")
        return self

    def cutoff_step(self, num_steps: int) -> int:
        """The step index at whose end the cutoff fires (diffusers' rule)."""
        if self.step_index is not None:
            return self.step_index
        assert self.step_ratio is not None
        return int(num_steps * self.step_ratio)


class CfgCutoff(_Cutoff):
    """Turn classifier-free guidance off after a step."""

    type: Literal["cfg_cutoff"]


class IpAdapterScaleCutoff(_Cutoff):
    """Set the IP-Adapter scale to 0 after a step."""

    type: Literal["ip_adapter_scale_cutoff"]


class StepBudget(_Strict):
    """Interrupt the job after `max_steps` steps or `max_seconds` of denoising; the partial image is kept."""

    type: Literal["step_budget"]
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    max_seconds: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _at_least_one(self) -> StepBudget:
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("give max_steps, max_seconds or both")
        return self


class Frames(_Strict):
    """Store a preview of the latents every `every` steps, `size` pixels on the long edge."""

    type: Literal["frames"]
    every: int = Field(default=1, ge=1, le=MAX_STEPS)
    format: FrameFormat = "png"
    size: int = Field(default=256, ge=16, le=1024)


def check_image_ref(value: str) -> str:
    if not value.startswith(IMAGE_SCHEMES):
        raise ValueError(
            "must be s3://bucket/key, file:///path under an allowed root, or data:image/png|jpeg|webp;base64,..."
        )
    if len(value) > MAX_INLINE_CHARS:
        raise ValueError(f"inline image is {len(value)} characters, over {MAX_INLINE_CHARS}; upload it and pass s3://")
    return value


class IpAdapterOptions(_Strict):
    """Condition on an image through an IP-Adapter, at `scale` (0 = off)."""

    image: str
    scale: float = Field(default=0.6, ge=0.0, le=2.0, allow_inf_nan=False)

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str) -> str:
        return check_image_ref(value)


class StepCache(_Strict):
    """A training-free step cache for the job (diffusers' `transformer.enable_cache`), where the model's family has
    one: `first_block` reuses the rest of the transformer's output while its first block's output changes by less
    than `threshold` (relative); `taylorseer` computes the model every `interval` steps after `warmup_steps` and
    extrapolates between. Faster, slightly different images; a cached job neither checkpoints nor resumes."""

    type: Literal["first_block", "taylorseer"]
    threshold: float = Field(default=0.05, gt=0.0, le=1.0, allow_inf_nan=False, description="first_block only")
    interval: int = Field(default=5, ge=1, le=MAX_STEPS, description="taylorseer only: steps between model calls")
    warmup_steps: int = Field(default=3, ge=0, le=MAX_STEPS, description="taylorseer only: steps computed in full")


class LoraRef(_Strict):
    """A LoRA from the worker's allowlist (`RENDER_LORAS`), applied at `scale` (negative values invert it)."""

    name: str = Field(pattern=LORA_NAME_PATTERN, description="A LoRA name from the worker's RENDER_LORAS allowlist.")
    scale: float = Field(default=1.0, ge=-2.0, le=2.0, allow_inf_nan=False)


PromptSyntax = Literal["plain", "a1111"]


class GuidanceRamp(_Strict):
    """A guidance scale that moves from `from` at the first step to `to` at the last, along `curve`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    start: float = Field(alias="from", ge=0.0, le=50.0, allow_inf_nan=False)
    end: float = Field(alias="to", ge=0.0, le=50.0, allow_inf_nan=False)
    curve: Literal["linear", "cosine"] = "linear"

    def at(self, t: float) -> float:
        """The scale at `t` (0: the first step, 1: the last)."""
        if self.curve == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return self.start + (self.end - self.start) * t


GuidancePoint = tuple[
    Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)],
    Annotated[float, Field(ge=0.0, le=50.0, allow_inf_nan=False)],
]
Guidance = Annotated[
    Annotated[GuidanceRamp, Tag("ramp")]
    | Annotated[list[GuidancePoint], Field(min_length=2, max_length=MAX_STEPS), Tag("points")],
    Discriminator(lambda value: "points" if isinstance(value, list | tuple) else "ramp"),
]


def guidance_at(guidance: Guidance, index: int, steps: int) -> float:
    """The guidance scale of step `index` (0-based) of `steps`: step i sits at t = i / (steps - 1), so the first
    step is at 0 and the last at 1; a point list is joined by straight lines and held flat beyond its ends."""
    t = index / (steps - 1) if steps > 1 else 0.0
    if isinstance(guidance, GuidanceRamp):
        return guidance.at(t)
    if t <= guidance[0][0]:
        return guidance[0][1]
    for (t0, s0), (t1, s1) in zip(guidance, guidance[1:], strict=False):
        if t <= t1:
            return s0 + (s1 - s0) * (t - t0) / (t1 - t0)
    return guidance[-1][1]


MAX_HIRES_SCALE = 4.0


class Hires(_Strict):
    """A1111's hires fix: text2img at width x height, the result upscaled by `scale` (to a multiple of 8), then an
    img2img pass of `steps` at `strength` (it runs int(steps x strength) of them, as diffusers' img2img counts)."""

    scale: float = Field(default=2.0, gt=1.0, le=MAX_HIRES_SCALE, allow_inf_nan=False)
    strength: float = Field(default=0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="the img2img pass's num_inference_steps; None: the job's own"
    )
    upscaler: Literal["latent", "lanczos"] = Field(
        default="latent",
        description="latent: the latents resized (bilinear), SD 1.5 and SDXL only; lanczos: stage 1 decoded, the "
        "image resized with PIL's LANCZOS and encoded again",
    )


class Refiner(_Strict):
    """SDXL's base + refiner ensemble: the base denoises the first `switch_at` of the schedule and hands its latents
    to `model`'s img2img pipeline, which denoises the rest (diffusers' `denoising_end` / `denoising_start`)."""

    model: str = Field(min_length=1, max_length=200, description="An SDXL model name from the worker's allowlist.")
    switch_at: float = Field(default=0.8, gt=0.0, lt=1.0, allow_inf_nan=False)


_C = TypeVar("_C", bound=BaseModel)

Callback = Annotated[CfgCutoff | IpAdapterScaleCutoff | StepBudget | Frames, Field(discriminator="type")]


class RenderSpec(_Strict):
    """One image-generation job."""

    spec_version: Literal[1] = SPEC_VERSION
    model: str = Field(min_length=1, max_length=200, description="A model name from the worker's allowlist.")
    pipeline: PipelineKind = "text2img"
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    prompt_syntax: PromptSyntax = Field(
        default="plain",
        description="How `prompt` and `negative_prompt` are read. `plain`: as text, as diffusers reads it (CLIP "
        "encoders see at most 77 tokens). `a1111`: AUTOMATIC1111's syntax: (word:1.3) weights, (word), [word], "
        "BREAK, [from:to:when] prompt editing; long prompts reach the encoders whole (docs/spec.md: Prompt syntax).",
    )
    num_inference_steps: int = Field(default=30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0, allow_inf_nan=False)
    guidance: Guidance | None = Field(
        default=None,
        description="A guidance curve that replaces guidance_scale, step by step: {from, to, curve: linear|cosine} "
        "or a list of [t, scale] points, t from 0 (the first step) to 1 (the last) (docs/spec.md: Guidance curves).",
    )
    true_cfg_scale: float = Field(
        default=1.0,
        ge=1.0,
        le=50.0,
        allow_inf_nan=False,
        description="Flux.1 only: classifier-free guidance by a second, negative-prompt pass (above 1; needs "
        "negative_prompt); 1 is off. Other families guide with guidance_scale.",
    )
    width: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Omit for a random seed; it is recorded.")
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    image: str | None = Field(
        default=None, description="img2img/inpaint input: s3://, file:// or data:image/...;base64,"
    )
    mask_image: str | None = Field(default=None, description="inpaint mask (white = repaint), same size as image")
    control_image: str | None = Field(default=None, description="controlnet conditioning image")
    strength: float = Field(default=0.8, gt=0.0, le=1.0, description="img2img/inpaint: how much of the image to redo")
    controlnet_conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    ip_adapter: IpAdapterOptions | None = None
    scheduler: SchedulerName = Field(
        default="default",
        description="The sampler; `default` is the checkpoint's own. SD 1.5 and SDXL take euler, euler_a, heun, "
        "dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde_karras, ddim, unipc, lcm; Flux.1 and SD3.5 take flow_euler, "
        "flow_euler_sde, dpmpp_2m, unipc, lcm (docs/spec.md: Samplers). lcm: 50 steps at most.",
    )
    clip_skip: int = Field(
        default=0,
        ge=0,
        le=MAX_CLIP_SKIP,
        description="Text-encoder layers to skip from the end, as diffusers counts (A1111's 'Clip skip' minus 1).",
    )
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    callbacks: list[Callback] = Field(default_factory=list, max_length=8)
    cache: StepCache | None = Field(
        default=None, description="A step cache (docs/spec.md: Step caches); none by default."
    )
    hires: Hires | None = Field(
        default=None,
        description="A hires-fix pass after text2img: upscale by `scale`, then img2img at `strength` "
        "(docs/spec.md: Stages: hires fix and refiner). text2img only.",
    )
    refiner: Refiner | None = Field(
        default=None,
        description="SDXL only: a refiner model denoises the last (1 - switch_at) of the schedule "
        "(docs/spec.md: Stages: hires fix and refiner). text2img only.",
    )
    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="http(s) URL the worker POSTs the signed manifest to when the job ends in any final state.",
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0.0,
        le=MAX_DEADLINE_SECONDS,
        allow_inf_nan=False,
        description="Seconds from submit within which a worker must start the job; one that has not started by then "
        "ends `expired` without rendering (docs/spec.md: Deadlines). None: no deadline.",
    )

    @field_validator("webhook")
    @classmethod
    def _webhook_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host; got {value[:80]!r}")
        if parsed.username is not None or parsed.password is not None:
            raise ValueError("must not hold a user or password (receivers verify the X-Render-Signature instead)")
        return value

    @field_validator("image", "mask_image", "control_image")
    @classmethod
    def _image_reference(cls, value: str | None) -> str | None:
        return None if value is None else check_image_ref(value)

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number between 0 and 50; got {value}")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain some text, not only whitespace")
        return value

    @model_validator(mode="after")
    def _prompt_syntax(self) -> RenderSpec:
        if self.prompt_syntax == "a1111":
            from producer import prompt_syntax

            prompt_syntax.check(self.prompt, field="prompt")
            if self.negative_prompt:
                prompt_syntax.check(self.negative_prompt, field="negative_prompt")
        return self

    @field_validator("guidance")
    @classmethod
    def _points_in_order(cls, value: Guidance | None) -> Guidance | None:
        if isinstance(value, list):
            for i, ((t0, _), (t1, _)) in enumerate(zip(value, value[1:], strict=False)):
                if t1 <= t0:
                    raise ValueError(
                        f"point {i + 1} is at t={t1:g}, not after point {i}'s t={t0:g}; list the points in "
                        "increasing t (0: the first step, 1: the last)"
                    )
        return value

    @property
    def first_guidance_scale(self) -> float:
        """The guidance scale the pipeline starts with: the curve's first step's, or `guidance_scale`."""
        if self.guidance is None:
            return self.guidance_scale
        return guidance_at(self.guidance, 0, self.denoising_steps)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(
                f"must be a multiple of 8 (the VAE downsamples by 8); got {value}, try {round(value / 8) * 8}"
            )
        return value

    @property
    def denoising_steps(self) -> int:
        """Steps the pipeline really runs: img2img and inpaint skip the first (1 - strength) of them."""
        if self.pipeline in ("img2img", "inpaint"):
            return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)
        return self.num_inference_steps

    @model_validator(mode="after")
    def _inputs_fit_the_pipeline(self) -> RenderSpec:
        given = {name for name in IMAGE_FIELDS if getattr(self, name) is not None}
        needs = NEEDS[self.pipeline]
        if missing := sorted(needs - given):
            raise ValueError(f"{missing[0]}: pipeline {self.pipeline!r} needs it; give an s3://, file:// or data: URL")
        if extra := sorted(given - needs):
            raise ValueError(f"{extra[0]}: pipeline {self.pipeline!r} does not use it; remove it or change pipeline")
        if self.denoising_steps < 1:
            raise ValueError(
                f"strength: {self.strength} x num_inference_steps {self.num_inference_steps} leaves no step to run; "
                "raise either"
            )
        return self

    @model_validator(mode="after")
    def _steps_fit_the_sampler(self) -> RenderSpec:
        most = SCHEDULER_MAX_STEPS.get(self.scheduler, MAX_STEPS)
        if self.num_inference_steps > most:
            raise ValueError(
                f"num_inference_steps must be at most {most} with scheduler {self.scheduler!r}; "
                f"got {self.num_inference_steps}"
            )
        return self

    @model_validator(mode="after")
    def _loras_once_each(self) -> RenderSpec:
        seen: set[str] = set()
        for i, lora in enumerate(self.loras):
            if lora.name in seen:
                raise ValueError(f"loras[{i}].name: {lora.name!r} is listed twice; give each LoRA once, with one scale")
            seen.add(lora.name)
        return self

    @model_validator(mode="after")
    def _callbacks_fit(self) -> RenderSpec:
        seen: set[str] = set()
        for i, cb in enumerate(self.callbacks):
            if cb.type in seen:
                raise ValueError(f"callbacks[{i}]: only one {cb.type} callback is allowed per job")
            seen.add(cb.type)
            if isinstance(cb, IpAdapterScaleCutoff) and self.ip_adapter is None:
                raise ValueError(f"callbacks[{i}]: ip_adapter_scale_cutoff needs ip_adapter (an image and a scale)")
            if isinstance(cb, CfgCutoff | IpAdapterScaleCutoff) and cb.step_index is not None:
                if cb.step_index >= self.denoising_steps:
                    what = (
                        f"num_inference_steps ({self.num_inference_steps})"
                        if self.denoising_steps == self.num_inference_steps
                        else f"the {self.denoising_steps} steps {self.pipeline} runs (num_inference_steps x strength)"
                    )
                    raise ValueError(f"callbacks[{i}].step_index must be less than {what}; got {cb.step_index}")
            if isinstance(cb, Frames) and cb.every > self.num_inference_steps:
                raise ValueError(
                    f"callbacks[{i}].every must be at most num_inference_steps ({self.num_inference_steps}), "
                    f"or no frame would be made; got {cb.every}"
                )
        return self

    @model_validator(mode="after")
    def _stages_fit(self) -> RenderSpec:
        if self.hires is not None and self.refiner is not None:
            raise ValueError("hires, refiner: a job takes one second stage, not both; remove hires or refiner")
        for name, stage in (("hires", self.hires), ("refiner", self.refiner)):
            if stage is None:
                continue
            if self.pipeline != "text2img":
                raise ValueError(f"{name}: runs after a text2img stage only; remove it or send pipeline 'text2img'")
            if self.ip_adapter is not None:
                raise ValueError(f"{name}: not with ip_adapter in this worker; remove one of them")
            if self.cache is not None:
                raise ValueError(f"{name}: not with a step cache (cache); remove one of them")
        if self.hires is not None:
            width, height = self.hires_size
            if max(width, height) > MAX_SIDE:
                most = MAX_SIDE / max(self.width, self.height)
                raise ValueError(
                    f"hires.scale: {self.hires.scale:g} makes {width}x{height}, over {MAX_SIDE} a side; "
                    f"use a scale of at most {most:.3g}"
                )
            if self.hires_steps < 1:
                steps = self.hires.steps or self.num_inference_steps
                raise ValueError(
                    f"hires.strength: {self.hires.strength:g} x hires.steps {steps} runs no step "
                    "(int(steps x strength) is 0); raise either"
                )
        return self

    @property
    def hires_size(self) -> tuple[int, int]:
        """The hires pass's (width, height): the base size times `hires.scale`, each to the nearest multiple of 8."""
        assert self.hires is not None
        return round(self.width * self.hires.scale / 8) * 8, round(self.height * self.hires.scale / 8) * 8

    @property
    def hires_steps(self) -> int:
        """Steps the hires pass really runs: int(steps x strength), as diffusers' img2img counts them."""
        assert self.hires is not None
        steps = self.hires.steps or self.num_inference_steps
        return min(int(steps * self.hires.strength), steps)

    def callback(self, kind: type[_C]) -> _C | None:
        """The callback of this class in the spec, if any."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    @classmethod
    def parse(cls, data: str | bytes | dict[str, Any]) -> RenderSpec:
        """Validate JSON text or a dict; raise `SpecError` naming every bad field."""
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise SpecError.from_validation(exc) from None


def json_schema() -> str:
    """The spec's JSON Schema, as `render schema` prints it."""
    return json.dumps(RenderSpec.model_json_schema(), indent=2)
