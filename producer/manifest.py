"""The manifest: what a finished job left in storage, written last, next to its images."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RenderStatus = Literal["succeeded", "interrupted", "revoked", "failed", "expired"]
InterruptedBy = Literal["max_steps", "max_seconds"]


class Timings(BaseModel):
    """Seconds spent in each phase; None where the phase did not run."""

    model_config = ConfigDict(extra="forbid")

    queue_wait: float | None = None
    load: float | None = None
    denoise: float | None = None
    decode: float | None = None
    upload: float | None = None
    revoke_to_stop: float | None = None


class SchedulerRecord(BaseModel):
    """The sampler a job ran with: its spec name, A1111's label for it, the diffusers class and its options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    label: str
    diffusers_class: str
    options: dict[str, Any] = Field(default_factory=dict)


class LoraRecord(BaseModel):
    """A LoRA a job ran with: its allowlisted name, the scale, and the sha256 of its weights file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float
    sha256: str


StageName = Literal["base", "hires", "refiner"]


class StageRecord(BaseModel):
    """One stage of a job with a second stage (hires fix, refiner): its sampler steps and seconds."""

    model_config = ConfigDict(extra="forbid")

    name: StageName
    steps_planned: int
    steps_completed: int = 0
    denoise: float | None = None  # seconds to its last step's end; None where it did not run
    decode: float | None = None  # seconds of the VAE decode that ended it; None where none did


class Manifest(BaseModel):
    """The record of one job: status, what was planned and done, where the files are."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    # the tenant the job belongs to (its id's `<tenant>@`, producer.keys.tenant_of); manifests from before tenants
    # have none and were all the default tenant's
    tenant: str = "default"
    status: RenderStatus
    steps_planned: int
    steps_completed: int
    interrupted_by: InterruptedBy | None = None
    images: list[str] = Field(default_factory=list)
    frames: list[str] = Field(default_factory=list)
    spec: dict[str, Any]
    seed: int
    family: str | None = None  # the model's family (sd15, sdxl, sd3, flux); None when no model was looked up
    scheduler: SchedulerRecord | None = None  # None when no step ran (revoked before it started)
    clip_skip: int = 0
    loras: list[LoraRecord] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    worker: str
    attempt: int = 1
    versions: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    steps_after_revoke: int | None = None
    batched_with: list[str] = Field(default_factory=list)  # the other jobs that shared this job's UNet calls
    resumed_from_step: int | None = None  # the checkpoint's step this attempt started from; None: from the start
    # How many of the prompt's tokens each text encoder saw (an `a1111` prompt's longest span; a `plain` prompt as
    # diffusers cuts it); None where no CLIP or T5 encoder read it
    prompt_tokens: dict[str, int] | None = None
    # What a job should know that did not stop it, e.g. a `plain` prompt longer than a text encoder takes
    warnings: list[str] = Field(default_factory=list)
    # jobs with a hires or refiner stage: each stage's steps and times (the job's steps are their sums); [] otherwise
    stages: list[StageRecord] = Field(default_factory=list)
    started_at: str
    finished_at: str
