"""The model families this worker runs, by the name `RENDER_MODELS` gives them (`"family"`).

Each family is a module of this package that defines `FAMILY`, its `ModelFamily` (SD 1.5 and SDXL share `sd`).
"""

from __future__ import annotations

import importlib

from worker.models.families.base import Kind, ModelFamily, ModelOff
from worker.models.families.flux import FluxFamily
from worker.models.families.sd import SD15Family, SDXLFamily
from worker.models.families.sd3 import SD3Family

_MODULES = ("qwen_image", "z_image", "flux2", "chroma")
"""The newer families, one module each, imported when present (each is being added with its tests)."""


def _families() -> dict[str, ModelFamily]:
    found: list[ModelFamily] = [SD15Family(), SDXLFamily(), SD3Family(), FluxFamily()]
    for name in _MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        found.append(module.FAMILY)
    return {family.name: family for family in found}


FAMILIES: dict[str, ModelFamily] = _families()


def family_named(name: str) -> ModelFamily:
    """The family called `name` (a `ModelSource.family`, validated by the settings)."""
    return FAMILIES[name]


def family_of(pipeline_class: str) -> ModelFamily | None:
    """The family whose models a `model_index.json` naming `pipeline_class` holds, if any."""
    return next((each for each in FAMILIES.values() if each.holds(pipeline_class)), None)


__all__ = ["FAMILIES", "Kind", "ModelFamily", "ModelOff", "family_named", "family_of"]
