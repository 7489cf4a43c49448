"""Checkpoints of a running job: what a redelivered job needs to go on from the step it reached, bit for bit.

Every `RENDER_CHECKPOINT_SECONDS` of denoising, at a sampler step's end, `CheckpointCallback` captures on the GPU
thread what the rest of the run depends on, and a `CheckpointWriter` thread serializes and stores it under the
job's prefix (`checkpoint_object`): the step never waits on storage.

- the latents after the step;
- the scheduler's state: every data attribute of the scheduler object, because each sampler keeps different
  state between steps: the step index for all; a multistep solver's history of model outputs and its order
  counters (DPM++ 2M, UniPC, which also keeps its last sample); Heun's half-step state (empty at a step's end,
  where a checkpoint is taken); the sigmas and timesteps the run was set up with;
- the state of every image's generator: ancestral and SDE samplers (Euler a, DPM++ 2M SDE, LCM) draw fresh noise
  from it at each step;
- the seed (a spec without one drew it at random), the seconds of a time budget spent, the frames stored.

What the callbacks did to the pipeline (guidance cut off and the negative half of the embeddings dropped, the
IP-Adapter's scale at 0) is not captured: a resume replays the steps before the checkpoint with the UNet off
(it returns zeros, at no cost), so each callback runs again at its own step and leaves the pipeline as it was;
then it puts back the latents, the scheduler and the generators of the checkpoint's step.
"""

from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from producer.errors import StorageError
from producer.keys import checkpoint_object
from producer.spec import RenderSpec
from worker.storage import Storage

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped whenever what a checkpoint holds changes meaning: a checkpoint of another format is ignored."""

_TENSOR = "__tensor__"


class CheckpointUnreadable(Exception):
    """Raised when stored checkpoint bytes are not a checkpoint this worker can resume from."""


class CheckpointUnsupported(Exception):
    """Raised when a scheduler holds state a checkpoint cannot capture (the job then runs without checkpoints)."""


def spec_digest(spec: RenderSpec) -> str:
    """What ties a checkpoint to its job's spec: a checkpoint of any other spec is not resumed."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


@dataclass
class Checkpoint:
    """A job's state at the end of sampler step `step` (steps completed)."""

    step: int
    latents: torch.Tensor  # on the CPU
    scheduler: dict[str, Any]
    scheduler_class: str
    generators: list[torch.Tensor]  # `get_state()` of each image's generator
    seed: int
    spec_digest: str
    budget_seconds: float | None = None  # of a time budget, spent by `step`
    frames: list[str] = field(default_factory=list)  # frames stored through `step`
    stage: int = 0  # the stage it is in (0: the first; 1: a hires or refiner stage); `step` counts over all stages


Rows = tuple[slice, int, int]
"""A batch member's rows of the call: its slice, the call's row count, and the latents' number of dimensions."""


def _capture(value: Any, where: str, rows: Rows | None) -> Any:
    if isinstance(value, torch.Tensor):
        if rows is not None and value.ndim == rows[2] and value.shape[0] == rows[1]:
            value = value[rows[0]]  # a per-row tensor of the batch (the latents' shape): this job's rows only
        return {_TENSOR: value.detach().to("cpu", copy=True), "device": str(value.device)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return type(value)(_capture(item, where, rows) for item in value)
    raise CheckpointUnsupported(f"{where} holds a {type(value).__name__}, which a checkpoint cannot capture")


def _restored(value: Any) -> Any:
    if isinstance(value, dict) and _TENSOR in value:
        return value[_TENSOR].to(value["device"])
    if isinstance(value, list | tuple):
        return type(value)(_restored(item) for item in value)
    return value


def scheduler_state(scheduler: Any, rows: Rows | None = None) -> dict[str, Any]:
    """Every data attribute of `scheduler` (its config aside), tensors copied to the CPU with their device; with
    `rows`, a batch member's rows of the per-row ones (as `worker.engine.batching` slices them when a job leaves)."""
    name = type(scheduler).__name__
    return {
        attribute: _capture(value, f"{name}.{attribute}", rows)
        for attribute, value in vars(scheduler).items()
        if attribute != "_internal_dict"
    }


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    """Put `state` (from `scheduler_state`) back on a scheduler of the same class, set up for the same run."""
    for attribute, value in state.items():
        setattr(scheduler, attribute, _restored(value))


def encode(checkpoint: Checkpoint) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **vars(checkpoint)}, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> Checkpoint:
    """A stored checkpoint; `CheckpointUnreadable` for anything else (corrupt, truncated, another format)."""
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for bytes that are not its own
        raise CheckpointUnreadable(f"not a checkpoint torch can read ({type(exc).__name__})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointUnreadable(f"checkpoint format {found!r}, this worker reads {FORMAT}")
    raw.pop("format")
    try:
        checkpoint = Checkpoint(**raw)
    except TypeError as exc:
        raise CheckpointUnreadable(f"checkpoint fields do not match: {exc}") from exc
    if not isinstance(checkpoint.latents, torch.Tensor) or not all(
        isinstance(state, torch.Tensor) for state in checkpoint.generators
    ):
        raise CheckpointUnreadable("checkpoint latents or generator states are not tensors")
    return checkpoint


def load_checkpoint(storage: Storage, task_id: str, spec: RenderSpec) -> Checkpoint | None:
    """The job's stored checkpoint if it can be resumed from; None (with a log line when one was there) if not."""
    try:
        data = storage.get(checkpoint_object(task_id))
    except StorageError as exc:
        log.warning("task %s: checkpoint not read (%s); starting from step 0", task_id, exc)
        return None
    if data is None:
        return None
    try:
        checkpoint = decode(data)
    except CheckpointUnreadable as exc:
        log.warning("task %s: checkpoint ignored, %s; starting from step 0", task_id, exc)
        return None
    if checkpoint.spec_digest != spec_digest(spec):
        log.warning("task %s: checkpoint ignored, it is of another spec; starting from step 0", task_id)
        return None
    return checkpoint


class CheckpointWriter:
    """Stores one job's checkpoints from a thread of its own, in order; `discard` deletes the stored one.

    A checkpoint that cannot be stored is logged and skipped: it never fails the job (the previous one, or
    step 0, is where a resume would start).
    """

    def __init__(self, storage: Storage, task_id: str, *, exists: bool = False) -> None:
        self.storage = storage
        self.task_id = task_id
        self.exists = exists  # a checkpoint may be stored (this attempt resumed from one, or wrote one)
        self.written: list[int] = []  # steps of the checkpoints stored, in order
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"checkpoint-{task_id[:8]}")

    def submit(self, checkpoint: Checkpoint, frames: Any = None) -> None:
        """Store `checkpoint` once `frames` (a `FrameWriter`) has stored every frame through its step."""
        self.exists = True
        self._pool.submit(self._store, checkpoint, frames)

    def _store(self, checkpoint: Checkpoint, frames: Any) -> None:
        try:
            if frames is not None:
                checkpoint.frames = frames.stored_through(checkpoint.step)
            self.storage.put(checkpoint_object(self.task_id), encode(checkpoint), "application/octet-stream")
            self.written.append(checkpoint.step)
        except Exception as exc:  # a lost checkpoint costs a longer resume, never the job
            log.warning("task %s: checkpoint at step %d not stored: %s", self.task_id, checkpoint.step, exc)

    def flush(self) -> None:
        """Wait for the checkpoints submitted so far."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        """Drop what is queued, wait for a write in flight; the stored checkpoint stays (the job goes on elsewhere)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def discard(self) -> None:
        """The job reached a final state: `close`, then delete the stored checkpoint."""
        self.close()
        if not self.exists:
            return
        try:
            self.storage.delete(checkpoint_object(self.task_id))
        except StorageError as exc:
            log.warning("task %s: checkpoint not deleted: %s", self.task_id, exc)
