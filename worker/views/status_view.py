"""What `render status` shows of one job: a line for people, a dict for `--json`."""

from __future__ import annotations

from typing import Any

from producer.keys import DEFAULT_TENANT
from producer.status import TaskStatus


def status_line(current: TaskStatus) -> str:
    """`<id>: <state>`, then what is known: steps, images, the newest frame, the error, why it waits, its tenant
    (last, so a line read by its start keeps its shape; none for an unknown id, which belongs to no job)."""
    line = f"{current.task_id}: {current.state}"
    if current.step is not None and current.total:
        line += f" {current.step}/{current.total} steps"
    if current.manifest is not None and current.manifest.images:
        line += f", images: {' '.join(current.manifest.images)}"
    if current.frame and not current.done:
        line += f", newest frame: {current.frame}"
    if current.error:
        line += f", error: {current.error}"
    if current.waiting:
        line += f", waiting: {current.waiting}"
    if current.state != "unknown" and current.tenant != DEFAULT_TENANT:  # a farm without tenants reads as before
        line += f", tenant: {current.tenant}"
    return line


def status_dict(current: TaskStatus) -> dict[str, Any]:
    """The job's status as JSON: its fields, its `tenant` (from its id) and its manifest once final."""
    return {
        "task_id": current.task_id,
        "tenant": current.tenant,
        "state": current.state,
        "step": current.step,
        "total": current.total,
        "error": current.error,
        "frame": current.frame,
        "waiting": current.waiting,
        "manifest": current.manifest.model_dump(mode="json") if current.manifest else None,
    }
