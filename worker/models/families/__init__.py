"""The model families this worker runs, by the name `RENDER_MODELS` gives them (`"family"`)."""

from __future__ import annotations

from worker.models.families.base import Kind, ModelFamily, ModelOff
from worker.models.families.flux import FluxFamily
from worker.models.families.sd import SD15Family, SDXLFamily
from worker.models.families.sd3 import SD3Family

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (SD15Family(), SDXLFamily(), SD3Family(), FluxFamily())
}


def family_named(name: str) -> ModelFamily:
    """The family called `name` (a `ModelSource.family`, validated by the settings)."""
    return FAMILIES[name]


def family_of(pipeline_class: str) -> ModelFamily | None:
    """The family whose models a `model_index.json` naming `pipeline_class` holds, if any."""
    return next((each for each in FAMILIES.values() if each.holds(pipeline_class)), None)


__all__ = ["FAMILIES", "Kind", "ModelFamily", "ModelOff", "family_named", "family_of"]
