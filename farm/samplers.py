"""Samplers: the names a job uses -> diffusers schedulers built from the model's own config,
and the facts about them the denoising loop needs (which steps draw noise, which calls start a
step, the current sigma). No Ray, no files.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# spec.SCHEDULERS name -> (diffusers class name, config overrides).
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def build_scheduler(name: str, base_config: dict[str, Any], schedule_type: str = "automatic") -> Any:
    """A fresh scheduler of the named kind, from the model's own scheduler config."""
    import diffusers

    class_name, overrides = SCHEDULER_CLASSES[name]
    cls = getattr(diffusers, class_name)
    config = {**base_config, **overrides}
    if "_use_default_values" in config:  # diffusers would put its defaults back over our overrides
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in overrides]
    return cls.from_config(config)


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The config that rebuilds this scheduler exactly, as plain JSON values."""
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")} | {
        "_class_name": type(scheduler).__name__
    }


def step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """Extra ``scheduler.step`` arguments: per-image generators for schedulers that draw noise."""
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generators} if "generator" in params else {}


def is_sigma_scheduler(scheduler: Any) -> bool:
    """k-diffusion-style samplers keep latents as x0 + sigma * noise (their initial sigma is > 1)."""
    return float(scheduler.init_noise_sigma) > 1.0


def current_sigma(scheduler: Any) -> float:
    """The noise level of the latents the next ``step`` call receives (sigma samplers)."""
    index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
    return float(scheduler.sigmas[min(index, len(scheduler.sigmas) - 1)])


def step_marks(scheduler: Any, timesteps: torch.Tensor) -> tuple[list[bool], list[bool]]:
    """Which loop iterations start a sampler step, and which complete one.

    Most samplers call the UNet once per step. Heun calls it twice (2N - 1 calls for N
    steps; the last step is a plain Euler step). PNDM (PLMS) makes its first step of two
    calls: the second corrects the first from the same starting sample, and ignores the
    sample it is given. Captures and guidance losses count sampler steps, not UNet calls.
    """
    n = len(timesteps)
    if scheduler.order == 2:
        return [i % 2 == 0 for i in range(n)], [i % 2 == 1 or i == n - 1 for i in range(n)]
    if type(scheduler).__name__ == "PNDMScheduler" and n > 1:
        return [i != 1 for i in range(n)], [i != 0 for i in range(n)]
    return [True] * n, [True] * n
