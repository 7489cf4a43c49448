"""Worker settings, read from `RENDER_*` environment variables once, in the entrypoint, and passed down."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import SettingsConfigDict

from producer.settings import ClientSettings, ListSetting, load
from producer.spec import LORA_NAME_PATTERN

Family = Literal["sd15", "sdxl"]
TINY = "tiny"
_S3_ROOT = re.compile(r"s3://[a-zA-Z0-9._-]{1,255}(/(?!\.\.?(/|$))[^/]+)*/?")
"""An s3:// entry of RENDER_INPUT_ROOTS: a bucket, then a prefix without empty, '.' or '..' segments."""


class ModelSource(BaseModel):
    """Where an allowlisted model comes from: `tiny` (built in), a local directory, or a hub id in the local cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family
    source: str = Field(min_length=1)
    controlnet: str | None = Field(default=None, description="ControlNet directory or hub id (tiny models build one)")
    ip_adapter: str | None = Field(default=None, description="IP-Adapter weights file (.safetensors or .bin)")
    image_encoder: str | None = Field(default=None, description="CLIP vision encoder directory for the IP-Adapter")


def default_models() -> dict[str, ModelSource]:
    return {
        "tiny-sd15": ModelSource(family="sd15", source=TINY),
        "tiny-sdxl": ModelSource(family="sdxl", source=TINY),
    }


class LoraSource(BaseModel):
    """An allowlisted LoRA: a `.safetensors` file (diffusers or kohya format) for one family, or `tiny` (built in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family | None = Field(
        default=None, description='"sd15" or "sdxl": the models it applies to; required for a file, unset for "tiny"'
    )
    path: str = Field(
        min_length=1,
        description='a .safetensors file, or "tiny": the built-in LoRA of the tiny models (both families), no file',
    )

    @field_validator("path")
    @classmethod
    def _safetensors_only(cls, value: str) -> str:
        # Only safetensors: a pickled .bin/.pt/.ckpt can run code when it is loaded.
        if value != TINY and not value.endswith(".safetensors"):
            raise PydanticCustomError(
                "lora_path", 'must be a .safetensors file (convert a .bin/.pt/.ckpt LoRA first) or "tiny"'
            )
        return value

    @model_validator(mode="after")
    def _family_with_a_file(self) -> LoraSource:
        if self.path != TINY and self.family is None:
            raise PydanticCustomError("lora_family", 'a LoRA file needs "family": "sd15" or "sdxl"')
        return self


def default_loras() -> dict[str, LoraSource]:
    return {"tiny-lora": LoraSource(path=TINY)}


class WorkerSettings(ClientSettings):
    """Everything a worker process reads from its environment (prefix `RENDER_`), the client's settings included."""

    model_config = SettingsConfigDict(env_prefix="RENDER_", extra="ignore")

    storage_url: str = Field(default="file://./render-output", description="s3://bucket/prefix or file:///dir")
    s3_endpoint_url: str | None = Field(default=None, description="S3 API endpoint (MinIO, R2, ...); unset for AWS")
    models: dict[str, ModelSource] = Field(
        default_factory=default_models,
        description='Model allowlist as JSON: {"name": {"family": "sd15"|"sdxl", "source": "tiny"|dir|hub id}}',
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_cached_models: int = Field(default=1, ge=1, le=8, description="pipelines kept loaded per process")
    loras: dict[str, LoraSource] = Field(
        default_factory=default_loras,
        description='LoRA allowlist as JSON: {"name": {"family": "sd15"|"sdxl", "path": "/dir/x.safetensors"}}; '
        '{"path": "tiny"} is the tiny models\' built-in LoRA',
    )
    max_cached_loras: int = Field(
        default=8, ge=1, le=64, description="LoRAs kept loaded per model, least recently used evicted first"
    )
    storage_retry_seconds: float = Field(
        default=120.0, ge=0.0, description="how long an unreachable S3 endpoint is retried before a job fails"
    )
    frame_upload_threads: int = Field(default=2, ge=1, le=16)
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC key webhooks are signed with (X-Render-Signature); none are sent without it"
    )
    webhook_attempts: int = Field(default=5, ge=1, le=20, description="tries per webhook before it is marked failed")
    webhook_backoff_seconds: float = Field(
        default=2.0, gt=0.0, le=3600.0, description="wait before the second try; doubles after each failure"
    )
    webhook_timeout: float = Field(default=10.0, gt=0.0, le=120.0, description="seconds one webhook POST may take")
    input_roots: ListSetting = Field(
        default_factory=list,
        description="where input images may come from: directories (file://) and s3://bucket/prefix/ entries (with "
        "no s3:// entry, any bucket); a JSON list or the comma form",
    )
    max_input_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="cap on one input image's bytes")
    max_input_pixels: int = Field(default=4096 * 4096, ge=64 * 64, description="cap on one input image's pixels")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="Prometheus /metrics port; unset: off")
    torch_threads: int | None = Field(
        default=None, ge=1, le=256, description="torch CPU threads per worker; cores / workers on a shared host"
    )

    max_batch: int = Field(
        default=1,
        ge=1,
        le=64,
        description="images one UNet call takes from compatible jobs in hand; 1: jobs run alone",
    )
    prefetch: int = Field(
        default=1,
        ge=0,
        le=64,
        description="jobs held beyond one call's RENDER_MAX_BATCH, loading while it runs (0: no overlap)",
    )
    task_time_limit: int = Field(
        default=3600,
        ge=10,
        description="hard limit per job from when the worker takes it, seconds; stopped at its next step (failed)",
    )
    visibility_timeout: int = Field(
        default=4 * 3600, ge=20, description="seconds before Redis redelivers an unacknowledged job; > task_time_limit"
    )
    lease_ttl: float = Field(default=30.0, gt=0.5, description="seconds a running job's lease lives unrenewed")
    recovery_interval: float = Field(default=10.0, gt=0.0, description="seconds between scans for dead jobs")
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="worker deaths a job may cause (its lease lapsed mid-run) before it ends failed instead of being "
        "sent again; drain hand-offs on SIGTERM do not count. Also the attempts whose model fails to load (each such "
        "worker withdraws the model and hands the job on) before the job fails",
    )
    progress_interval: float = Field(
        default=1.0,
        ge=0.0,
        description="minimum seconds between a job's progress reports (Redis load: docs/operations.md)",
    )
    revocation_poll_interval: float = Field(
        default=2.0,
        gt=0.0,
        le=60.0,
        description="seconds between the worker's reads of its jobs' revocation keys, the fallback for a revoke whose "
        "push it missed (a revoke normally arrives by pub/sub at once)",
    )
    checkpoint_seconds: float = Field(
        default=30.0,
        ge=0.0,
        description="seconds of denoising between a job's checkpoints (latents, sampler state), which a redelivered "
        "job resumes from; 0: off",
    )
    drain_seconds: float = Field(
        default=20.0,
        ge=0.0,
        description="on SIGTERM, a job on the GPU that will not finish within this many seconds checkpoints and goes "
        "back to its queue; jobs waiting go back at once",
    )
    heartbeat_interval: float = Field(default=5.0, gt=0.0, description="seconds between a worker's heartbeats")
    switch_after_seconds: float = Field(
        default=60.0,
        gt=0.0,
        description="a worker prefers jobs for the model it has loaded until another queued job has waited this long",
    )

    @field_validator("loras")
    @classmethod
    def _lora_names_a_spec_can_use(cls, value: dict[str, LoraSource]) -> dict[str, LoraSource]:
        for name in value:
            if not re.fullmatch(LORA_NAME_PATTERN, name):
                raise PydanticCustomError(
                    "lora_name",
                    "LoRA name '{name}' cannot be used in a spec; use letters, digits, '.', '_' and '-' "
                    "(at most 100, the first a letter or digit)",
                    {"name": name},
                )
        return value

    @field_validator("input_roots")
    @classmethod
    def _s3_roots_name_a_bucket(cls, value: list[str]) -> list[str]:
        for root in value:
            if root.startswith("s3://") and not _S3_ROOT.fullmatch(root):
                raise PydanticCustomError(
                    "input_root",
                    "'{root}' is not s3://bucket or s3://bucket/prefix/ (a bucket name, then a prefix without "
                    "empty, '.' or '..' segments)",
                    {"root": root},
                )
        return value

    @model_validator(mode="after")
    def _redelivery_after_the_time_limit(self) -> WorkerSettings:
        # With acks_late, Redis hands an unacknowledged job to another worker after the visibility timeout:
        # a job still legitimately running then would be rendered twice.
        if self.visibility_timeout <= self.task_time_limit + 60:
            raise ValueError(
                f"RENDER_VISIBILITY_TIMEOUT ({self.visibility_timeout} s) must exceed RENDER_TASK_TIME_LIMIT "
                f"({self.task_time_limit} s) by more than 60 s, or a long job is delivered twice"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_outlives_its_interval(self) -> WorkerSettings:
        # A worker whose advert expires before its next beat would blink out of the fleet between beats.
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError(
                f"RENDER_HEARTBEAT_TTL ({self.heartbeat_ttl:g} s) must exceed RENDER_HEARTBEAT_INTERVAL "
                f"({self.heartbeat_interval:g} s), or a live worker drops out of `render workers` between "
                "heartbeats; three intervals is a good TTL"
            )
        return self

    @property
    def jobs_in_hand(self) -> int:
        """Celery's thread-pool size: one thread per job a worker holds (running, waiting, or storing)."""
        return self.max_batch + self.prefetch


def load_settings() -> WorkerSettings:
    """Read the worker's settings; any bad `RENDER_*` value is one `ConfigError` sentence."""
    return load(WorkerSettings)
