"""Samplers: the names a job uses -> diffusers schedulers built from the model's own config,
and the facts about them the denoising loop needs (which steps draw noise, which calls start a
step, the current sigma). No Ray, no files.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from farm.spec import schedule_type_error

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
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}

# Schedule type -> the config flag that turns it on.
SCHEDULE_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}
# The spacing flags diffusers takes one of at most (it raises on two, and DPM-Solver quietly
# prefers some): a chosen schedule type turns the others off, as a model's config may set one.
SPACING_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
# torch.randint's exclusive bound for a Brownian tree's entropy: the int64 seeds torch takes.
ENTROPY_BOUND = 2**63 - 1
# diffusers' Brownian trees resolve times to 1e-6 and round their ends to it, so a tree over
# exactly [sigma_min, sigma_max] could end just inside the schedule (torchsde then warns and
# clamps); a tree this much wider holds every sigma the sampler asks about.
TREE_MARGIN = 1e-6


def build_scheduler(name: str, base_config: dict[str, Any], schedule_type: str = "automatic") -> Any:
    """A fresh scheduler of the named kind from the model's own scheduler config, its sigmas
    spaced as A1111's schedule type says: ``automatic`` keeps the config's own spacing.

    Raises ValueError for a schedule type the sampler does not take (``schedule_type_error``).
    """
    error = schedule_type_error(name, schedule_type)
    if error:
        raise ValueError(error)
    class_name, overrides = SCHEDULER_CLASSES[name]
    cls = diffusers_class(class_name)
    if schedule_type in SCHEDULE_FLAGS:
        known = inspect.signature(cls.__init__).parameters
        flags = {f: f == SCHEDULE_FLAGS[schedule_type] for f in SPACING_FLAGS if f in known}
        overrides = {**overrides, **flags}
    config = {**base_config, **overrides}
    if "_use_default_values" in config:  # diffusers would put its defaults back over our overrides
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in overrides]
    return cls.from_config(config)


def diffusers_class(class_name: str) -> type:
    """The scheduler class to build: diffusers' own, or farm's per-image-noise subclass of it."""
    import diffusers

    if class_name == "DPMSolverSDEScheduler":
        return per_image_sde_class()
    if class_name == "UniPCMultistepScheduler":
        return movable_unipc_class()
    return getattr(diffusers, class_name)


@functools.cache
def per_image_sde_class() -> type:
    """diffusers' DPMSolverSDEScheduler (A1111's DPM++ SDE) with one Brownian tree per image.

    diffusers grows one tree for the whole batch, from a config seed, on the latents' device,
    so an image's noise would depend on its batch and GPU. Here each image's tree is seeded by a
    number drawn from that image's own generator (after its starting noise) and grown on the
    CPU in float32, then its noise is moved to the latents: the same seed gives the same noise
    on any device and batch (DESIGN.md, reproducibility).
    """
    from diffusers import DPMSolverSDEScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    class PerImageDPMSolverSDEScheduler(DPMSolverSDEScheduler):
        """diffusers' DPMSolverSDEScheduler whose ``step`` takes the per-image generators."""

        def step(
            self,
            model_output: torch.Tensor,
            timestep: float | torch.Tensor,
            sample: torch.Tensor,
            generator: list[torch.Generator] | None = None,
            return_dict: bool = True,
            s_noise: float = 1.0,
        ) -> Any:
            """One step of diffusers' DPMSolverSDEScheduler, its noise from per-image CPU trees."""
            if self.noise_sampler is None and generator is not None:
                entropy = [int(torch.randint(ENTROPY_BOUND, (), generator=g)) for g in generator]
                positive = self.sigmas[self.sigmas > 0]
                low, high = positive.min().item() - TREE_MARGIN, positive.max().item() + TREE_MARGIN
                shape = torch.zeros(sample.shape, dtype=torch.float32)  # only its shape is used: CPU, float32
                trees = BrownianTreeNoiseSampler(shape, low, high, entropy)
                device, dtype = sample.device, sample.dtype
                self.noise_sampler = lambda sigma, sigma_next: trees(sigma, sigma_next).to(device, dtype)
            return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)

    return PerImageDPMSolverSDEScheduler


@functools.cache
def movable_unipc_class() -> type:
    """diffusers' UniPCMultistepScheduler that keeps what the loop does to the sample between steps.

    UniPC's corrector (UniC) recomputes the sample it is given from the previous step's, so a
    move the loop makes (a guidance loss's gradient step) would be lost. Here the move is added
    to the corrected sample; with no move it adds exactly zero, so the result is diffusers' own.
    """
    from diffusers import UniPCMultistepScheduler

    class MovableUniPCMultistepScheduler(UniPCMultistepScheduler):
        """diffusers' UniPCMultistepScheduler whose corrector keeps the loop's moves."""

        returned: torch.Tensor | None = None  # the sample the last step returned

        def multistep_uni_c_bh_update(self, *args: Any, this_sample: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            """diffusers' corrector, plus the loop's move of the sample since the last step."""
            corrected = super().multistep_uni_c_bh_update(*args, this_sample=this_sample, **kwargs)
            return corrected + (this_sample - self.returned)

        def step(self, *args: Any, **kwargs: Any) -> Any:
            """One step of diffusers' UniPCMultistepScheduler, remembering the sample it returns."""
            output = super().step(*args, **kwargs)
            self.returned = output[0]
            return output

    return MovableUniPCMultistepScheduler


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The config that rebuilds this scheduler exactly, as plain JSON values."""
    diffusers_name = next(c.__name__ for c in type(scheduler).__mro__ if c.__module__.startswith("diffusers."))
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")} | {"_class_name": diffusers_name}


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

    Most samplers call the UNet once per step (DPM++ 2M and 2M SDE, UniPC and LCM too). Heun
    and DPM++ SDE call it twice (2N - 1 calls for N steps; the last step is a plain Euler step),
    and their second call ignores the sample it is given. PNDM (PLMS) makes its first step of two
    calls: the second corrects the first from the same starting sample, and ignores the
    sample it is given. Captures and guidance losses count sampler steps, not UNet calls.
    """
    n = len(timesteps)
    if scheduler.order == 2:
        return [i % 2 == 0 for i in range(n)], [i % 2 == 1 or i == n - 1 for i in range(n)]
    if type(scheduler).__name__ == "PNDMScheduler" and n > 1:
        return [i != 1 for i in range(n)], [i != 0 for i in range(n)]
    return [True] * n, [True] * n
