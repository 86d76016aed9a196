"""The denoising core: plain functions over loaded components. No Ray, no files.

``render_batch`` runs the steps in order, the way a diffusers pipeline's ``__call__`` does;
each step is a small function that later techniques extend rather than copy.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from farm.models import Components
from farm.noise import make_generator, prepare_latents
from farm.spec import RenderTask

# How many latents the VAE decodes at once: its activations at full resolution dominate
# peak memory (a 512x512 decode is ~3 GB at batch 8 in fp16), so decode in slices.
VAE_DECODE_CHUNK = 4

# spec.SCHEDULERS name -> (diffusers class name, config overrides).
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def build_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler of the named kind, from the model's own scheduler config."""
    import diffusers

    class_name, overrides = SCHEDULER_CLASSES[name]
    cls = getattr(diffusers, class_name)
    return cls.from_config({**base_config, **overrides})


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The config that rebuilds this scheduler exactly, as plain JSON values."""
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")} | {
        "_class_name": type(scheduler).__name__
    }


def encode_prompts(components: Components, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings (N, 77, d) for each prompt; each distinct prompt is encoded once."""
    distinct = list(dict.fromkeys(prompts))
    tokens = components.tokenizer(
        distinct,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        embeds = components.text_encoder(tokens.input_ids.to(components.device))[0]
    index = torch.tensor([distinct.index(p) for p in prompts], device=embeds.device)
    return embeds.index_select(0, index)


def step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """Extra ``scheduler.step`` arguments: per-image generators for schedulers that draw noise."""
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generators} if "generator" in params else {}


def denoise(
    components: Components,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    guidance: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The sampling loop with classifier-free guidance (Ho & Salimans, 2022)."""
    do_cfg = guidance > 1.0
    context = torch.cat([uncond_embeds, text_embeds]) if do_cfg else text_embeds
    extra = step_kwargs(scheduler, generators)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        with torch.no_grad():
            noise_pred = components.unet(model_input, t, encoder_hidden_states=context).sample
        if do_cfg:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra).prev_sample
    return latents


def decode_latents(components: Components, latents: torch.Tensor, chunk: int = VAE_DECODE_CHUNK) -> np.ndarray:
    """Latents -> uint8 RGB images (N, H, W, 3), decoded a few at a time to bound memory."""
    vae = components.vae
    images = []
    for start in range(0, latents.shape[0], chunk):
        part = latents[start : start + chunk] / vae.config.scaling_factor
        with torch.no_grad():
            decoded = vae.decode(part.to(vae.dtype)).sample
        decoded = (decoded / 2 + 0.5).clamp(0, 1)
        images.append(decoded.cpu().permute(0, 2, 3, 1).float().numpy())
    return (np.concatenate(images) * 255).round().astype(np.uint8)


def check_batch(tasks: Sequence[RenderTask]) -> None:
    """Every task in a batch must share what the UNet batch shares."""
    if not tasks:
        raise ValueError("empty batch")
    keys = {t.batch_key for t in tasks}
    if len(keys) != 1:
        raise ValueError(f"tasks in one batch differ in model/size/steps/scheduler/guidance: {sorted(keys)}")


def render_batch(components: Components, tasks: Sequence[RenderTask]) -> tuple[np.ndarray, dict[str, Any]]:
    """Render tasks that share a batch key; returns uint8 images and the scheduler config used."""
    # 1. Check inputs
    check_batch(tasks)
    first = tasks[0]
    device = components.device
    dtype = components.unet.dtype

    # 2. Encode prompts (each distinct prompt once)
    embeds = encode_prompts(components, [t.prompt for t in tasks] + [t.negative_prompt for t in tasks])
    text_embeds, uncond_embeds = embeds[: len(tasks)], embeds[len(tasks) :]

    # 3. Prepare timesteps
    scheduler = build_scheduler(first.scheduler, components.scheduler_config)
    scheduler.set_timesteps(first.steps, device=device)

    # 4. Prepare latents: each image's own CPU-generator noise
    generators = [make_generator(t.seed) for t in tasks]
    latents = prepare_latents(generators, first.width, first.height, device, dtype)
    latents = latents * scheduler.init_noise_sigma

    # 5. Denoise
    latents = denoise(components, scheduler, latents, text_embeds, uncond_embeds, first.guidance, generators)

    # 6. Decode
    return decode_latents(components, latents), scheduler_config(scheduler)
