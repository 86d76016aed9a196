"""Initial latents from seeds, variation seeds and perturbations.

Each image's noise comes from its own CPU ``torch.Generator`` seeded by its seed, so it never
depends on the batch, the actor count or the GPU (DESIGN.md, reproducibility).
"""

from __future__ import annotations

import math

import torch

# Stable Diffusion's geometry (SD 1.x, 2.x and SDXL alike): the VAE maps 8x8 pixels to one latent
# with 4 channels. The render core reads both from the model (Components.latent_channels, .vae_scale_factor).
LATENT_CHANNELS = 4
VAE_SCALE = 8


def latent_shape(
    width: int, height: int, channels: int = LATENT_CHANNELS, scale: int = VAE_SCALE
) -> tuple[int, int, int]:
    """The (C, H / scale, W / scale) shape of one image's latents."""
    return (channels, height // scale, width // scale)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for one image; later random draws of that image (ancestral steps) use it too."""
    return torch.Generator("cpu").manual_seed(seed)


def initial_noise(generator: torch.Generator, shape: tuple[int, int, int]) -> torch.Tensor:
    """Unit-variance float32 noise of one image's latent shape (``latent_shape``), drawn on the CPU."""
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation over the whole tensor; t=0 gives ``v0`` and t=1 gives ``v1`` exactly.

    As in A1111's variation seeds; nearly parallel inputs fall back to a straight line.
    """
    if t == 0:
        return v0
    if t == 1:
        return v1
    a, b = v0.double(), v1.double()
    dot = (a * b).sum() / (a.norm() * b.norm())
    if dot.abs() > dot_threshold:
        mixed = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        mixed = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return mixed.to(v0.dtype)


def perturb(base: torch.Tensor, other: torch.Tensor, scale: float) -> torch.Tensor:
    """The notebook's latent perturbation: base + scale x other, renormalised to unit variance.

    Both are independent unit-variance noise, so their sum has variance 1 + scale^2;
    scale 0 gives ``base`` exactly.
    """
    if scale == 0:
        return base
    return (base + scale * other) / math.sqrt(1 + scale * scale)


def task_noise(
    generator: torch.Generator,
    shape: tuple[int, int, int],
    variation_seed: int | None = None,
    variation_strength: float = 0.0,
    perturb_scale: float = 0.0,
) -> torch.Tensor:
    """One image's starting noise: its seed's noise, moved towards a variation seed's noise.

    The variation noise comes from a generator of its own, so the seed's generator is left
    exactly where plain rendering leaves it (ancestral steps draw from it next).
    """
    noise = initial_noise(generator, shape)
    if variation_seed is None:
        return noise
    other = initial_noise(make_generator(variation_seed), shape)
    if perturb_scale:
        return perturb(noise, other, perturb_scale)
    return slerp(variation_strength, noise, other)
