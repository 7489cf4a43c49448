"""The GPU worker: pipelines, step callbacks, storage and `render()`.

Public names are imported lazily, so `render schema` and the producer-side commands start
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelRegistry": "worker.models.registry",
    "WorkerSettings": "worker.settings",
    "render": "worker.engine.rendering",
    "JobContext": "worker.engine.job",
    "StepHook": "worker.hooks",
    "StepInfo": "worker.hooks",
    "Storage": "worker.storage",
    "open_storage": "worker.storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
