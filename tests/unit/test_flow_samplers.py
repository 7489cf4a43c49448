"""Flow-matching samplers on a Flux-like and an SD3-like checkpoint scheduler: each builds from the config, takes
`set_timesteps` exactly as diffusers' Flux and SD3 pipelines call it (their own `retrieve_timesteps` and
`calculate_shift`), keeps the checkpoint's shift, and steps finite tensors of the pipelines' latent shapes."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3

from producer.errors import UnsupportedSpecError
from producer.spec import SCHEDULERS
from worker.models.flow_sampling import FLOW_SAMPLERS, check_flow_sampler, flow_sampler_names, make_flow_scheduler

STEPS = 4
FLUX_LATENTS = (1, 16, 64)  # packed: 16 tokens of 2x2 patches of 16 channels
SD3_LATENTS = (1, 16, 8, 8)
NAMES = ["default", *FLOW_SAMPLERS]


def flux_checkpoint() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler FLUX.1-dev ships (its scheduler_config.json)."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def sd3_checkpoint() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler SD3/SD3.5 ship: a fixed shift of 3, no dynamic shifting."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def set_like_flux(scheduler: Any, steps: int, image_seq_len: int = FLUX_LATENTS[1]) -> torch.Tensor:
    """FluxPipeline.__call__'s step 5, line for line: its sigmas (dropped for a flow-sigma solver) and its `mu`."""
    sigmas: Any = np.linspace(1.0, 1 / steps, steps)
    if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
        sigmas = None
    mu = pipeline_flux.calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = pipeline_flux.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


def set_like_sd3(scheduler: Any, steps: int) -> torch.Tensor:
    """StableDiffusion3Pipeline.__call__ with its defaults: `num_inference_steps`, `sigmas=None`, no `mu` (the SD3
    checkpoints do not shift dynamically)."""
    assert not scheduler.config.get("use_dynamic_shifting", None)
    timesteps, _ = pipeline_stable_diffusion_3.retrieve_timesteps(scheduler, steps, "cpu", sigmas=None)
    return timesteps


CHECKPOINTS = {
    "flux": (flux_checkpoint, set_like_flux, FLUX_LATENTS),
    "sd3": (sd3_checkpoint, set_like_sd3, SD3_LATENTS),
}


def run_steps(scheduler: Any, timesteps: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Every step of the schedule on random model outputs, as the pipelines call `step`, plus a generator for a
    scheduler that takes one (UniPC's `step` does not)."""
    data = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=data)
    noise = torch.Generator().manual_seed(seed + 1)
    extra = {"generator": noise} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        velocity = torch.randn(shape, generator=data)
        latents = scheduler.step(velocity, t, latents, return_dict=False, **extra)[0]
        assert latents.shape == shape
        assert torch.isfinite(latents).all()
    return latents


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
@pytest.mark.parametrize("name", NAMES)
def test_every_flow_sampler_sets_its_schedule_the_pipelines_way_and_steps(checkpoint: str, name: str) -> None:
    make_checkpoint, set_timesteps, shape = CHECKPOINTS[checkpoint]
    scheduler, _ = make_flow_scheduler(name, make_checkpoint())
    timesteps = set_timesteps(scheduler, STEPS)

    assert len(timesteps) == STEPS
    sigmas = scheduler.sigmas
    assert torch.isfinite(sigmas).all()
    assert sigmas[0] == pytest.approx(1.0, abs=1e-3) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    out = run_steps(scheduler, timesteps, shape, seed=7)
    assert out.shape == shape


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "lcm", "flow_euler_sde"])
def test_flux_dynamic_shifting_carries_over_to_every_sampler(name: str) -> None:
    """Under the Flux pipeline's call each sampler lands on the checkpoint's own schedule (the solvers pick their
    sigmas on a grid of their own, hence the tolerance), at a small and at a large image alike, and the two
    schedules differ: the shift follows the resolution."""
    schedules = []
    for image_seq_len in (16, 4096):
        reference, _ = make_flow_scheduler("default", flux_checkpoint())
        set_like_flux(reference, STEPS, image_seq_len)
        scheduler, _ = make_flow_scheduler(name, flux_checkpoint())
        assert scheduler.config.use_dynamic_shifting
        set_like_flux(scheduler, STEPS, image_seq_len)
        assert torch.allclose(scheduler.sigmas, reference.sigmas, atol=0.005)
        schedules.append(scheduler.sigmas)
    assert (schedules[1] - schedules[0]).abs().max() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_the_pipeline_reads_the_checkpoints_dynamic_shift_settings_from_every_sampler(name: str) -> None:
    """Set and defaulted (max_image_seq_len) alike: `from_config` alone drops the defaulted ones."""
    checkpoint = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3, base_image_seq_len=128
    )
    scheduler, _ = make_flow_scheduler(name, checkpoint)
    for key in ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
        assert scheduler.config.get(key) == checkpoint.config[key], key


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_the_solvers_take_the_sd3_shift_on_flow_sigmas(name: str) -> None:
    """Each sigma of the solver's grid shifted by 3 as SD3 shifts: s' = 3s / (1 + 2s)."""
    scheduler, used = make_flow_scheduler(name, sd3_checkpoint())
    set_like_sd3(scheduler, STEPS)
    unshifted, _ = make_flow_scheduler(name, FlowMatchEulerDiscreteScheduler(shift=1.0))
    set_like_sd3(unshifted, STEPS)

    assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
    assert scheduler.config.flow_shift == 3.0 and used.options["flow_shift"] == 3.0
    grid = unshifted.sigmas
    assert torch.allclose(scheduler.sigmas, 3 * grid / (1 + 2 * grid), atol=1e-3)
    assert (scheduler.sigmas - grid).abs().max() > 0.1


def test_the_samplers_are_the_classes_and_options_their_names_stand_for() -> None:
    checkpoint = flux_checkpoint()
    expected = {
        "flow_euler": (FlowMatchEulerDiscreteScheduler, "Euler (flow)"),
        "flow_euler_sde": (FlowMatchEulerDiscreteScheduler, "Euler SDE (flow)"),
        "dpmpp_2m": (DPMSolverMultistepScheduler, "DPM++ 2M (flow)"),
        "unipc": (UniPCMultistepScheduler, "UniPC (flow)"),
        "lcm": (FlowMatchLCMScheduler, "LCM (flow)"),
    }
    assert set(FLOW_SAMPLERS) == set(expected)
    for name, (cls, label) in expected.items():
        scheduler, used = make_flow_scheduler(name, checkpoint)
        assert type(scheduler) is cls
        assert (used.name, used.label, used.cls) == (name, label, cls.__name__)
    euler, euler_sde = (
        make_flow_scheduler("flow_euler", checkpoint)[0],
        make_flow_scheduler("flow_euler_sde", checkpoint)[0],
    )
    assert not euler.config.stochastic_sampling and euler_sde.config.stochastic_sampling
    dpm = make_flow_scheduler("dpmpp_2m", checkpoint)[0]
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)


def test_default_is_a_fresh_copy_of_the_checkpoints_own_scheduler() -> None:
    checkpoint = flux_checkpoint()
    scheduler, used = make_flow_scheduler("default", checkpoint)
    assert scheduler is not checkpoint and type(scheduler) is type(checkpoint)
    assert dict(scheduler.config) == dict(checkpoint.config)
    assert (used.label, used.cls, used.options) == ("Euler (flow)", "FlowMatchEulerDiscreteScheduler", {})
    stochastic = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    assert make_flow_scheduler("default", stochastic)[1].label == "Euler SDE (flow)"


def test_a_solvers_dynamic_shift_does_not_leak_into_the_next_job() -> None:
    """DPMSolverMultistepScheduler.set_timesteps(mu=...) writes exp(mu) into its config's flow_shift."""
    checkpoint = flux_checkpoint()
    first, _ = make_flow_scheduler("dpmpp_2m", checkpoint)
    set_like_flux(first, STEPS, image_seq_len=4096)
    assert first.config.flow_shift == pytest.approx(np.exp(1.15))
    second, _ = make_flow_scheduler("dpmpp_2m", checkpoint)
    assert second.config.flow_shift == 3.0 and checkpoint.config.shift == 3.0
    assert "flow_shift" not in checkpoint.config


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_the_stochastic_sampler_follows_its_generator_and_the_deterministic_one_ignores_it(checkpoint: str) -> None:
    make_checkpoint, set_timesteps, shape = CHECKPOINTS[checkpoint]

    def final(name: str, seed: int) -> torch.Tensor:
        scheduler, _ = make_flow_scheduler(name, make_checkpoint())
        return run_steps(scheduler, set_timesteps(scheduler, STEPS), shape, seed=seed)

    def noise_only(name: str, noise_seed: int) -> torch.Tensor:
        """The same latents and model outputs, only the step's generator seeded differently."""
        scheduler, _ = make_flow_scheduler(name, make_checkpoint())
        timesteps = set_timesteps(scheduler, STEPS)
        data = torch.Generator().manual_seed(0)
        latents = torch.randn(shape, generator=data)
        noise = torch.Generator().manual_seed(noise_seed)
        for t in timesteps:
            latents = scheduler.step(torch.randn(shape, generator=data), t, latents, generator=noise)[0]
        return latents

    assert not torch.equal(final("flow_euler", 3), final("flow_euler_sde", 3))
    assert torch.equal(noise_only("flow_euler_sde", 1), noise_only("flow_euler_sde", 1))
    assert not torch.equal(noise_only("flow_euler_sde", 1), noise_only("flow_euler_sde", 2))
    assert torch.equal(noise_only("flow_euler", 1), noise_only("flow_euler", 2))


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - set(flow_sampler_names())))
def test_an_a1111_only_name_is_refused_with_the_list_of_flow_samplers(name: str) -> None:
    with pytest.raises(UnsupportedSpecError) as refused:
        check_flow_sampler(name, "flux-dev")
    message = str(refused.value)
    assert message.startswith("scheduler: ")
    assert "'flux-dev'" in message and repr(name) in message
    for accepted in flow_sampler_names():
        assert accepted in message


def test_the_refused_names_are_the_sd_only_ones() -> None:
    refused = set()
    for name in SCHEDULERS:
        try:
            check_flow_sampler(name, "sd3.5-medium")
        except UnsupportedSpecError:
            refused.add(name)
    assert refused == {"euler", "euler_a", "heun", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "ddim"}
    for name in flow_sampler_names():
        check_flow_sampler(name, "sd3.5-medium")


def tiny_builder(module: str) -> Any:
    """`build` of a tiny flow pipeline module written in parallel (tiny_flux, tiny_sd3); None while it is missing
    or does not import."""
    try:
        return importlib.import_module(f"worker.models.{module}").build
    except Exception:  # noqa: BLE001 - any failure to import means the module is not ready yet
        return None


PIPELINES: dict[str, dict[str, Any]] = {
    "tiny_flux": {"guidance_scale": 3.5},
    "tiny_sd3": {"guidance_scale": 1.0},  # no second (unconditional) batch; the guided path is not ours to test
}


@pytest.fixture(scope="module")
def tiny_pipelines() -> dict[str, Any]:
    """Each tiny flow pipeline that imports, built once for the module."""
    return {module: build() for module in PIPELINES if (build := tiny_builder(module)) is not None}


def pipeline(pipelines: dict[str, Any], module: str) -> Any:
    if module not in pipelines:
        pytest.skip(f"worker/models/{module}.py is not there yet or does not import")
    return pipelines[module]


def render(pipe: Any, name: str, global_seed: int = 0, **arguments: Any) -> np.ndarray:
    """A 3-step 64x64 text2img with a fresh `name` scheduler, the pipeline's generator seeded with 0; the
    checkpoint's scheduler is back afterwards."""
    checkpoint = pipe.scheduler
    pipe.scheduler, _ = make_flow_scheduler(name, checkpoint)
    torch.manual_seed(global_seed)
    try:
        image: np.ndarray = pipe(
            "a lighthouse at dusk",
            num_inference_steps=3,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **arguments,
        ).images
        assert pipe.scheduler.step_index == 3  # every step went through this scheduler
    finally:
        pipe.scheduler = checkpoint
    return image


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(PIPELINES))
@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_flow_pipeline_renders_with_every_flow_sampler(
    tiny_pipelines: dict[str, Any], module: str, name: str
) -> None:
    image = render(pipeline(tiny_pipelines, module), name, **PIPELINES[module])
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


@pytest.mark.slow
def test_the_flux_pipeline_does_not_hand_its_generator_to_a_stochastic_sampler(tiny_pipelines: dict[str, Any]) -> None:
    """The same job seed, two seeds of torch's global generator: the deterministic sampler renders the same
    image, the stochastic one does not, since FluxPipeline calls `scheduler.step` without its generator. This
    fails the day diffusers passes it, and the global seeding in a renderer can go."""
    pipe = pipeline(tiny_pipelines, "tiny_flux")
    for name, same in (("flow_euler", True), ("flow_euler_sde", False)):
        first = render(pipe, name, global_seed=1, guidance_scale=3.5)
        second = render(pipe, name, global_seed=2, guidance_scale=3.5)
        assert np.array_equal(first, second) is same, name
