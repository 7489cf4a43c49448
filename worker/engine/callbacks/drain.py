"""The step hook of a draining worker (`worker.engine.drain`): a job that will not finish in time leaves at a step's
end."""

from __future__ import annotations

from worker.engine.callbacks.checkpoint import CheckpointCallback
from worker.engine.drain import Drain
from worker.engine.stops import HandedOff
from worker.hooks import StepInfo


class DrainHook:
    """A step hook: once the job must leave, ask its checkpoint callback to checkpoint at this step's end and hand
    it off there (`checkpoint.hand_off`); a job without one (a batch member) is handed off at once."""

    def __init__(self, drain: Drain, checkpoint: CheckpointCallback | None = None) -> None:
        self.drain = drain
        self.checkpoint = checkpoint

    def on_step(self, info: StepInfo) -> None:
        if not self.drain.leaves(info):
            return
        if self.checkpoint is not None and self.checkpoint.bound:
            self.checkpoint.hand_off = True
        else:
            raise HandedOff(info.steps_completed)
