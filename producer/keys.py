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
