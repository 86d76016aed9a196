"""The denoising core: plain functions over loaded components. No Ray, no files.

``render_batch`` runs the steps in order, the way a diffusers pipeline's ``__call__`` does;
each step is a small function that later techniques extend rather than copy. Inputs arrive as
values: init images as pixels, textual-inversion files as vectors (``farm.embeddings`` reads them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from farm.losses import LossFunction, load_loss, per_image
from farm.models import Components
from farm.noise import make_generator, slerp, task_noise
from farm.samplers import build_scheduler, current_sigma, is_sigma_scheduler, scheduler_config, step_kwargs, step_marks
from farm.spec import BATCH_FIELDS, GuidanceLoss, RenderTask
from farm.text import LoadedEmbedding, PromptEncoder, PromptError, pad_chunks

# How many latents the VAE decodes at once: its activations at full resolution dominate
# peak memory (a 512x512 decode is ~3 GB at batch 8 in fp16), so decode in slices.
VAE_DECODE_CHUNK = 4

# Prompt encoders kept per model (one per set of textual-inversion files and long-prompt mode);
# each holds up to text.CACHE_SIZE encoded prompts.
ENCODERS_KEPT = 8


class TaskInputError(ValueError):
    """Inputs of some tasks in a batch cannot be used; ``errors`` maps batch index -> message.

    Raised before any denoising, so the caller can drop those tasks (each gets a failed
    row with its message) and render the rest of the batch.
    """

    def __init__(self, errors: dict[int, str]) -> None:
        super().__init__("; ".join(f"task {i}: {m}" for i, m in sorted(errors.items())))
        self.errors = errors


@dataclass
class RenderResult:
    """What one batch produced, in task order."""

    images: np.ndarray  # (N, H, W, 3) uint8
    scheduler_config: dict[str, Any]
    prompt_tokens: list[int]
    prompt_truncated: list[bool]
    # capture kind -> (frames, N, H, W, 3) uint8, frame f of task n at [f, n]
    frames: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Conditioning:
    """Per-task text conditioning, padded to one sequence length for the batch."""

    text: torch.Tensor  # (N, 77k, d)
    uncond: torch.Tensor  # (N, 77k, d)
    tokens: list[int]
    truncated: list[bool]


def prompt_encoder(components: Components, embeddings: Sequence[LoadedEmbedding], long_prompt: str) -> PromptEncoder:
    """The model's prompt encoder for these textual-inversion files and long-prompt mode, kept
    across batches: building one copies the tokenizer, and its cache spares re-encoding a grid's
    prompts in every batch (the embeddings are the same bits either way)."""
    key = (tuple(e.embedding for e in embeddings), long_prompt)
    kept = components.encoders
    encoder = kept.pop(key, None) or PromptEncoder(components, embeddings, long_prompt)
    kept[key] = encoder  # most recently used last
    while len(kept) > ENCODERS_KEPT:
        kept.pop(next(iter(kept)))
    return encoder


def encode_conditioning(
    components: Components, tasks: Sequence[RenderTask], embeddings: Sequence[LoadedEmbedding] = ()
) -> Conditioning:
    """Each task's prompt (or prompt mix) and negative prompt as text embeddings; ``embeddings``
    holds the vectors of the batch's textual-inversion files.

    Raises ``TaskInputError`` naming every task whose prompt, token mix or embedding
    this model cannot use.
    """
    first = tasks[0]
    try:
        encoder = prompt_encoder(components, embeddings, first.long_prompt)
    except PromptError as exc:  # the embeddings are a batch field: every task shares the problem
        raise TaskInputError(dict.fromkeys(range(len(tasks)), str(exc))) from exc
    texts, unconds, tokens, truncated, errors = [], [], [], [], {}
    empty = encoder.encode("").embeds
    for i, task in enumerate(tasks):
        try:
            if task.mix:
                parts = [encoder.encode(part.prompt) for part in task.mix]
                text = mix_embeddings([p.embeds for p in parts], [m.weight for m in task.mix], task.mix_mode, empty)
            else:
                parts = [encoder.encode(task.prompt, task.token_mix)]
                text = parts[0].embeds
            negative = encoder.encode(task.negative_prompt)
        except PromptError as exc:
            errors[i] = str(exc)
            continue
        texts.append(text)
        unconds.append(negative.embeds)
        tokens.append(max(p.tokens for p in parts))
        truncated.append(any(p.truncated for p in parts) or negative.truncated)
    if errors:
        raise TaskInputError(errors)
    padded = pad_chunks(texts + unconds, empty)
    return Conditioning(padded[: len(tasks)], padded[len(tasks) :], tokens, truncated)


def mix_embeddings(
    embeds: Sequence[torch.Tensor], weights: Sequence[float], mode: str, empty: torch.Tensor
) -> torch.Tensor:
    """Blend prompt embeddings at the text encoder's output: a weighted sum, or slerp of two.

    Weight 1 on one prompt (and 0 on the rest) gives that prompt's embedding exactly.
    Chunked long prompts of different lengths are first padded with ``empty`` chunks.
    """
    if len({e.shape for e in embeds}) > 1:
        embeds = list(pad_chunks(embeds, empty).split(1))
    if mode == "slerp":
        w0, w1 = weights
        return slerp(w1 / (w0 + w1) if w0 + w1 else 0.0, embeds[0], embeds[1])
    mixed = embeds[0] * weights[0]
    for embed, weight in zip(embeds[1:], weights[1:], strict=True):
        mixed = mixed + embed * weight
    return mixed


def resolve_loss(loss: GuidanceLoss | None, count: int) -> tuple[GuidanceLoss, LossFunction] | None:
    """The batch's guidance loss and its function; an import failure fails every task (a batch field)."""
    if loss is None:
        return None
    try:
        return loss, load_loss(loss.name)
    except ValueError as exc:
        raise TaskInputError(dict.fromkeys(range(count), str(exc))) from exc


def prepare_timesteps(scheduler: Any, steps: int, start_step: int, device: str) -> torch.Tensor:
    """The timesteps to run: all of them, or from ``start_step`` on for img2img (as diffusers does)."""
    scheduler.set_timesteps(steps, device=device)
    if start_step >= steps:  # strength 0: nothing to denoise, the init image's latents are the result
        return scheduler.timesteps[:0]
    begin = start_step * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def encode_images(
    components: Components, pixels: Sequence[np.ndarray], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Init images (H, W, 3) uint8 -> latents, sampling the VAE posterior with each task's own generator."""
    vae = components.vae
    latents = []
    for start in range(0, len(pixels), VAE_DECODE_CHUNK):
        chunk = np.stack(pixels[start : start + VAE_DECODE_CHUNK])
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            dist = vae.encode(x.to(components.device, vae.dtype)).latent_dist
        eps = torch.stack(
            [torch.randn(dist.mean.shape[1:], generator=g) for g in generators[start : start + VAE_DECODE_CHUNK]]
        )
        latents.append(dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype))
    return torch.cat(latents) * vae.config.scaling_factor


def prepare_latents(
    components: Components,
    scheduler: Any,
    timesteps: torch.Tensor,
    tasks: Sequence[RenderTask],
    generators: list[torch.Generator],
    init_images: Sequence[np.ndarray | None],
) -> torch.Tensor:
    """Starting latents: each task's noise (its seed, moved towards its variation seed), scaled
    for txt2img, or added to its encoded init image at the first timestep for img2img.

    Each generator draws in a fixed order: the noise, then the VAE posterior sample, then
    (ancestral schedulers) the step noise.
    """
    first = tasks[0]
    dtype = components.unet.dtype
    noise = torch.stack(
        [
            task_noise(g, first.width, first.height, t.variation_seed, t.variation_strength, t.perturb_scale)
            for g, t in zip(generators, tasks, strict=True)
        ]
    ).to(components.device, dtype)
    latents = noise * scheduler.init_noise_sigma
    img2img = [i for i, pixels in enumerate(init_images) if pixels is not None]
    if img2img:
        encoded = encode_images(components, [init_images[i] for i in img2img], [generators[i] for i in img2img])
        index = torch.tensor(img2img, device=latents.device)
        if len(timesteps):
            t = timesteps[:1].repeat(len(img2img))
            encoded = scheduler.add_noise(encoded, noise.index_select(0, index), t)
        latents = latents.index_copy(0, index, encoded.to(dtype))
    return latents


def predicted_x0(scheduler: Any, latents: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latents the model predicts from noisy ``latents``: Ho et al. (2020), eq. 15, for
    noise prediction; Salimans & Ho (2022) for v-prediction (SD 2.x 768); the output itself for
    sample prediction. Written as diffusers' schedulers write ``pred_original_sample``."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "sample":
        return model_output
    if is_sigma_scheduler(scheduler):
        sigma = current_sigma(scheduler)
        if kind == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)
        return latents - sigma * model_output
    alpha = scheduler.alphas_cumprod.to(latents.device)[t.long()].to(latents.dtype)
    if kind == "v_prediction":
        return alpha.sqrt() * latents - (1 - alpha).sqrt() * model_output
    return (latents - (1 - alpha).sqrt() * model_output) / alpha.sqrt()


def guidance_step_size(scheduler: Any, t: torch.Tensor) -> float:
    """sigma^2, the notebook's scale for a loss gradient, in the sampler's own coordinates.

    Sigma samplers hold x = x0 + sigma * noise, so it is sigma^2. DDIM/PNDM/DPM++ hold
    sqrt(a) * (x0 + sigma * noise) with sigma^2 = (1 - a) / a; the same move there is (1 - a).
    """
    if is_sigma_scheduler(scheduler):
        return current_sigma(scheduler) ** 2
    return float(1 - scheduler.alphas_cumprod[int(t)])


def loss_gradient(
    components: Components,
    scheduler: Any,
    latents: torch.Tensor,
    noise_pred: torch.Tensor,
    t: torch.Tensor,
    loss: GuidanceLoss,
    loss_fn: LossFunction,
) -> torch.Tensor:
    """d(scale x loss(decode(x0(latents)))) / d latents, a few images at a time to bound memory.

    Each image's loss is its own term of the sum, so its gradient does not depend on the
    other images in the batch.
    """
    vae = components.vae
    grads = []
    for start in range(0, latents.shape[0], VAE_DECODE_CHUNK):
        part = latents[start : start + VAE_DECODE_CHUNK].detach().requires_grad_()
        with torch.enable_grad():
            x0 = predicted_x0(scheduler, part, noise_pred[start : start + part.shape[0]], t)
            images = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample / 2 + 0.5
            value = per_image(loss_fn(images.float(), loss.target), part.shape[0]).sum() * loss.scale
            grads.append(torch.autograd.grad(value, part)[0])
    return torch.cat(grads)


def denoise(
    components: Components,
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    cond: Conditioning,
    guidance: float,
    generators: list[torch.Generator],
    capture: Sequence[str] = (),
    loss: tuple[GuidanceLoss, LossFunction] | None = None,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """The sampling loop with classifier-free guidance (Ho & Salimans, 2022), an optional
    guidance loss every ``loss.every`` steps, and optional captured latents per step.

    Returns the final latents and, per capture kind, the latents to decode as frames: for
    ``latents`` the starting point and the state after every step (steps + 1 frames), for
    ``x0`` the prediction made at every step.
    """
    do_cfg = guidance > 1.0
    context = torch.cat([cond.uncond, cond.text]) if do_cfg else cond.text
    extra = step_kwargs(scheduler, generators)
    captured: dict[str, list[torch.Tensor]] = {kind: [] for kind in capture}
    if "latents" in captured:
        captured["latents"].append(viewable(scheduler, latents))
    starts, ends = step_marks(scheduler, timesteps)
    step = -1  # sampler steps started so far
    for i, t in enumerate(timesteps):
        step += starts[i]
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        with torch.no_grad():
            noise_pred = components.unet(model_input, t, encoder_hidden_states=context).sample
        if do_cfg:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
        if "x0" in captured and starts[i]:
            captured["x0"].append(predicted_x0(scheduler, latents, noise_pred, t).detach().cpu())
        if loss is not None and starts[i] and step % loss[0].every == 0:
            # The notebook's "make it blue": noise_pred is held fixed, so the gradient flows
            # through x0 = f(latents) and the VAE decoder only, never through the UNet.
            grad = loss_gradient(components, scheduler, latents, noise_pred, t, *loss)
            latents = latents.detach() - grad * guidance_step_size(scheduler, t)
        latents = scheduler.step(noise_pred, t, latents, **extra).prev_sample
        if "latents" in captured and ends[i]:
            captured["latents"].append(viewable(scheduler, latents))
    return latents, captured


def viewable(scheduler: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the UNet sees them (sigma samplers scale them to unit variance), on the CPU."""
    if is_sigma_scheduler(scheduler):
        latents = latents / (current_sigma(scheduler) ** 2 + 1) ** 0.5
    return latents.detach().cpu()


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


def decode_frames(components: Components, steps: list[torch.Tensor], count: int, first: RenderTask) -> np.ndarray:
    """Captured latents (one (N, 4, h, w) per step) -> frames (steps, N, H, W, 3); none when no step ran."""
    if not steps:
        return np.empty((0, count, first.height, first.width, 3), np.uint8)
    pixels = decode_latents(components, torch.cat(steps).to(components.device))
    return pixels.reshape(len(steps), count, first.height, first.width, 3)


def check_batch(tasks: Sequence[RenderTask]) -> None:
    """Every task in a batch must share what the UNet batch shares."""
    if not tasks:
        raise ValueError("empty batch")
    differ = [name for name in BATCH_FIELDS if len({getattr(t, name) for t in tasks}) > 1]
    if differ:
        raise ValueError(f"tasks in one batch differ in {', '.join(differ)}")


def render_batch(
    components: Components,
    tasks: Sequence[RenderTask],
    init_images: Sequence[np.ndarray | None] | None = None,
    embeddings: Sequence[LoadedEmbedding] = (),
) -> RenderResult:
    """Render tasks that share a batch key. ``init_images`` holds each img2img task's init image,
    already fitted to the task size (``images.fit_image``), and None for the others;
    ``embeddings`` the vectors of the batch's textual-inversion files, in order
    (``embeddings.load_embeddings(tasks[0].embeddings)``).

    Raises ``TaskInputError`` (before any denoising) for tasks whose inputs this model cannot use.
    """
    # 1. Check inputs
    check_batch(tasks)
    first = tasks[0]
    init_images = list(init_images) if init_images is not None else [None] * len(tasks)
    if len(init_images) != len(tasks):
        raise ValueError("one init image (or None) per task")
    if tuple(e.embedding for e in embeddings) != first.embeddings:
        raise ValueError("embeddings: the loaded vectors of the batch's textual-inversion files, in order")
    loss_fn = resolve_loss(first.guidance_loss, len(tasks))

    # 2. Encode prompts: mixes, token mixes, textual inversion; each distinct prompt once
    cond = encode_conditioning(components, tasks, embeddings)

    # 3. Prepare timesteps (img2img starts part way)
    scheduler = build_scheduler(first.scheduler, components.scheduler_config, first.schedule_type)
    timesteps = prepare_timesteps(scheduler, first.steps, first.start_step, components.device)

    # 4. Prepare latents: each image's own CPU-generator noise, variations, init images
    generators = [make_generator(t.seed) for t in tasks]
    latents = prepare_latents(components, scheduler, timesteps, tasks, generators, init_images)

    # 5. Denoise (with the guidance loss and step capture the batch asks for)
    latents, captured = denoise(
        components, scheduler, timesteps, latents, cond, first.guidance, generators, first.capture, loss_fn
    )

    # 6. Decode (captured steps too, all frames in VAE-sized chunks)
    frames = {kind: decode_frames(components, steps, len(tasks), first) for kind, steps in captured.items()}
    return RenderResult(
        images=decode_latents(components, latents),
        scheduler_config=scheduler_config(scheduler),
        prompt_tokens=cond.tokens,
        prompt_truncated=cond.truncated,
        frames=frames,
    )
