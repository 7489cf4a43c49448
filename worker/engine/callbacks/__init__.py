"""Step callbacks built from a render spec, in diffusers' own `PipelineCallback` shape."""

from __future__ import annotations

from worker.engine.callbacks.budget import StepBudgetCallback
from worker.engine.callbacks.build import CallbackStack, Checkpointing, build_callbacks
from worker.engine.callbacks.control import StepControlCallback
from worker.engine.callbacks.frames import FramesCallback, FrameWriter
from worker.hooks import StepHook, StepInfo
from worker.models.families.guidance import BatchSafeSDCFGCutoffCallback, BatchSafeSDXLCFGCutoffCallback

__all__ = [
    "BatchSafeSDCFGCutoffCallback",
    "BatchSafeSDXLCFGCutoffCallback",
    "CallbackStack",
    "Checkpointing",
    "FrameWriter",
    "FramesCallback",
    "StepBudgetCallback",
    "StepControlCallback",
    "StepHook",
    "StepInfo",
    "build_callbacks",
]
