"""Samplers for flow-matching models (Flux.1, SD3.5), under the names their users know.

These checkpoints ship a FlowMatchEulerDiscreteScheduler, and the A1111 names for SD 1.5 and SDXL do not
carry over: Euler a and Heun are refused by the flow pipelines, and a DPM++ or UniPC solver only works on
flow sigmas with a flow prediction. So a flow model takes its own short list, and each job gets a fresh
scheduler built from the checkpoint's config, as `worker.models.sampling.make_scheduler` does for SD.

The checkpoint's timestep shift carries over to every sampler. SD3 has a fixed `shift` (3.0); Flux shifts by
resolution (`use_dynamic_shifting`), and its pipeline reads `base_image_seq_len`, `max_image_seq_len`,
`base_shift` and `max_shift` from the scheduler's config to work out `mu`, which it passes to
`set_timesteps`. Those keys are written into the new scheduler's config (diffusers' `from_config` drops the ones
the checkpoint's config took by default, and the pipelines' fallbacks are not always the scheduler's defaults:
SD3's `max_shift` is 1.16), and both solvers take `mu` when `use_dynamic_shifting` is on, so the pipeline's own
call works unchanged.

The stochastic samplers (`flow_euler_sde`, `lcm`) draw fresh noise at every step. The Flux and SD3 pipelines
call `scheduler.step` without their generator, so that noise comes from torch's global generator: a seeded job
is reproducible only if the global generator is seeded too.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    UniPCMultistepScheduler,
)

from producer.errors import UnsupportedSpecError
from worker.models.sampling import Sampler, SchedulerUsed

# A multistep solver on flow sigmas: without these a DPM/UniPC scheduler made from a flow config would run the
# DDPM noise schedule with an epsilon prediction, which is meaningless for a flow model. The sigma-schedule
# switches are off because each of them takes precedence over flow sigmas in the solvers' `set_timesteps`.
_FLOW_SOLVER = {
    "use_flow_sigmas": True,
    "prediction_type": "flow_prediction",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}

FLOW_SAMPLERS: dict[str, Sampler] = {
    "flow_euler": Sampler("Euler (flow)", FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": False}),
    "flow_euler_sde": Sampler("Euler SDE (flow)", FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": True}),
    "dpmpp_2m": Sampler(
        "DPM++ 2M (flow)",
        DPMSolverMultistepScheduler,
        {**_FLOW_SOLVER, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "unipc": Sampler("UniPC (flow)", UniPCMultistepScheduler, dict(_FLOW_SOLVER)),
    "lcm": Sampler("LCM (flow)", FlowMatchLCMScheduler),
}
"""The samplers a flow-matching model takes, by the name a job asks for; "default" is the checkpoint's own."""

_SOLVERS_WITH_FLOW_SHIFT = (DPMSolverMultistepScheduler, UniPCMultistepScheduler)
_DYNAMIC_SHIFT_KEYS = ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def flow_sampler_names() -> list[str]:
    """Every name `make_flow_scheduler` takes, "default" first."""
    return ["default", *FLOW_SAMPLERS]


def check_flow_sampler(name: str, model: str) -> None:
    """Refuse a sampler name a flow-matching `model` cannot run (the A1111 names for SD: euler_a, heun, ...)."""
    if name == "default" or name in FLOW_SAMPLERS:
        return
    raise UnsupportedSpecError(
        f"scheduler: {model!r} is a flow-matching model and takes one of {', '.join(flow_sampler_names())}; "
        f"got {name!r}"
    )


def make_flow_scheduler(name: str, checkpoint_scheduler: Any) -> tuple[Any, SchedulerUsed]:
    """A new scheduler for one job: `name`'s class and options over the flow checkpoint's scheduler config.

    A DPM++ or UniPC solver takes the checkpoint's `shift` as its `flow_shift`; the dynamic shifting settings are
    written into every new scheduler's config. A fresh object per job matters more here than for SD: a
    solver's `set_timesteps(mu=...)` writes `exp(mu)` into its own config's `flow_shift`.
    """
    config = checkpoint_scheduler.config
    if name == "default":
        cls: Any = type(checkpoint_scheduler)
        options: dict[str, Any] = {}
        label = _default_label(cls, config)
    else:
        sampler = FLOW_SAMPLERS[name]
        cls, options, label = sampler.cls, dict(sampler.options), sampler.label
        if issubclass(cls, _SOLVERS_WITH_FLOW_SHIFT):
            options["flow_shift"] = float(config.get("shift", config.get("flow_shift", 1.0)))
    scheduler = cls.from_config(config, **options)
    scheduler.register_to_config(**{key: config[key] for key in _DYNAMIC_SHIFT_KEYS if key in config})
    return scheduler, SchedulerUsed(name, label, cls.__name__, options)


def _default_label(cls: Any, config: Any) -> str:
    """The label of the sampler whose class (and, for Euler, randomness) the checkpoint's scheduler matches."""
    stochastic = bool(config.get("stochastic_sampling", False))
    for sampler in FLOW_SAMPLERS.values():
        if sampler.cls is cls and sampler.options.get("stochastic_sampling", stochastic) == stochastic:
            return sampler.label
    return str(cls.__name__)
