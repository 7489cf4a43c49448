"""Worker settings, read from `RENDER_*` environment variables once, in the entrypoint, and passed down."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import NoDecode, SettingsConfigDict

from producer.settings import ClientSettings, ListSetting, load
from producer.spec import LORA_NAME_PATTERN
from producer.tenants import TenantConfig, parse_tenants

Family = Literal["sd15", "sdxl", "sd3", "flux", "qwen-image", "z-image", "flux2", "chroma"]
"""The model families this worker runs (`worker.models.families`)."""
TINY = "tiny"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
"""A hub id (`owner/name`), as RENDER_MODELS may name a model already in the local cache."""
_S3_ROOT = re.compile(r"s3://[a-zA-Z0-9._-]{1,255}(/(?!\.\.?(/|$))[^/]+)*/?")
"""An s3:// entry of RENDER_INPUT_ROOTS: a bucket, then a prefix without empty, '.' or '..' segments."""


class ModelSource(BaseModel):
    """Where a model comes from: `tiny`, a diffusers directory, a cached hub id, or one file with its `base`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family = Field(
        description='"sd15", "sdxl", "sd3", "flux", "qwen-image", "z-image", "flux2" or "chroma": which loading code '
        "and which specs apply"
    )
    source: str | None = Field(
        default=None,
        min_length=1,
        description='"tiny" (built in; also "tiny-schnell" for flux, "tiny-turbo" for z-image, "tiny-distilled" for '
        "flux2), a local diffusers directory, or a hub id already in the local cache (nothing is downloaded); "
        "or leave it out and give `file`",
    )
    file: str | None = Field(
        default=None,
        min_length=1,
        description="one checkpoint file instead of a directory: a `.safetensors` file as model sites ship it (a "
        "whole SD 1.5/SDXL/SD3.5/Flux.1/Chroma/Z-Image checkpoint in its original layout, or the transformer/UNet "
        "alone, original or diffusers keys, fp8 included), or a `.gguf` quantized transformer; needs `base`",
    )
    base: str | None = Field(
        default=None,
        min_length=1,
        description="with `file`: the local diffusers directory (or a hub id in the local cache) of the family's "
        "reference model; its configs and tokenizers are used, and the components the file does not hold",
    )
    controlnet: str | None = Field(default=None, description="ControlNet directory or hub id (tiny models build one)")
    ip_adapter: str | None = Field(default=None, description="IP-Adapter weights file (.safetensors or .bin)")
    image_encoder: str | None = Field(default=None, description="CLIP vision encoder directory for the IP-Adapter")
    compile: Literal["off", "regional", "full"] = Field(
        default="off",
        description="torch.compile the model's transformer or UNet when it loads: `regional` compiles its repeated "
        "blocks once each (diffusers' compile_repeated_blocks; the whole model where it has none), `full` the whole "
        "model; with RENDER_COMPILE_CACHE on a shared volume only the first worker pays the compile",
    )
    warmup_size: int = Field(
        default=1024, ge=64, le=4096, description="the side of the warm-up render a compiled model makes when it loads"
    )

    @model_validator(mode="after")
    def _source_or_file(self) -> ModelSource:
        if (self.source is None) == (self.file is None):
            raise PydanticCustomError(
                "model_source",
                'give either "source" (tiny, a diffusers directory, a cached hub id) or "file" (with "base"), not both',
            )
        if self.base is not None and self.file is None:
            raise PydanticCustomError("model_base", '"base" goes with "file"; a "source" directory needs none')
        return self

    @property
    def tiny(self) -> bool:
        """Whether it is a built-in tiny model (`tiny`, or a family's named variant such as `tiny-schnell`)."""
        return self.source is not None and is_tiny(self.source)

    @property
    def where(self) -> str:
        """The file or the source, for messages and listings."""
        return self.file or self.source or ""

    @property
    def kind(self) -> Literal["tiny", "directory", "hub", "file", "gguf"]:
        """How the model is held: built in, a diffusers directory, a cached hub id, a single file or a GGUF file."""
        if self.file is not None:
            return "gguf" if self.file.lower().endswith(".gguf") else "file"
        if self.tiny:
            return "tiny"
        return (
            "hub" if self.source and HUB_ID.fullmatch(self.source) and not os.path.exists(self.source) else "directory"
        )


def is_tiny(source: str) -> bool:
    """Whether a model source names a built-in tiny model rather than files."""
    return source == TINY or source.startswith(f"{TINY}-")


def default_models() -> dict[str, ModelSource]:
    return {
        "tiny-sd15": ModelSource(family="sd15", source=TINY),
        "tiny-sdxl": ModelSource(family="sdxl", source=TINY),
        "tiny-sdxl-refiner": ModelSource(family="sdxl", source=f"{TINY}-refiner"),
        "tiny-sd3": ModelSource(family="sd3", source=TINY),
        "tiny-flux": ModelSource(family="flux", source=TINY),
        "tiny-flux-schnell": ModelSource(family="flux", source=f"{TINY}-schnell"),
        "tiny-qwen-image": ModelSource(family="qwen-image", source=TINY),
        "tiny-z-image": ModelSource(family="z-image", source=TINY),
        "tiny-z-image-turbo": ModelSource(family="z-image", source=f"{TINY}-turbo"),
        "tiny-flux2": ModelSource(family="flux2", source=TINY),
        "tiny-flux2-distilled": ModelSource(family="flux2", source=f"{TINY}-distilled"),
        "tiny-chroma": ModelSource(family="chroma", source=TINY),
    }


class LoraSource(BaseModel):
    """An allowlisted LoRA: a `.safetensors` file (diffusers or kohya format) for one family, or `tiny` (built in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family | None = Field(
        default=None,
        description='the family of the models it applies to ("sd15", "sdxl", "flux", ...: any in RENDER_MODELS, from '
        'a directory or a single file alike); required for a file, unset for "tiny"',
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
            raise PydanticCustomError(
                "lora_family", 'a LoRA file needs "family": the family of its models ("sd15", "sdxl", "flux", ...)'
            )
        return self


def default_loras() -> dict[str, LoraSource]:
    return {"tiny-lora": LoraSource(path=TINY)}


class WorkerSettings(ClientSettings):
    """Everything a worker process reads from its environment (prefix `RENDER_`), the client's settings included."""

    model_config = SettingsConfigDict(env_prefix="RENDER_", extra="ignore")

    storage_url: str = Field(
        default="file://./render-output",
        description="`file:///dir` or `s3://bucket/prefix` (no `..` segments, no credentials)",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 API endpoint: MinIO, R2, moto, ...; unset for AWS"
    )
    compile_cache: str | None = Field(
        default=None,
        description="directory for torch.compile's inductor cache (TORCHINDUCTOR_CACHE_DIR), on a volume the fleet "
        "shares, so a model compiled once loads warm on every worker; unset: inductor's own per-machine default",
    )
    models: dict[str, ModelSource] = Field(
        default_factory=default_models,
        description='model allowlist as JSON: `{"sd15": {"family": "sd15", "source": "/models/sd15"}}`; `source` is '
        "`tiny`, a local diffusers directory, or a hub id already in the local cache (nothing is downloaded); or "
        '`"file"` (one `.safetensors` or `.gguf` checkpoint) with `"base"` (its family\'s reference diffusers '
        "directory): docs/models.md. "
        "Optional per model: `controlnet` (directory or cached hub id), `ip_adapter` (weights file, `.safetensors` "
        "or `.bin`) with `image_encoder` (CLIP vision directory); the keys are below",
    )
    hash_cache: str | None = Field(
        default=None,
        description="the file `render models` keeps model files' sha256 in (by path, size and mtime), so a second "
        "listing reads no weights; unset: `$XDG_CACHE_HOME/render-farm/sha256.json`, else "
        "`~/.cache/render-farm/sha256.json`",
    )
    device: str = Field(default="auto", description="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="`auto`: float16 on CUDA, float32 on CPU"
    )
    max_cached_models: int = Field(default=1, ge=1, le=8, description="pipelines kept loaded per process")
    loras: dict[str, LoraSource] = Field(
        default_factory=default_loras,
        description='LoRA allowlist as JSON: `{"my-style": {"family": "sd15", "path": "/loras/my-style.safetensors"}}`'
        "; `.safetensors` only (a pickled `.bin`/`.ckpt` can run code when loaded), diffusers or kohya format; "
        'names are what specs write in `loras[].name`. `{"path": "tiny"}` is the tiny models\' built-in LoRA',
    )
    max_cached_loras: int = Field(
        default=8,
        ge=1,
        le=64,
        description="LoRAs kept loaded (unfused, on the GPU) per model, least recently used evicted first; lower it "
        "for large SDXL LoRAs on a tight card",
    )
    storage_retry_seconds: float = Field(
        default=120.0,
        ge=0.0,
        description="seconds an unreachable or failing (5xx, throttling) S3 endpoint is retried, with backoff from "
        "0.5 s doubling to 15 s, before the job fails; the rendered images wait in memory meanwhile",
    )
    frame_upload_threads: int = Field(default=2, ge=1, le=16, description="threads encoding and uploading frames")
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC key webhooks are signed with (X-Render-Signature); none are sent without it"
    )
    webhook_attempts: int = Field(default=5, ge=1, le=20, description="tries per webhook before it is marked failed")
    webhook_backoff_seconds: float = Field(
        default=2.0, gt=0.0, le=3600.0, description="wait before the second try; doubles after each failure"
    )
    webhook_timeout: float = Field(
        default=10.0,
        gt=0.0,
        le=120.0,
        description="seconds one webhook attempt may take in all: name lookup, connection, request and the whole "
        "answer, however slowly it trickles",
    )
    input_roots: ListSetting = Field(
        default_factory=list,
        description="where input images may come from: directories for `file://` inputs and `s3://bucket/prefix/` "
        "entries for `s3://` inputs (with no `s3://` entry, any bucket the worker's credentials can read); a JSON "
        "list or the comma form (`/srv/inputs, s3://uploads/renders/`)",
    )
    max_input_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="cap on one input image's bytes (10 MiB); an oversized file or S3 object is refused on its size "
        "(S3: a HEAD) before it is read, and no read goes past the cap",
    )
    max_input_pixels: int = Field(
        default=4096 * 4096, ge=64 * 64, description="cap on one input image's pixels (4096²)"
    )
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="Prometheus /metrics port; unset: off")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch CPU threads per worker (unset: torch's default); on a host with several workers, cores ÷ "
        "workers (oversubscribed, 2 CPU workers did 3–4× less work than 1; see docs/benchmarks.md)",
    )

    max_batch: int = Field(
        default=1,
        ge=1,
        le=64,
        description="images one UNet call may take from compatible jobs in hand (micro-batching, see "
        "docs/operations.md); 1: each job runs alone",
    )
    prefetch: int = Field(
        default=1,
        ge=0,
        le=64,
        description="jobs a worker holds beyond one call's RENDER_MAX_BATCH: they fetch their inputs while the GPU "
        "runs, and the GPU takes the next at once while the last one encodes and uploads. 0: one job in hand at a "
        "time (no overlap)",
    )
    task_time_limit: int = Field(
        default=3600,
        ge=10,
        description="hard limit per job, seconds, counted from when the worker takes it (time waiting for the GPU "
        "included): the job stops at its next step and ends failed; a call stuck outside the steps for this long "
        "plus 60 s ends the worker process (recovery moves its jobs)",
    )
    visibility_timeout: int = Field(
        default=4 * 3600,
        ge=20,
        description="seconds before Redis redelivers an unacknowledged job; must exceed RENDER_TASK_TIME_LIMIT by "
        "more than 60 s (checked at start)",
    )
    lease_ttl: float = Field(default=30.0, gt=0.5, description="seconds a running job's lease lives unrenewed")
    recovery_interval: float = Field(
        default=10.0, gt=0.0, description="seconds between scans for jobs whose worker died"
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="worker deaths one job may cause (its lease lapsed while its worker's GPU had it: OOM kill, "
        'crash, lost machine) before it ends failed ("its worker died 3 times during this job") instead of being '
        "sent again; the jobs a dead worker only held, waiting, and drain hand-offs on SIGTERM are not deaths. Also "
        "the attempts a job's model may fail to load (each worker it fails on withdraws the model and hands the job "
        "on) before the job fails with the cause",
    )
    progress_interval: float = Field(
        default=1.0,
        ge=0.0,
        description="minimum seconds between a job's progress reports (the last step is always reported); each "
        "costs Redis about 7 commands, the larger part of a worker's load (docs/operations.md)",
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
        description="seconds of denoising between a job's checkpoints (latents, sampler state, generators), stored "
        "next to its images; a job delivered again (recovery after a crash) resumes from its last one and makes the "
        "same image bytes (docs/operations.md). 0: off",
    )
    drain_seconds: float = Field(
        default=20.0,
        ge=0.0,
        description="on SIGTERM, a job on the GPU that will not finish within this many seconds (at its pace so far) "
        "checkpoints at its next step and goes back to its queue; jobs waiting for the GPU go back at once. Keep the "
        "grace period at least this plus 30 s",
    )
    heartbeat_interval: float = Field(
        default=5.0,
        gt=0.0,
        description="seconds between a worker's heartbeats (`render workers`, and the check `submit` makes that a "
        "live worker serves the model)",
    )
    switch_after_seconds: float = Field(
        default=60.0,
        gt=0.0,
        description="a worker prefers jobs for the model it has loaded (and higher priorities) until another job it "
        "serves has waited this long; the bound on unfairness (docs/cli.md, Many models, priorities)",
    )

    tenants: Annotated[dict[str, TenantConfig], NoDecode, BeforeValidator(parse_tenants)] = Field(
        default_factory=dict,
        description='the farm\'s tenants, as JSON: `{"team-a": {"weight": 2, "max_queued": 1000, "max_gpus": 4, '
        '"deadline_seconds": 3600}}`; published to Redis at start (set it alike on every worker); `default` is '
        "always one (docs/tenants.md)",
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
