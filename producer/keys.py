"""Every Redis key, queue name, task name and storage object name, spelled once."""

from __future__ import annotations

KEY_PREFIX = "render"

TASK_RENDER = "render.run"
DEFAULT_QUEUE = "render"

MANIFEST_NAME = "manifest.json"
FRAMES_DIR = "frames"


def revoked_key(task_id: str) -> str:
    """Redis key whose presence tells a worker to stop `task_id`."""
    return f"{KEY_PREFIX}:revoked:{task_id}"


def lease_key(task_id: str) -> str:
    """Redis key a running task renews while it renders."""
    return f"{KEY_PREFIX}:lease:{task_id}"


def image_object(task_id: str, index: int) -> str:
    return f"{task_id}/image-{index}.png"


def frame_object(task_id: str, steps_completed: int, extension: str) -> str:
    return f"{task_id}/{FRAMES_DIR}/step-{steps_completed:03d}.{extension}"


def manifest_object(task_id: str) -> str:
    return f"{task_id}/{MANIFEST_NAME}"


RUNNING_TASKS = f"{KEY_PREFIX}:running"
"""Hash task_id -> JSON record (spec, queue, attempt, worker) of every task a worker is rendering."""

SUBMITTED_AT_HEADER = "render_submitted_at"
ATTEMPT_HEADER = "render_attempt"


def job_key(task_id: str) -> str:
    """Hash the producer writes at submit time (queue, submitted_at), so a queued task is told from an unknown one."""
    return f"{KEY_PREFIX}:job:{task_id}"


def manifest_key(task_id: str) -> str:
    """The terminal manifest of a task, as JSON, for clients without storage access."""
    return f"{KEY_PREFIX}:manifest:{task_id}"


def recovery_lock_key(task_id: str) -> str:
    """Held briefly by the one worker that re-enqueues a task whose lease expired."""
    return f"{KEY_PREFIX}:recover:{task_id}"
