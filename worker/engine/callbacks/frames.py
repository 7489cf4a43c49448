"""Per-step preview frames, encoded and uploaded off the denoising thread.

The callback only runs the small latents-to-RGB product on the device and starts a
non-blocking copy to pinned host memory; a worker thread waits for that copy, encodes the
image and uploads it, so the loop never waits on storage (nor, on a GPU, on a device sync).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from producer.keys import frame_object
from producer.spec import Frames
from worker.engine.preview import CONTENT_TYPES, contact_strip, encode
from worker.metrics import FRAME_UPLOAD
from worker.models.families import ModelFamily
from worker.storage import Storage


class FrameWriter:
    """Encodes and stores frames on a small thread pool; `finish` returns their URLs in step order."""

    def __init__(self, storage: Storage, task_id: str, spec: Frames, threads: int = 2) -> None:
        self.storage = storage
        self.task_id = task_id
        self.spec = spec
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"frames-{task_id[:8]}")
        self._futures: list[Future[str]] = []
        self._steps: list[int] = []
        self.adopted: list[str] = []  # frames an earlier attempt stored (a resumed job's), before this one's
        self._newest: tuple[int, str] | None = None
        self._lock = threading.Lock()

    def adopt(self, urls: list[str]) -> None:
        self.adopted = list(urls)

    @property
    def newest(self) -> str | None:
        """The URL of the newest frame stored so far (by step; frames are stored out of order), else the newest an
        earlier attempt stored, else None: what the job's progress shows as its preview."""
        with self._lock:
            newest = self._newest
        return newest[1] if newest is not None else (self.adopted[-1] if self.adopted else None)

    def submit(self, steps_completed: int, rgb: torch.Tensor, stage: tuple[str, int] | None = None) -> None:
        """A frame at `steps_completed` (the job's steps, over its stages); `stage` (its label and the step within
        it) names a later stage's frame `frames/<label>-step-NNN`."""
        event = None
        if rgb.device.type == "cuda":
            host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            rgb = host
        self._steps.append(steps_completed)
        self._futures.append(self._pool.submit(self._store, steps_completed, rgb, event, stage))

    def stored_through(self, step: int) -> list[str]:
        """The URLs of every frame through `step`, once stored (a checkpoint's); raises the first upload error."""
        return self.adopted + [f.result() for s, f in zip(self._steps, list(self._futures), strict=False) if s <= step]

    def _store(self, steps_completed: int, rgb: torch.Tensor, event: Any, stage: tuple[str, int] | None) -> str:
        if event is not None:
            event.synchronize()
        started = time.perf_counter()
        image = contact_strip(rgb.numpy(), self.spec.size)
        name = (
            frame_object(self.task_id, steps_completed, self.spec.format)
            if stage is None
            else frame_object(self.task_id, stage[1], self.spec.format, stage[0])
        )
        url = self.storage.put(name, encode(image, self.spec.format), CONTENT_TYPES[self.spec.format])
        FRAME_UPLOAD.observe(time.perf_counter() - started)
        with self._lock:
            if self._newest is None or steps_completed > self._newest[0]:
                self._newest = (steps_completed, url)
        return url

    def finish(self) -> list[str]:
        """Wait for every frame; raise the first upload error."""
        try:
            return self.adopted + [future.result() for future in self._futures]
        finally:
            self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Drop frames not yet started (the job failed); wait for the ones in flight."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class FramesCallback(PipelineCallback):
    """Hands a preview of the latents to a `FrameWriter` every `every` steps (of its stage)."""

    tensor_inputs = ["latents"]

    def __init__(self, writer: FrameWriter, family: ModelFamily, size: tuple[int, int] = (0, 0)) -> None:
        # PipelineCallback.__init__ validates cutoff arguments that frames do not have.
        self.writer = writer
        self.family = family
        self.height, self.width = size
        self.every = writer.spec.every
        self.skip_through = 0  # a resumed job's frames through its checkpoint's step are stored already
        self.stage: str | None = None  # a later stage's label (its frames are named by it)
        self.offset = 0  # a later stage's: the job's steps before it

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        step = step_index + 1
        if step % self.every == 0 and self.offset + step > self.skip_through:
            rgb = self.family.preview(pipeline, callback_kwargs["latents"], self.height, self.width)
            self.writer.submit(self.offset + step, rgb, None if self.stage is None else (self.stage, step))
        return callback_kwargs
