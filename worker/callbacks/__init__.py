"""Step callbacks built from a render spec, in diffusers' own `PipelineCallback` shape."""

from __future__ import annotations

from worker.callbacks.budget import StepBudgetCallback
from worker.callbacks.build import CallbackStack, build_callbacks
from worker.callbacks.cfg import BatchSafeSDCFGCutoffCallback, BatchSafeSDXLCFGCutoffCallback, cfg_cutoff_callback
from worker.callbacks.control import StepControlCallback, StepHook, StepInfo
from worker.callbacks.frames import FramesCallback, FrameWriter

__all__ = [
    "BatchSafeSDCFGCutoffCallback",
    "BatchSafeSDXLCFGCutoffCallback",
    "CallbackStack",
    "FrameWriter",
    "FramesCallback",
    "StepBudgetCallback",
    "StepControlCallback",
    "StepHook",
    "StepInfo",
    "build_callbacks",
    "cfg_cutoff_callback",
]
