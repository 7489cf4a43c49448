"""The light client side of the render farm: the render spec, the manifest, keys and errors.

Importing this package never imports torch, diffusers or the worker.
"""

from __future__ import annotations

from producer.errors import (
    ConfigError,
    FarmUnavailable,
    IdempotencyConflict,
    ModelError,
    ModelLoadError,
    NoWorkerForModel,
    QueueFull,
    QuotaExceeded,
    RenderError,
    RenderFailed,
    SpecError,
    StorageError,
    StorageUnavailable,
    UnknownTenant,
    UnsupportedSpecError,
    WaitTimeout,
)
from producer.manifest import Manifest, RenderStatus, Timings
from producer.spec import CfgCutoff, Frames, IpAdapterScaleCutoff, RenderSpec, StepBudget, json_schema

__all__ = [
    "CfgCutoff",
    "ConfigError",
    "FarmUnavailable",
    "IdempotencyConflict",
    "Frames",
    "IpAdapterScaleCutoff",
    "Manifest",
    "ModelError",
    "ModelLoadError",
    "NoWorkerForModel",
    "QueueFull",
    "QuotaExceeded",
    "RenderError",
    "RenderFailed",
    "RenderSpec",
    "RenderStatus",
    "SpecError",
    "StepBudget",
    "StorageError",
    "StorageUnavailable",
    "Timings",
    "UnknownTenant",
    "UnsupportedSpecError",
    "WaitTimeout",
    "json_schema",
]
