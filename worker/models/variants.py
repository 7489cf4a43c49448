"""The other pipelines of a model (img2img, inpaint, ControlNet), built from its text-to-image pipeline by its family.

`from_pipe` shares the loaded components, so a variant costs no second copy of the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from producer.errors import ModelError, UnsupportedSpecError
from worker.models.families import family_named
from worker.settings import ModelSource


def controlnet_for(source: ModelSource, base: Any, dtype: torch.dtype) -> Any:
    family = family_named(source.family)
    if source.tiny:
        return family.tiny_controlnet(base).to(base.device, dtype)
    if source.controlnet is None:
        raise UnsupportedSpecError(
            "pipeline: 'controlnet' needs a ControlNet for this model; add \"controlnet\": <dir or hub id> to its "
            "RENDER_MODELS entry"
        )
    try:
        return family.controlnet_class.from_pretrained(source.controlnet, dtype=dtype, local_files_only=True).to(
            base.device
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the ControlNet {source.controlnet!r}: {exc}") from exc


def variant(base: Any, kind: str, source: ModelSource, dtype: torch.dtype) -> Any:
    """`base` itself for text2img, else the `kind` pipeline sharing its components."""
    if kind == "text2img":
        return base
    extra = {"controlnet": controlnet_for(source, base, dtype)} if kind == "controlnet" else {}
    return family_named(source.family).variant(base, kind, extra)
