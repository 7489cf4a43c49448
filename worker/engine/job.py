"""`JobContext`: what travels with one job from the task to `render()` and back, in one object."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from PIL import Image

from producer.keys import check_task_id
from producer.spec import RenderSpec
from worker.engine.drain import Drain
from worker.hooks import StepHook


@dataclass
class JobContext:
    """One job as `render()` runs it: the spec and everything the worker knows about this delivery.

    - `task_id`: the id its storage keys derive from; a new one when omitted (`''` is refused, not replaced).
    - `attempt`, `queue_wait`, `worker`: recorded in the manifest.
    - `inputs`: the spec's images, already checked (`worker.engine.inputs.load_inputs`).
    - `hooks`: step hooks (revocation, lease, progress), run after every model call; one raising `JobStopped` ends
      the job before the decode.
    - `before_store(steps)`: runs after the decode, before the first upload (the worker's last lease check).
    - `frame_threads`: threads that encode and upload this job's frames.
    - `checkpoint_seconds`: seconds of denoising between checkpoints (0: none); an `attempt` above 1 resumes from
      the job's checkpoint when there is one (`worker.engine.checkpoints`).
    - `drain`: the worker's SIGTERM hand-off (`worker.engine.drain`); the job then checkpoints and is handed back when
      it will not finish in time, whatever `checkpoint_seconds` says.
    """

    spec: RenderSpec
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempt: int = 1
    queue_wait: float | None = None
    worker: str | None = None
    inputs: Mapping[str, Image.Image] = field(default_factory=dict)
    hooks: Sequence[StepHook] = ()
    before_store: Callable[[int], None] | None = None
    frame_threads: int = 2
    checkpoint_seconds: float = 0.0
    drain: Drain | None = None

    def __post_init__(self) -> None:
        self.task_id = check_task_id(self.task_id)

    @property
    def earlier_attempt(self) -> bool:
        """An earlier delivery of this job ran (and may have stored a checkpoint, which goes when this one ends)."""
        return self.attempt > 1

    @classmethod
    def of(cls, job: JobContext | RenderSpec) -> JobContext:
        """`job` itself, or a bare spec as a job with a new task id."""
        return job if isinstance(job, JobContext) else cls(job)
