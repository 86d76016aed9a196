"""Samplers: the names a job uses -> diffusers schedulers built from the model's own config,
and the facts about them the denoising loop needs (which steps draw noise, which calls start a
step, the current sigma). No Ray, no files.

The loop never waits for the device (issue 16): schedulers step on host timesteps, so the tables
they index stay on the host, and step noise drawn on the images' CPU generators reaches the
device by asynchronous copies (``to_device``, ``async_step_noise``). Every value is the one the
device path computed before, on the same device, so the images keep their bytes.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    if class_name == "LCMScheduler":
        return host_lcm_class()
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
                self.noise_sampler = lambda sigma, sigma_next: to_device(trees(sigma, sigma_next).to(dtype), device)
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


@functools.cache
def host_lcm_class() -> type:
    """diffusers' LCMScheduler stepping on host timesteps, its boundary scalings still on the device.

    With a device timestep, LCM's step indexed its host table with it and branched on it (each a
    host sync) and computed c_skip and c_out on the device. With a host timestep the table lookups
    stay on the host; the scalings are computed there (float32, the same operations) and copied to
    the sample's device, so they act on the latents exactly as the device's own did.
    """
    from diffusers import LCMScheduler

    class HostLCMScheduler(LCMScheduler):
        """diffusers' LCMScheduler whose boundary scalings go to the sample's device."""

        sample_device: torch.device | None = None  # the device of the sample ``step`` was given

        def step(
            self,
            model_output: torch.Tensor,
            timestep: int | torch.Tensor,
            sample: torch.Tensor,
            generator: list[torch.Generator] | None = None,  # named: step_kwargs passes the images' generators
            return_dict: bool = True,
        ) -> Any:
            """One step of diffusers' LCMScheduler, remembering where its sample lives."""
            self.sample_device = sample.device
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

        def get_scalings_for_boundary_condition_discrete(self, timestep: Any) -> tuple[Any, Any]:
            """diffusers' c_skip and c_out, on the sample's device."""
            c_skip, c_out = super().get_scalings_for_boundary_condition_discrete(timestep)
            if self.sample_device is None or not isinstance(c_skip, torch.Tensor):
                return c_skip, c_out
            return to_device(c_skip, self.sample_device), to_device(c_out, self.sample_device)

    return HostLCMScheduler


# ---------------------------------------------------------------------------------------
# Host and device: what the loop reads without waiting for the device


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without a host sync: a CUDA copy from pageable host memory waits for
    the device to finish its queue, one from pinned memory is queued behind it instead."""
    device = torch.device(device)
    if tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def async_randn_tensor(
    shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None
) -> torch.Tensor:
    """diffusers' ``randn_tensor``, its draws on CPU generators copied to the device by ``to_device``."""
    from diffusers.utils.torch_utils import randn_tensor

    first = generator[0] if isinstance(generator, list) else generator
    if device is None or first is None or first.device.type != "cpu":
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)
    # The same draws, in the same order, as randn_tensor makes on the CPU for a CPU generator.
    noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype, layout=layout)
    return to_device(noise, device)


@contextmanager
def async_step_noise(scheduler: Any) -> Iterator[None]:
    """While inside, the step noise the scheduler draws (euler_a, dpmpp_2m_sde, lcm: diffusers'
    ``randn_tensor`` on each image's CPU generator) reaches the device without a host sync.

    diffusers' steps take no noise from outside (DPM-Solver's ``variance_noise`` aside), so its
    scheduler module's ``randn_tensor`` is swapped for ``async_randn_tensor``: the same numbers,
    only the copy no longer waits. Renders run one at a time per process (the actor's lock).
    """
    modules = {sys.modules[c.__module__] for c in type(scheduler).__mro__ if c.__module__.startswith("diffusers.")}
    swapped = [m for m in modules if hasattr(m, "randn_tensor")]
    real = {m: m.randn_tensor for m in swapped}
    for module in swapped:
        module.randn_tensor = async_randn_tensor
    try:
        yield
    finally:
        for module in swapped:
            module.randn_tensor = real[module]


def keep_host_alphas(scheduler: Any) -> torch.Tensor:
    """The scheduler's alphas_cumprod on the host, kept before ``add_noise`` moves its table to the
    latents' device (img2img), so a guidance step can read it without a host sync."""
    kept = getattr(scheduler, "host_alphas_cumprod", None)
    if kept is None:
        kept = scheduler.alphas_cumprod.cpu()
        scheduler.host_alphas_cumprod = kept
    return kept


def alpha_at(scheduler: Any, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """alphas_cumprod at host timestep ``t`` as a 0-d tensor on ``device``, without a host sync:
    from the scheduler's own table where it already lives there, else from the host copy."""
    table = scheduler.alphas_cumprod
    if table.device == device:
        return table[int(t)]
    return to_device(keep_host_alphas(scheduler)[int(t)], device)


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
