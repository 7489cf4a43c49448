"""Micro-batching on the real tiny pipelines: jobs in one call give their own images, and leave it on their own."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer import RenderFailed, RenderSpec
from tests.helpers import Gate, wait_until
from worker.engine.batching import denoise_batch, shared_call_key
from worker.engine.callbacks import StepInfo
from worker.engine.job import JobContext
from worker.engine.rendering import Denoised, Prepared, denoise, prepare, store
from worker.engine.stops import JobRevoked
from worker.models.registry import ModelRegistry
from worker.process.gpu import Deadline, Deliveries, GpuRunner
from worker.settings import default_models
from worker.storage import LocalStorage

MODELS = ["tiny-sd15", "tiny-sdxl"]


def make_spec(model: str = "tiny-sd15", i: int = 0, **overrides: Any) -> RenderSpec:
    data = {
        "model": model,
        "prompt": f"a lighthouse at dusk, variation {i}",
        "num_inference_steps": 8,
        "width": 64,
        "height": 64,
        "seed": 500 + i,
        "num_images": 1 + i % 2,
    }
    return RenderSpec.parse({**data, **overrides})


class RevokeAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed >= self.step:
            raise JobRevoked(info.steps_completed)


class FailAt:
    """A hook that breaks (an error, not a stop) once `step` steps are done: the whole shared call fails."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed >= self.step:
            raise RuntimeError(f"the hook broke at step {info.steps_completed}")


class StepLog:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step(self, info: StepInfo) -> None:
        self.steps.append(info.steps_completed)


def arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def max_diff(a: list[Image.Image], b: list[Image.Image]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(arrays(a), arrays(b), strict=True))


def run_on(runner: GpuRunner, prepared: Prepared, results: dict[str, Denoised]) -> threading.Thread:
    """A job thread handing `prepared` to the GPU thread; its outcome lands in `results` under its task id."""
    thread = threading.Thread(target=lambda: results.__setitem__(prepared.job.task_id, runner.run(prepared)))
    thread.start()
    return thread


def alone(registry: ModelRegistry, storage: LocalStorage, spec: RenderSpec, task_id: str) -> Denoised:
    return denoise(prepare(JobContext(spec, task_id), registry, storage), registry)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("scheduler", ["default", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde_karras", "unipc"])
def test_each_job_of_a_batch_gives_its_own_image_as_alone_and_a_spent_budget_leaves_with_its_partial_image(
    registry: ModelRegistry, tmp_path: Path, model: str, scheduler: str
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec(model, i, scheduler=scheduler) for i in range(4)]
    specs[1] = make_spec(model, 1, scheduler=scheduler, callbacks=[{"type": "step_budget", "max_steps": 4}])
    specs[2] = make_spec(model, 2, scheduler=scheduler, callbacks=[{"type": "frames", "every": 2}])
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(registry, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]

    logs = [StepLog() for _ in specs]
    prepared = [prepare(JobContext(s, f"b-{i}", hooks=[logs[i]]), registry, storage) for i, s in enumerate(specs)]
    outcomes = denoise_batch(prepared, registry)
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]

    for i, (outcome, want) in enumerate(zip(outcomes, expected, strict=True)):
        assert max_diff(outcome.images, want.images) <= 1, f"job {i} differs from its render alone"
        assert manifests[i].batched_with == [f"b-{j}" for j in range(4) if j != i]
    assert [m.status for m in manifests] == ["succeeded", "interrupted", "succeeded", "succeeded"]
    assert manifests[1].steps_completed == 4 and manifests[1].interrupted_by == "max_steps"
    assert logs[1].steps[-1] == 4 and logs[0].steps[-1] == 8, "the spent job left; the others went on"
    assert [url.rsplit("/", 1)[1] for url in manifests[2].frames] == [f"step-{s:03d}.png" for s in (2, 4, 6, 8)]
    assert len(manifests[1].images) == 2 and manifests[1].timings.decode is not None


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "heun"])
def test_revoking_one_job_drops_its_rows_and_the_others_finish_as_alone(
    registry: ModelRegistry, tmp_path: Path, scheduler: str
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec("tiny-sd15", i, scheduler=scheduler) for i in range(4)]
    expected = [alone(registry, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    hooks: list[list[Any]] = [[], [RevokeAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"r-{i}", hooks=hooks[i]), registry, storage) for i, s in enumerate(specs)]

    pipe = registry.pipeline("tiny-sd15")
    rows: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        outcomes = denoise_batch(prepared, registry)
    finally:
        handle.remove()
    manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]

    assert [m.status for m in manifests] == ["succeeded", "revoked", "succeeded", "succeeded"]
    assert manifests[1].images == [] and not (tmp_path / "r-1" / "image-0.png").exists()
    assert manifests[1].steps_completed == 3
    for i in (0, 2, 3):
        assert max_diff(outcomes[i].images, expected[i].images) <= 1
    # Guided: 2 rows per image. 6 images until the revoke (job 1 has 2), then 4.
    assert rows[0] == 12 and rows[-1] == 8, rows


ENCODED = {"clip_skip": 1, "loras": [{"name": "tiny-lora", "scale": 0.8}]}  # what examples/lora-sd15.json sets


@pytest.fixture(scope="module")
def exact() -> ModelRegistry:
    """Both tiny pipelines in float64. With the tiny LoRA (4x strength) a float32 batch's rows drift from their lone
    renders by rounding alone (another batch size, other kernels), up to 18 levels after 8 steps (measured); in
    float64 they agree, so a difference here is the batch's doing."""
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float64, max_cached=2)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("negative", ["", "blurry, take {i}"])
def test_jobs_with_their_own_prompt_negative_prompt_and_seed_under_clip_skip_and_a_lora_each_give_their_lone_image(
    exact: ModelRegistry, tmp_path: Path, model: str, negative: str
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec(model, i, negative_prompt=negative.format(i=i), **ENCODED) for i in range(4)]
    assert len({shared_call_key(spec) for spec in specs}) == 1
    expected = [alone(exact, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    prepared = [prepare(JobContext(s, f"e-{i}"), exact, storage) for i, s in enumerate(specs)]

    rows: list[int] = []
    handle = exact.pipeline(model).unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        outcomes = denoise_batch(prepared, exact)
    finally:
        handle.remove()

    assert rows == [12] * 8, "one call, guided, for the six images of the four jobs"
    for i, (outcome, want) in enumerate(zip(outcomes, expected, strict=True)):
        assert outcome.error is None, f"job {i}: {outcome.error!r}"
        assert max_diff(outcome.images, want.images) <= 1, f"job {i} differs from its render alone"
        assert outcome.batched_with == [f"e-{j}" for j in range(4) if j != i]


def test_jobs_that_differ_in_clip_skip_or_loras_share_calls_only_with_their_like_each_as_alone(
    exact: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    runner = GpuRunner(exact, max_batch=8)
    gate = Gate()
    tiny_lora = {"name": "tiny-lora", "scale": 0.8}
    variants: list[dict[str, Any]] = [
        {"clip_skip": 0},
        {"clip_skip": 1},
        {"clip_skip": 1, "loras": [tiny_lora]},
        {"clip_skip": 1, "loras": [{**tiny_lora, "scale": -0.5}]},
    ]
    specs = [make_spec(i=i, num_images=1, negative_prompt="blurry", **variants[i // 2]) for i in range(8)]
    assert len({shared_call_key(spec) for spec in specs}) == 4
    expected = [alone(exact, storage, spec, f"alone-{i}") for i, spec in enumerate(specs)]
    results: dict[str, Denoised] = {}

    def submit(job: JobContext) -> threading.Thread:
        return run_on(runner, prepare(job, exact, storage), results)

    threads = [submit(JobContext(make_spec(i=9, num_images=1), "gate", hooks=[gate]))]
    assert gate.reached.wait(60)
    threads += [submit(JobContext(spec, f"v-{i}")) for i, spec in enumerate(specs)]
    wait_until(lambda: len(runner._waiting) == 8, timeout=60, what="eight jobs waiting for the GPU")
    gate.open.set()
    for thread in threads:
        thread.join(120)

    assert [sorted(call) for call in runner.calls[1:]] == [[f"v-{i}", f"v-{i + 1}"] for i in range(0, 8, 2)]
    for i, want in enumerate(expected):
        got = results[f"v-{i}"]
        assert got.error is None, f"job {i}: {got.error!r}"
        assert max_diff(got.images, want.images) <= 1, f"job {i} differs from its render alone"
        assert got.batched_with == [f"v-{i ^ 1}"]


def test_a_call_that_fails_gives_every_job_in_it_the_cause_and_the_jobs_it_shared_the_call_with(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec("tiny-sd15", i) for i in range(4)]
    hooks: list[list[Any]] = [[], [FailAt(3)], [], []]
    prepared = [prepare(JobContext(s, f"f-{i}", hooks=hooks[i]), registry, storage) for i, s in enumerate(specs)]
    outcomes = denoise_batch(prepared, registry)
    for i, (each, outcome) in enumerate(zip(prepared, outcomes, strict=True)):
        with pytest.raises(RenderFailed, match=r"RuntimeError: the hook broke at step 3") as caught:
            store(each, outcome, storage)
        manifest = caught.value.manifest
        assert manifest is not None and manifest.status == "failed"
        assert manifest.error == "RuntimeError: the hook broke at step 3"
        assert manifest.batched_with == [f"f-{j}" for j in range(4) if j != i]


def test_every_job_revoked_ends_the_call_before_the_decode(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    specs = [make_spec("tiny-sd15", i) for i in range(2)]
    prepared = [prepare(JobContext(s, f"all-{i}", hooks=[RevokeAt(2)]), registry, storage) for i, s in enumerate(specs)]
    decodes: list[int] = []
    vae = registry.pipeline("tiny-sd15").vae
    handle = vae.decoder.register_forward_pre_hook(lambda module, args: decodes.append(1))
    try:
        outcomes = denoise_batch(prepared, registry)
    finally:
        handle.remove()
    assert all(isinstance(outcome.stop, JobRevoked) for outcome in outcomes) and decodes == []


def test_the_key_keeps_apart_what_one_call_cannot_share() -> None:
    base = make_spec()
    assert shared_call_key(base) == shared_call_key(make_spec(i=2, prompt="another prompt", negative_prompt=""))
    assert shared_call_key(base) == shared_call_key(make_spec(callbacks=[{"type": "step_budget", "max_steps": 3}]))
    for other in (
        make_spec(width=128),
        make_spec(num_inference_steps=9),
        make_spec(scheduler="euler_a"),
        make_spec(guidance_scale=3.0),
        make_spec(negative_prompt="blurry"),  # SDXL encodes a missing negative prompt differently from ''
        make_spec(callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}]),
        make_spec(model="tiny-sdxl"),
        make_spec(clip_skip=1),
        make_spec(loras=[{"name": "tiny-lora"}]),
        make_spec(loras=[{"name": "tiny-lora", "scale": 0.5}]),
    ):
        assert shared_call_key(other) != shared_call_key(base)
    assert shared_call_key(make_spec(pipeline="img2img", image="file:///x.png")) is None
    # Encoded prompts (a schedule's spans) and guidance curves are one job's: such a job always runs alone.
    assert shared_call_key(make_spec(prompt="a [cat:dog:0.5]", prompt_syntax="a1111")) is None
    assert shared_call_key(make_spec(prompt_syntax="a1111")) is None
    assert shared_call_key(make_spec(guidance={"from": 7, "to": 3})) is None


def test_the_gpu_thread_batches_only_compatible_jobs_already_waiting(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    runner = GpuRunner(registry, max_batch=4)
    gate = Gate()
    results: dict[str, Denoised] = {}

    def submit(job: JobContext) -> threading.Thread:
        return run_on(runner, prepare(job, registry, storage), results)

    threads = [submit(JobContext(make_spec(i=0, num_images=1), "first", hooks=[gate]))]
    assert gate.reached.wait(60)
    threads += [submit(JobContext(make_spec(i=i, num_images=1), f"same-{i}")) for i in range(1, 4)]
    threads.append(submit(JobContext(make_spec(i=9, width=128), "bigger")))
    threads.append(submit(JobContext(make_spec(i=5, num_images=2), "no-room")))  # 3 + 2 images > 4
    wait_until(lambda: len(runner._waiting) == 5, timeout=60, what="five jobs waiting for the GPU")
    gate.open.set()
    for thread in threads:
        thread.join(120)
    assert runner.calls == [["first"], ["same-1", "same-2", "same-3"], ["bigger"], ["no-room"]]
    assert results["first"].batched_with == [] and results["bigger"].batched_with == []
    assert results["same-2"].batched_with == ["same-1", "same-3"]


def test_a_job_past_its_time_limit_stops_at_its_next_step_and_fails(registry: ModelRegistry, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    clock = iter([0.0, *([100.0] * 100)])  # taken at 0; every later step reads 100 s
    job = JobContext(make_spec(), "late", hooks=[Deadline(30, clock=lambda: next(clock))])
    prepared = prepare(job, registry, storage)
    with pytest.raises(RenderFailed, match=r"TimeLimitExceeded: job stopped \(past its time limit of 30 s\)") as caught:
        store(prepared, denoise(prepared, registry), storage)
    manifest = caught.value.manifest  # the failure carries the manifest it stored
    assert manifest is not None and manifest.status == "failed" and manifest.steps_completed == 1
    assert "TimeLimitExceeded" in (manifest.error or "")


def test_a_call_stuck_past_every_limit_ends_the_process(registry: ModelRegistry, tmp_path: Path) -> None:
    exits: list[int] = []
    runner = GpuRunner(registry, grace=0.0, exit_process=exits.append)
    gate = Gate()
    prepared: Prepared = prepare(JobContext(make_spec(), "stuck", hooks=[gate]), registry, LocalStorage(tmp_path))
    thread = threading.Thread(target=runner.run, args=(prepared,), kwargs={"deadline": 0.0})
    thread.start()
    wait_until(lambda: exits == [70], timeout=60, what="the watchdog's exit")
    gate.open.set()
    thread.join(60)


def test_a_call_waits_for_a_job_this_worker_holds_that_is_still_being_checked(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "worker.process.gpu.GATHER_SECONDS", 120.0
    )  # bounded in production (0.25 s); here the event decides
    storage = LocalStorage(tmp_path)
    runner = GpuRunner(registry, max_batch=4)
    first = prepare(JobContext(make_spec(i=0, num_images=1), "early"), registry, storage)
    second = prepare(JobContext(make_spec(i=1, num_images=1), "late"), registry, storage)
    results: list[Denoised] = []
    with runner.arriving() as arrival:  # "late" is delivered, its checks not done
        thread = threading.Thread(target=lambda: results.append(runner.run(first)))
        thread.start()
        results.append(runner.run(second, arrival=arrival))
    thread.join(120)
    assert [sorted(call) for call in runner.calls] == [["early", "late"]]

    lone = prepare(JobContext(make_spec(i=2), "alone"), registry, storage)
    with runner.arriving():  # delivered, then given up on (say, its lease is held elsewhere): it holds no call back
        thread = threading.Thread(target=lambda: results.append(runner.run(lone)))
        thread.start()
        wait_until(lambda: runner.gathering == "alone", timeout=60, what="the lone job's call waiting for arrivals")
    thread.join(120)
    assert runner.calls[-1] == ["alone"] and results[-1].batched_with == []


def test_a_call_keeps_gathering_while_a_burst_is_still_being_delivered_and_a_lone_job_starts_at_once(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "worker.process.gpu.GATHER_SECONDS", 120.0
    )  # in production 0.25 s and 10 ms: here the jobs decide
    monkeypatch.setattr("worker.process.gpu.BURST_GAP", 120.0)
    storage = LocalStorage(tmp_path)
    deliveries = Deliveries()
    runner = GpuRunner(registry, max_batch=2, deliveries=deliveries)
    first = prepare(JobContext(make_spec(i=0, num_images=1), "early"), registry, storage)
    second = prepare(JobContext(make_spec(i=1, num_images=1), "late"), registry, storage)
    results: dict[str, Denoised] = {}
    with runner.arriving() as arrival:
        deliveries.mark()  # the next job's message came in after "early" was taken; its own thread has not started
        thread = threading.Thread(target=lambda: results.update(early=runner.run(first, arrival=arrival)))
        thread.start()
    wait_until(lambda: runner.gathering == "early", timeout=60, what="the call waiting for the burst")
    results["late"] = runner.run(second)  # two compatible images: the call is full and starts
    thread.join(120)
    assert [sorted(call) for call in runner.calls] == [["early", "late"]]
    assert results["early"].batched_with == ["late"]

    deliveries.mark()  # a message before the job was taken: its own
    lone = prepare(JobContext(make_spec(i=2), "alone"), registry, storage)
    with runner.arriving() as arrival:
        thread = threading.Thread(target=lambda: results.update(alone=runner.run(lone, arrival=arrival)))
        thread.start()
    thread.join(60)  # a wait would last the 120 s the burst gap is set to here
    assert not thread.is_alive() and runner.calls[-1] == ["alone"]


def test_a_job_delivered_first_runs_first_though_its_checks_end_after_a_later_one_s(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A high-priority job the broker handed over before a normal one, whose checks were slower (a busy machine),
    still starts first: the GPU waits for it (at most GATHER_SECONDS in production; here the job decides)."""
    monkeypatch.setattr("worker.process.gpu.GATHER_SECONDS", 120.0)
    storage = LocalStorage(tmp_path)
    runner = GpuRunner(registry, max_batch=1)
    early = prepare(JobContext(make_spec(i=0), "early"), registry, storage)
    late = prepare(JobContext(make_spec(i=1), "late"), registry, storage)
    with runner.arriving() as delivered_first:
        thread = threading.Thread(target=runner.run, args=(late,))
        thread.start()
        wait_until(lambda: runner.gathering == "late", timeout=60, what="the GPU waiting for the job delivered first")
        runner.run(early, arrival=delivered_first)
    thread.join(60)
    assert not thread.is_alive() and runner.calls == [["early"], ["late"]]


def test_a_full_call_starts_without_waiting_for_jobs_still_being_checked(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.process.gpu.GATHER_SECONDS", 120.0)
    storage = LocalStorage(tmp_path)
    runner = GpuRunner(registry, max_batch=2)
    jobs = [prepare(JobContext(make_spec(i=i, num_images=1), f"job-{i}"), registry, storage) for i in range(2)]
    with runner.arriving() as third:  # a third job, delivered after these two, still being checked
        third.at = float("inf")  # (delivered first, it would go first: GpuRunner._first)
        thread = threading.Thread(target=runner.run, args=(jobs[0],))
        thread.start()
        wait_until(lambda: runner.gathering == "job-0", timeout=60, what="the call waiting for the checked job")
        runner.run(jobs[1])
        thread.join(60)
        assert not thread.is_alive() and [sorted(call) for call in runner.calls] == [["job-0", "job-1"]]


def test_a_job_revoked_while_it_waited_never_runs_and_leaves_nothing_for_the_watchdog(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    exits: list[int] = []
    runner = GpuRunner(registry, grace=0.0, exit_process=exits.append)
    prepared = prepare(JobContext(make_spec(), "gone"), registry, LocalStorage(tmp_path))
    outcome = runner.run(prepared, deadline=0.0, skip=lambda: JobRevoked(0))
    assert isinstance(outcome.stop, JobRevoked) and outcome.images == [] and runner.calls == []
    wait_until(lambda: runner._running == [], timeout=60, what="the GPU thread done with the skipped job")
    assert exits == []


def test_a_job_whose_model_never_loaded_raises_its_error_and_shuts_its_frame_writer(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    prepared = prepare(JobContext(make_spec(callbacks=[{"type": "frames"}]), "no-model"), registry, storage)
    assert prepared.stack.frames is not None
    with pytest.raises(RuntimeError, match="cannot load"):
        store(prepared, Denoised(error=RuntimeError("cannot load"), before_any_step=True), storage)
    assert prepared.stack.frames._pool._shutdown, "the writer's pool was left open"
    assert storage.get("no-model/manifest.json") is None, "an error before any step stores no manifest"
