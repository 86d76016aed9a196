"""Initial latents from seeds.

Each image's noise comes from its own CPU ``torch.Generator`` seeded by its seed, so it never
depends on the batch, the actor count or the GPU (DESIGN.md, reproducibility).
"""

from __future__ import annotations

import torch

# Stable Diffusion's VAE maps 8x8 pixels to one latent with 4 channels.
LATENT_CHANNELS = 4
VAE_SCALE = 8


def latent_shape(width: int, height: int) -> tuple[int, int, int]:
    """The (C, H/8, W/8) shape of one image's latents."""
    return (LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for one image; later random draws of that image (ancestral steps) use it too."""
    return torch.Generator("cpu").manual_seed(seed)


def initial_noise(generator: torch.Generator, width: int, height: int) -> torch.Tensor:
    """Unit-variance float32 noise of one image's latent shape, drawn on the CPU."""
    return torch.randn(latent_shape(width, height), generator=generator, dtype=torch.float32)


def prepare_latents(
    generators: list[torch.Generator], width: int, height: int, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """Stack each image's own noise into a batch and move it to the device."""
    noise = torch.stack([initial_noise(g, width, height) for g in generators])
    return noise.to(device=device, dtype=dtype)
