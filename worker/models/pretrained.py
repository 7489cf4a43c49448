"""Real checkpoints: `from_pretrained` on an allowlisted directory or hub id, never over the network."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.logging import disable_progress_bar

from producer.errors import ModelError
from worker.settings import Family

_CLASSES: dict[Family, Any] = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}


def load(family: Family, source: str, dtype: torch.dtype) -> Any:
    disable_progress_bar()  # loading bars in a worker's log are noise; the load time is in the manifest
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return _CLASSES[family].from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not load {family} model from {source!r}: {exc}. "
            "Point RENDER_MODELS at a local diffusers directory or a hub id already in the local cache."
        ) from exc
