"""Worker settings, read from `RENDER_*` environment variables once, in the entrypoint, and passed down."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from producer.errors import ConfigError

Family = Literal["sd15", "sdxl"]
TINY = "tiny"


class ModelSource(BaseModel):
    """Where an allowlisted model comes from: `tiny` (built in), a local directory, or a hub id in the local cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family
    source: str = Field(min_length=1)


def default_models() -> dict[str, ModelSource]:
    return {
        "tiny-sd15": ModelSource(family="sd15", source=TINY),
        "tiny-sdxl": ModelSource(family="sdxl", source=TINY),
    }


class WorkerSettings(BaseSettings):
    """Everything a worker process reads from its environment (prefix `RENDER_`)."""

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
    frame_upload_threads: int = Field(default=2, ge=1, le=16)


def load_settings() -> WorkerSettings:
    """Read the settings, turning any bad `RENDER_*` value into one `ConfigError` sentence."""
    try:
        return WorkerSettings()
    except SettingsError as exc:
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"RENDER_{match.group(1).upper()}" if match else "a RENDER_* variable"
        raise ConfigError(f"{name} is not valid JSON; see the configuration table in the README") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            field, *rest = (str(part) for part in err["loc"])
            where = f"RENDER_{field.upper()}" + (f" ({'.'.join(rest)})" if rest else "")
            problems.append(f"{where}: {err['msg']}; got {err.get('input')!r}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None
