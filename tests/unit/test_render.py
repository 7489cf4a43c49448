"""render() on the real tiny pipelines: what the UNet receives at each step, what is stored, and when."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback
from PIL import Image

from producer import ModelError, RenderFailed, RenderSpec, StorageError
from worker.engine.callbacks import StepInfo
from worker.engine.job import JobContext
from worker.engine.rendering import pipeline_arguments, render
from worker.engine.stops import JobRevoked, LeaseLost
from worker.models.registry import ModelRegistry
from worker.settings import default_models
from worker.storage import LocalStorage

FAMILIES = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}


def make_spec(model: str = "tiny-sd15", **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": "a lighthouse at dusk", "num_inference_steps": 10, "width": 64, "height": 64}
    data["seed"] = 1234
    return RenderSpec.parse({**data, **overrides})


class UNetSpy:
    """Records the batch size (and SDXL's time-id rows) of every UNet call."""

    def __init__(self, pipe: Any) -> None:
        self.batches: list[int] = []
        self.time_id_rows: list[int] = []
        self._handle = pipe.unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.batches.append(sample.shape[0])
        added = kwargs.get("added_cond_kwargs")
        if added:
            self.time_id_rows.append(added["time_ids"].shape[0])

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def spy(registry: ModelRegistry, request: pytest.FixtureRequest) -> Iterator[Any]:
    spies: list[UNetSpy] = []

    def attach(model: str) -> UNetSpy:
        spies.append(UNetSpy(registry.pipeline(model)))
        return spies[-1]

    yield attach
    for s in spies:
        s.close()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "out")


def stored(storage: LocalStorage, url: str) -> bytes:
    name = url.removeprefix(storage.base_url + "/")
    data = storage.get(name)
    assert data is not None, f"{url} is not in storage"
    return data


@pytest.mark.parametrize("model", sorted(FAMILIES))
@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("cutoff", [{"step_ratio": 0.4}, {"step_index": 4}], ids=["ratio", "index"])
def test_cfg_is_on_until_the_cutoff_step_and_off_after(
    registry: ModelRegistry, storage: LocalStorage, spy: Any, model: str, num_images: int, cutoff: dict[str, Any]
) -> None:
    unet = spy(model)
    spec = make_spec(model, num_images=num_images, callbacks=[{"type": "cfg_cutoff", **cutoff}])
    manifest = render(spec, registry=registry, storage=storage)

    # The callback fires at the end of step 4 (int(10 * 0.4) or the index): steps 0-4 guided, 5-9 not.
    assert unet.batches == [2 * num_images] * 5 + [num_images] * 5
    if model == "tiny-sdxl":
        assert unet.time_id_rows == unet.batches
    assert manifest.status == "succeeded" and manifest.steps_completed == 10
    assert len(manifest.images) == num_images


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_without_a_cutoff_every_step_is_guided(
    registry: ModelRegistry, storage: LocalStorage, spy: Any, model: str
) -> None:
    unet = spy(model)
    render(make_spec(model, num_images=2), registry=registry, storage=storage)
    assert unet.batches == [4] * 10


def test_cutoff_with_guidance_already_off_changes_nothing(
    registry: ModelRegistry, storage: LocalStorage, spy: Any
) -> None:
    unet = spy("tiny-sd15")
    spec = make_spec(guidance_scale=1.0, num_images=2, callbacks=[{"type": "cfg_cutoff", "step_index": 2}])
    assert render(spec, registry=registry, storage=storage).status == "succeeded"
    assert unet.batches == [2] * 10


def test_the_official_callback_breaks_with_two_images(registry: ModelRegistry) -> None:
    """The reason the cutoff callbacks are subclassed: diffusers' own keeps one row of the batch."""
    pipe = registry.pipeline("tiny-sd15")
    official = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2)
    with pytest.raises(RuntimeError, match=r"The size of tensor a \(\d+\) must match the size of tensor b"):
        pipe(
            "a lighthouse",
            num_inference_steps=5,
            width=64,
            height=64,
            num_images_per_prompt=2,
            callback_on_step_end=official,
        )


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_step_budget_stops_at_the_asked_step_and_keeps_the_partial_image(
    registry: ModelRegistry, storage: LocalStorage, spy: Any, model: str
) -> None:
    unet = spy(model)
    spec = make_spec(model, callbacks=[{"type": "step_budget", "max_steps": 3}])
    manifest = render(spec, registry=registry, storage=storage)
    assert len(unet.batches) == 3
    assert (manifest.status, manifest.interrupted_by) == ("interrupted", "max_steps")
    assert (manifest.steps_planned, manifest.steps_completed) == (10, 3)
    assert len(manifest.images) == 1
    assert Image.open(io.BytesIO(stored(storage, manifest.images[0]))).size == (64, 64)


def test_step_budget_in_seconds(registry: ModelRegistry, storage: LocalStorage, spy: Any) -> None:
    unet = spy("tiny-sd15")
    spec = make_spec(callbacks=[{"type": "step_budget", "max_seconds": 1e-6}])
    manifest = render(spec, registry=registry, storage=storage)
    assert (manifest.status, manifest.interrupted_by, manifest.steps_completed) == ("interrupted", "max_seconds", 1)
    assert len(unet.batches) == 1 and len(manifest.images) == 1


def test_budget_that_ends_on_the_last_step_is_not_an_interruption(
    registry: ModelRegistry, storage: LocalStorage
) -> None:
    spec = make_spec(callbacks=[{"type": "step_budget", "max_steps": 10}])
    manifest = render(spec, registry=registry, storage=storage)
    assert (manifest.status, manifest.interrupted_by, manifest.steps_completed) == ("succeeded", None, 10)


@pytest.mark.parametrize(
    ("model", "fmt", "pil_format"),
    [("tiny-sd15", "png", "PNG"), ("tiny-sdxl", "webp", "WEBP"), ("tiny-sd15", "jpeg", "JPEG")],
)
def test_frames_at_the_asked_steps_and_size(
    registry: ModelRegistry, storage: LocalStorage, model: str, fmt: str, pil_format: str
) -> None:
    spec = make_spec(
        model, width=128, height=64, num_images=2, callbacks=[{"type": "frames", "every": 3, "format": fmt, "size": 48}]
    )
    manifest = render(spec, registry=registry, storage=storage)
    task = manifest.task_id
    assert manifest.frames == [f"{storage.base_url}/{task}/frames/step-{n:03d}.{fmt}" for n in (3, 6, 9)]
    for url in manifest.frames:
        frame = Image.open(io.BytesIO(stored(storage, url)))
        assert frame.format == pil_format
        assert frame.size == (2 * 48, 24)  # two tiles, each 48 px on its long edge, aspect kept


def test_frames_stop_with_the_budget(registry: ModelRegistry, storage: LocalStorage) -> None:
    spec = make_spec(callbacks=[{"type": "frames", "every": 2}, {"type": "step_budget", "max_steps": 5}])
    manifest = render(spec, registry=registry, storage=storage)
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-002.png", "step-004.png"]


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_same_seed_same_bytes(registry: ModelRegistry, storage: LocalStorage, model: str) -> None:
    def pixels(seed: int) -> list[bytes]:
        manifest = render(make_spec(model, seed=seed, num_images=2), registry=registry, storage=storage)
        return [Image.open(io.BytesIO(stored(storage, url))).tobytes() for url in manifest.images]

    first, again, other = pixels(7), pixels(7), pixels(8)
    assert first == again
    assert first[0] != first[1], "each image of a batch has its own seed"
    assert other[0] != first[0]


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_stored_pixels_are_the_bare_pipelines_pil_output(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    # The GPU thread stops at the decoded tensor; the job's thread makes the 8-bit images: byte for byte what
    # diffusers' own output_type="pil" gives.
    spec = make_spec(model, seed=21, num_images=2)
    manifest = render(spec, registry=registry, storage=storage)
    stored_pixels = [Image.open(io.BytesIO(stored(storage, url))).convert("RGB").tobytes() for url in manifest.images]
    with torch.inference_mode():
        bare = registry.pipeline(model)(**pipeline_arguments(spec, {}, [21, 22])).images
    assert stored_pixels == [image.tobytes() for image in bare]


class RevokeAt:
    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: list[StepInfo] = []

    def on_step(self, info: StepInfo) -> None:
        self.seen.append(info)
        if info.steps_completed == self.step:
            raise JobRevoked(info.steps_completed)


def test_a_revoking_hook_stops_before_decode_and_upload(registry: ModelRegistry, storage: LocalStorage) -> None:
    pipe = registry.pipeline("tiny-sd15")
    decodes: list[int] = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(1))
    try:
        hook = RevokeAt(3)
        spec = make_spec(callbacks=[{"type": "frames", "every": 1}])
        manifest = render(JobContext(spec, hooks=[hook]), registry=registry, storage=storage)
    finally:
        handle.remove()
    assert (manifest.status, manifest.steps_completed, manifest.images) == ("revoked", 3, [])
    assert decodes == []
    assert [i.steps_completed for i in hook.seen] == [1, 2, 3]
    assert all(i.steps_planned == 10 and i.task_id == manifest.task_id for i in hook.seen)
    task_dir = Path(storage.base_url.removeprefix("file://")) / manifest.task_id
    assert not list(task_dir.glob("image-*"))
    assert json.loads((task_dir / "manifest.json").read_text())["status"] == "revoked"
    # Frames of the steps before the revoke are kept; the revoking step makes none (control runs first).
    assert [url.rsplit("/", 1)[1] for url in manifest.frames] == ["step-001.png", "step-002.png"]


def test_next_job_after_a_revoked_or_interrupted_job_renders_as_on_a_fresh_pipeline(
    registry: ModelRegistry, storage: LocalStorage, tmp_path: Path
) -> None:
    spec = make_spec(num_images=2, callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}])
    render(
        JobContext(make_spec(callbacks=[{"type": "cfg_cutoff", "step_index": 1}]), hooks=[RevokeAt(2)]),
        registry=registry,
        storage=storage,
    )
    render(make_spec(callbacks=[{"type": "step_budget", "max_steps": 2}]), registry=registry, storage=storage)
    after = render(spec, registry=registry, storage=storage)

    fresh_registry = ModelRegistry(registry.models, device=registry.device, dtype=registry.dtype)
    fresh = render(spec, registry=fresh_registry, storage=storage)
    for a, b in zip(after.images, fresh.images, strict=True):
        assert (
            Image.open(io.BytesIO(stored(storage, a))).tobytes() == Image.open(io.BytesIO(stored(storage, b))).tobytes()
        )


class RecordingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.names: list[str] = []

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        self.names.append(name)
        return super().put(name, data, content_type, metadata)


def test_manifest_is_written_last_and_describes_the_job(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path)
    spec = make_spec(num_images=2, callbacks=[{"type": "frames", "every": 5}])
    manifest = render(JobContext(spec, task_id="job-1", attempt=2, queue_wait=0.5), registry=registry, storage=storage)
    assert storage.names[-1] == "job-1/manifest.json"
    assert set(storage.names[:-1]) == {
        "job-1/image-0.png",
        "job-1/image-1.png",
        "job-1/frames/step-005.png",
        "job-1/frames/step-010.png",
    }
    on_disk = json.loads((tmp_path / "job-1" / "manifest.json").read_text())
    assert on_disk == json.loads(manifest.model_dump_json())
    assert on_disk["spec"] == spec.model_dump(mode="json") and on_disk["seed"] == 1234 and on_disk["attempt"] == 2
    assert on_disk["timings"]["queue_wait"] == 0.5
    assert all(on_disk["timings"][k] >= 0 for k in ("load", "denoise", "decode", "upload"))
    assert {"torch", "diffusers", "transformers", "render-farm"} <= set(on_disk["versions"])


def test_png_carries_the_generation_parameters(registry: ModelRegistry, storage: LocalStorage) -> None:
    manifest = render(make_spec(negative_prompt="fog", num_images=2), registry=registry, storage=storage)
    second = Image.open(io.BytesIO(stored(storage, manifest.images[1])))
    assert second.info["parameters"].startswith("a lighthouse at dusk\nNegative prompt: fog\nSteps: 10")
    assert "Seed: 1235" in second.info["parameters"]  # image i is seeded seed + i
    assert json.loads(second.info["render:spec"])["prompt"] == "a lighthouse at dusk"
    assert second.info["render:task_id"] == manifest.task_id


def test_a_succeeded_task_is_not_rendered_again(registry: ModelRegistry, storage: LocalStorage, spy: Any) -> None:
    first = render(JobContext(make_spec(), task_id="once"), registry=registry, storage=storage)
    unet = spy("tiny-sd15")
    again = render(JobContext(make_spec(), task_id="once"), registry=registry, storage=storage)
    assert again == first and unet.batches == []


class Explodes:
    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failure_mid_loop_writes_a_failed_manifest_and_raises(registry: ModelRegistry, storage: LocalStorage) -> None:
    spec = make_spec(callbacks=[{"type": "frames", "every": 1}])
    with pytest.raises(RenderFailed, match="task broken failed while rendering: RuntimeError: CUDA error") as caught:
        render(JobContext(spec, task_id="broken", hooks=[Explodes()]), registry=registry, storage=storage)
    assert isinstance(caught.value.__cause__, RuntimeError)
    stored_manifest = json.loads(stored(storage, storage.url("broken/manifest.json")))
    assert (stored_manifest["status"], stored_manifest["steps_completed"]) == ("failed", 4)
    assert stored_manifest["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert stored_manifest["images"] == []
    # a failed task is not "done": the next attempt renders it and overwrites the manifest
    again = render(JobContext(spec, task_id="broken", attempt=2), registry=registry, storage=storage)
    assert (again.status, again.attempt) == ("succeeded", 2)


def test_an_unreadable_manifest_is_rendered_again(registry: ModelRegistry, storage: LocalStorage) -> None:
    storage.put("torn/manifest.json", b'{"task_id": "torn", "sta', "application/json")
    assert render(JobContext(make_spec(), task_id="torn"), registry=registry, storage=storage).status == "succeeded"


def test_a_random_seed_is_chosen_and_recorded(registry: ModelRegistry, storage: LocalStorage) -> None:
    manifest = render(make_spec(seed=None), registry=registry, storage=storage)
    assert 0 <= manifest.seed < 2**63 and manifest.spec["seed"] is None


@pytest.mark.parametrize(
    ("overrides", "error", "text"),
    [
        (
            {"model": "sdxl-turbo"},
            ModelError,
            f"not on this worker's allowlist; use one of: {', '.join(sorted(default_models()))}",
        ),
        (
            {"pipeline": "img2img", "image": "file:///in.png"},
            ValueError,
            "image: not loaded; call worker.engine.inputs",
        ),
        (
            {"ip_adapter": {"image": "file:///style.png"}},
            ValueError,
            "ip_adapter_image: not loaded; call worker.engine.inputs",
        ),
    ],
)
def test_worker_refuses_what_it_cannot_run_before_any_work(
    registry: ModelRegistry, storage: LocalStorage, overrides: dict[str, Any], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        render(JobContext(make_spec(**overrides), task_id="refused"), registry=registry, storage=storage)
    assert storage.get("refused/manifest.json") is None


class FailingFrames(LocalStorage):
    """A real directory whose frame writes fail, as a full disk or a dead S3 endpoint would."""

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        if "/frames/" in name:
            raise StorageError(f"cannot write {name}: No space left on device")
        return super().put(name, data, content_type, metadata)


def test_a_storage_failure_never_leaves_a_succeeded_manifest(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = FailingFrames(tmp_path)
    spec = make_spec(callbacks=[{"type": "frames", "every": 5}])
    with pytest.raises(StorageError, match="No space left on device"):
        render(JobContext(spec, task_id="disk-full"), registry=registry, storage=storage)
    manifest = json.loads((tmp_path / "disk-full" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]


@pytest.mark.parametrize("where", ["mid-steps", "before upload"])
def test_a_lost_lease_stops_the_job_and_writes_no_image_and_no_manifest(
    registry: ModelRegistry, storage: LocalStorage, where: str
) -> None:
    class LoseAt:
        def on_step(self, info: StepInfo) -> None:
            if where == "mid-steps" and info.steps_completed == 3:
                raise LeaseLost(3, "render:lease:x")

    def before_store(steps: int) -> None:
        if where == "before upload":
            raise LeaseLost(steps, "render:lease:x")

    with pytest.raises(LeaseLost, match=r"lease render:lease:x lost"):
        render(
            JobContext(make_spec(), task_id="lost", hooks=[LoseAt()], before_store=before_store),
            registry=registry,
            storage=storage,
        )
    task_dir = Path(storage.base_url.removeprefix("file://")) / "lost"
    assert not task_dir.exists() or list(task_dir.iterdir()) == [], "another worker owns this job's objects now"
