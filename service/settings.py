"""`ServiceSettings`: what `render serve` reads (`RENDER_*`): the client's settings, the API keys, storage, limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.keys import DEFAULT_TENANT, tenant_name
from producer.settings import ClientSettings

Scope = Literal["full", "read"]


class ApiKey(BaseModel):
    """One configured key: its argon2id hash (never the key itself) and what it may do."""

    model_config = ConfigDict(extra="forbid")

    hash: str = Field(description="the key's argon2id hash, as `render api-key` prints it")
    scope: Scope = Field(default="full", description="`full` (submit, cancel, read) or `read` (status, events, files)")
    tenant: str = Field(
        default=DEFAULT_TENANT,
        description="the tenant the key acts as: it submits that tenant's jobs and reads only those; `default` "
        "(the farm operator's) reads every tenant's jobs",
    )

    _tenant_name = field_validator("tenant")(tenant_name)  # the error names RENDER_API_KEYS (<name>.tenant)


class ServiceSettings(ClientSettings):
    """Settings of the HTTP job API (`render serve`), read from `RENDER_*` in its entrypoint."""

    api_keys: dict[str, ApiKey] = Field(
        default_factory=dict,
        description='API keys by name, as JSON: `{"ci": {"hash": "$argon2id$...", "scope": "full", "tenant": '
        '"team-a"}}` (`render api-key NAME [--tenant T]` prints an entry); none: the service binds to loopback only, '
        "asks for no key and acts as RENDER_TENANT (`default` unless set)",
    )
    storage_url: str = Field(
        default="file://./render-output",
        description="the workers' storage (`file:///dir` or `s3://bucket/prefix`): file links are signed for S3, "
        "served by the service for file://",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 API endpoint: MinIO, R2, moto, ...; unset for AWS"
    )
    api_max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="largest request body the HTTP API accepts (413 above it)"
    )
    signed_url_seconds: int = Field(
        default=3600, ge=1, le=7 * 24 * 3600, description="seconds a presigned S3 file link stays valid"
    )
