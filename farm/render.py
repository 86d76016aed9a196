"""The denoising core: plain functions over loaded components. No Ray, no files.

``render_batch`` runs the steps in order, the way a diffusers pipeline's ``__call__`` does; each step
is a small function. A technique that acts during sampling (step capture, guidance losses) is a step
callback built before the loop from the batch's fields, as k-diffusion's ``callback`` and diffusers'
``callback_on_step_end`` are, so ``denoise`` stays one loop; a model family contributes its
conditioning object (``farm.conditioning``), and ControlNets add their residuals to the UNet's keyword
arguments through it (``Control``); its geometry is read from the model. Inputs arrive as values: init
and control images as pixels, textual-inversion files as vectors (``farm.embeddings`` reads them),
ControlNets as loaded modules (``farm.controlnets.load_controlnets``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from farm.conditioning import NO_CONTROL, Conditioning, Control, TaskInputError, encode_conditioning, prepare_control
from farm.losses import LossFunction, load_loss, per_image
from farm.models import Components
from farm.noise import latent_shape, make_generator, task_noise
from farm.samplers import (
    alpha_at,
    async_step_noise,
    build_scheduler,
    current_sigma,
    is_sigma_scheduler,
    keep_host_alphas,
    scheduler_config,
    step_kwargs,
    step_marks,
    to_device,
)
from farm.spec import BATCH_FIELDS, GuidanceLoss, RenderTask
from farm.text import LoadedEmbedding

# How many latents the VAE decodes at once: its activations at full resolution dominate
# peak memory (a 512x512 decode is ~3 GB at batch 8 in fp16), so decode in slices.
VAE_DECODE_CHUNK = 4


@dataclass
class RenderResult:
    """What one batch produced, in task order."""

    images: np.ndarray  # (N, H, W, 3) uint8
    scheduler_config: dict[str, Any]
    prompt_tokens: list[int]
    prompt_truncated: list[bool]
    # capture kind -> (frames, N, H, W, 3) uint8, frame f of task n at [f, n]
    frames: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# The VAE's precision


def upcasts_vae(components: Components) -> bool:
    """diffusers' SDXL pipelines run a float16 VAE in float32 when its config says ``force_upcast``
    (SDXL's VAE overflows in fp16); its SD pipelines never do, so SD images keep their bytes."""
    vae = components.vae
    return components.family == "sdxl" and vae.dtype == torch.float16 and bool(vae.config.get("force_upcast"))


@contextmanager
def vae_precision(components: Components) -> Iterator[torch.dtype]:
    """The dtype to run the VAE in while inside: its own, or float32 while ``upcasts_vae`` (as diffusers'
    ``upcast_vae``, the module goes back to float16 on the way out)."""
    vae = components.vae
    if not upcasts_vae(components):
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)


def resolve_loss(loss: GuidanceLoss | None, count: int) -> tuple[GuidanceLoss, LossFunction] | None:
    """The batch's guidance loss and its function; an import failure fails every task (a batch field)."""
    if loss is None:
        return None
    try:
        return loss, load_loss(loss.name)
    except ValueError as exc:
        raise TaskInputError(dict.fromkeys(range(count), str(exc))) from exc


def prepare_timesteps(scheduler: Any, steps: int, start_step: int, device: str) -> torch.Tensor:
    """The timesteps to run: all of them, or from ``start_step`` on for img2img (as diffusers does).

    They stay on the host whatever ``device`` the batch runs on: the scheduler indexes its host
    tables with them and branches on them, which a device timestep turns into a host sync every
    step; ``denoise`` hands the UNet a device copy made once.
    """
    scheduler.set_timesteps(steps, device="cpu")
    keep_host_alphas(scheduler)  # before add_noise (img2img) moves the table to the device
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
    with vae_precision(components) as dtype:
        for start in range(0, len(pixels), VAE_DECODE_CHUNK):
            chunk = np.stack(pixels[start : start + VAE_DECODE_CHUNK])
            x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.no_grad():
                dist = vae.encode(x.to(components.device, dtype)).latent_dist
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
    # The family's geometry, read from the model: the UNet's latent channels, the VAE's downsampling.
    shape = latent_shape(first.width, first.height, components.latent_channels, components.vae_scale_factor)
    noise = torch.stack(
        [
            task_noise(g, shape, t.variation_seed, t.variation_strength, t.perturb_scale)
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
    alpha = alpha_at(scheduler, t, latents.device).to(latents.dtype)
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
    return float(1 - keep_host_alphas(scheduler)[int(t)])


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
    with vae_precision(components) as dtype:
        for start in range(0, latents.shape[0], VAE_DECODE_CHUNK):
            part = latents[start : start + VAE_DECODE_CHUNK].detach().requires_grad_()
            with torch.enable_grad():
                x0 = predicted_x0(scheduler, part, noise_pred[start : start + part.shape[0]], t)
                images = vae.decode((x0 / vae.config.scaling_factor).to(dtype)).sample / 2 + 0.5
                value = per_image(loss_fn(images.float(), loss.target), part.shape[0]).sum() * loss.scale
                grads.append(torch.autograd.grad(value, part)[0])
    return torch.cat(grads)


# ---------------------------------------------------------------------------------------
# The sampling loop and its step callbacks


@dataclass(frozen=True)
class StepState:
    """What a step callback sees, as k-diffusion's callback dict: the sampler step (0-based), the
    timestep of this UNet call, the latents and, at the step's first call, the guided noise prediction."""

    scheduler: Any
    step: int
    t: torch.Tensor | None  # on the host (``prepare_timesteps``); None before the first step
    latents: torch.Tensor
    noise_pred: torch.Tensor | None = None


class StepCallback:
    """A technique's hooks into ``denoise``; each does nothing unless a subclass overrides it.

    Techniques count sampler steps, not UNet calls (``samplers.step_marks``): ``predicted`` runs at
    the first call of every sampler step, ``stepped`` after the call that completes one.
    """

    def begin(self, state: StepState) -> None:
        """Before the first step, with the starting latents."""

    def predicted(self, state: StepState) -> torch.Tensor:
        """After the guided prediction, before the scheduler steps: the latents to step from
        (diffusers' ``callback_on_step_end`` may replace them the same way)."""
        return state.latents

    def stepped(self, state: StepState) -> None:
        """After the scheduler call that completes the step."""


class CaptureLatents(StepCallback):
    """Step capture ``latents``: the starting point and the state after every step (steps + 1 frames),
    kept on the device until ``decode_frames``."""

    def __init__(self) -> None:
        self.frames: list[torch.Tensor] = []

    def begin(self, state: StepState) -> None:
        self.frames.append(viewable(state.scheduler, state.latents))

    def stepped(self, state: StepState) -> None:
        self.frames.append(viewable(state.scheduler, state.latents))


class CaptureX0(StepCallback):
    """Step capture ``x0``: the clean latents predicted at every step (steps frames), kept on the device."""

    def __init__(self) -> None:
        self.frames: list[torch.Tensor] = []

    def predicted(self, state: StepState) -> torch.Tensor:
        self.frames.append(predicted_x0(state.scheduler, state.latents, state.noise_pred, state.t).detach())
        return state.latents


class LossGuidance(StepCallback):
    """The notebook's "make it blue": every ``loss.every`` steps, move the latents down the gradient of
    a loss on the decoded predicted x0, scaled by sigma^2 (``guidance_step_size``)."""

    def __init__(self, components: Components, loss: GuidanceLoss, loss_fn: LossFunction) -> None:
        self.components, self.loss, self.loss_fn = components, loss, loss_fn

    def predicted(self, state: StepState) -> torch.Tensor:
        if state.step % self.loss.every:
            return state.latents
        # noise_pred is held fixed, so the gradient flows through x0 = f(latents) and the VAE
        # decoder only, never through the UNet.
        grad = loss_gradient(
            self.components, state.scheduler, state.latents, state.noise_pred, state.t, self.loss, self.loss_fn
        )
        return state.latents.detach() - grad * guidance_step_size(state.scheduler, state.t)


CAPTURES: dict[str, type[CaptureLatents] | type[CaptureX0]] = {"latents": CaptureLatents, "x0": CaptureX0}


def capture_callbacks(kinds: Sequence[str]) -> dict[str, CaptureLatents | CaptureX0]:
    """One capture callback per kind the batch asks for (``RenderTask.capture``)."""
    return {kind: CAPTURES[kind]() for kind in kinds}


def step_callbacks(
    components: Components,
    captures: dict[str, CaptureLatents | CaptureX0],
    loss: tuple[GuidanceLoss, LossFunction] | None,
) -> list[StepCallback]:
    """The batch's callbacks in the order they run: captures first, so an x0 frame shows the
    prediction before the guidance loss moves the latents."""
    callbacks: list[StepCallback] = list(captures.values())
    if loss is not None:
        callbacks.append(LossGuidance(components, *loss))
    return callbacks


def predict_noise(
    components: Components,
    scheduler: Any,
    latents: torch.Tensor,
    t: torch.Tensor,
    unet_kwargs: dict[str, Any],
    guidance: float,
    control: Control = NO_CONTROL,
    call: tuple[int, int] = (0, 1),
    unet_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's noise prediction under classifier-free guidance (Ho & Salimans, 2022): both halves in
    one UNet batch when ``guidance`` > 1, as diffusers' pipelines run it; with the residuals of the
    ControlNets acting at UNet call ``call`` = (index, count), as its ControlNet pipelines add them.
    The scheduler scales the input at host timestep ``t``; the networks get ``unet_t``, its device copy."""
    unet_t = t if unet_t is None else unet_t
    guided = guidance > 1.0
    model_input = torch.cat([latents] * 2) if guided else latents
    model_input = scheduler.scale_model_input(model_input, t)
    with torch.no_grad():
        residuals = control.unet_kwargs(model_input, unet_t, unet_kwargs, *call)
        noise_pred = components.unet(model_input, unet_t, **unet_kwargs, **residuals).sample
    if not guided:
        return noise_pred
    noise_uncond, noise_text = noise_pred.chunk(2)
    return noise_uncond + guidance * (noise_text - noise_uncond)


def denoise(
    components: Components,
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    cond: Conditioning,
    guidance: float,
    generators: list[torch.Generator],
    callbacks: Sequence[StepCallback] = (),
    control: Control = NO_CONTROL,
) -> torch.Tensor:
    """The sampling loop: predict (with the ControlNets' residuals), let the callbacks act, step.
    Returns the final latents.

    Nothing in it waits for the device: the scheduler steps on the host ``timesteps`` and the
    networks get their device copy, made once; step noise and captures stay on the device
    (tests/test_render_bytes.py checks it).
    """
    unet_kwargs = cond.unet_kwargs(guidance > 1.0)
    extra = step_kwargs(scheduler, generators)
    starts, ends = step_marks(scheduler, timesteps)
    timesteps = timesteps.cpu()  # already there from prepare_timesteps
    unet_timesteps = to_device(timesteps, latents.device)
    for callback in callbacks:
        callback.begin(StepState(scheduler, -1, None, latents))
    step = -1  # sampler steps started so far, less one
    with async_step_noise(scheduler):
        for i, t in enumerate(timesteps):
            step += starts[i]
            call = (i, len(timesteps))
            noise_pred = predict_noise(
                components, scheduler, latents, t, unet_kwargs, guidance, control, call, unet_timesteps[i]
            )
            if starts[i]:
                for callback in callbacks:
                    latents = callback.predicted(StepState(scheduler, step, t, latents, noise_pred))
            latents = scheduler.step(noise_pred, t, latents, **extra).prev_sample
            if ends[i]:
                for callback in callbacks:
                    callback.stepped(StepState(scheduler, step, t, latents))
    return latents


def viewable(scheduler: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the UNet sees them (sigma samplers scale them to unit variance): a copy, on their device."""
    if is_sigma_scheduler(scheduler):
        return (latents / (current_sigma(scheduler) ** 2 + 1) ** 0.5).detach()
    return latents.detach().clone()


# ---------------------------------------------------------------------------------------
# Decoding and the batch


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> uint8 where they are: float32 x 255, rounded half to even, as numpy's
    ``(x * 255).round().astype(np.uint8)`` on the same float32 values (tests/test_render_bytes.py)."""
    return (pixels.float() * 255).round().to(torch.uint8)


def decode_latents(components: Components, latents: torch.Tensor, chunk: int = VAE_DECODE_CHUNK) -> np.ndarray:
    """Latents -> uint8 RGB images (N, H, W, 3), decoded a few at a time to bound memory, made uint8
    on the device and copied to the host once."""
    vae = components.vae
    images = []
    with vae_precision(components) as dtype:
        for start in range(0, latents.shape[0], chunk):
            part = latents[start : start + chunk] / vae.config.scaling_factor
            with torch.no_grad():
                decoded = vae.decode(part.to(dtype)).sample
            images.append(to_uint8((decoded / 2 + 0.5).clamp(0, 1)))
    return torch.cat(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def decode_frames(components: Components, steps: list[torch.Tensor], count: int, first: RenderTask) -> np.ndarray:
    """Captured latents (one (N, C, h, w) per step, on the device) -> frames (steps, N, H, W, 3); none
    when no step ran."""
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
    controlnets: Sequence[Any] = (),
    control_images: Sequence[Sequence[np.ndarray]] | None = None,
) -> RenderResult:
    """Render tasks that share a batch key. ``init_images`` holds each img2img task's init image,
    already fitted to the task size (``images.fit_image``), and None for the others;
    ``embeddings`` the vectors of the batch's textual-inversion files, in order
    (``embeddings.load_embeddings(tasks[0].embeddings)``); ``controlnets`` the loaded ControlNets of
    the batch's ``controlnet_models``, in order (``controlnets.load_controlnets``), and
    ``control_images`` each task's control image per unit, as (H, W, 3) uint8 pixels already fitted
    to the task size and preprocessed (``control_images[n][u]`` for ``tasks[n].controlnet[u]``).

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
    loss = resolve_loss(first.guidance_loss, len(tasks))

    # 2. Encode the conditioning: prompts (mixes, token mixes, textual inversion; each distinct
    #    prompt once), and the family's extras (SDXL: pooled embeddings, time ids)
    cond = encode_conditioning(components, tasks, embeddings)

    # 3. Prepare the ControlNets: each task's control images, scales and step windows per unit
    control_images = control_images if control_images is not None else [[] for _ in tasks]
    control = prepare_control(components, tasks, controlnets, control_images)

    # 4. Prepare timesteps (img2img starts part way)
    scheduler = build_scheduler(first.scheduler, components.scheduler_config, first.schedule_type)
    timesteps = prepare_timesteps(scheduler, first.steps, first.start_step, components.device)

    # 5. Prepare latents: each image's own CPU-generator noise, variations, init images
    generators = [make_generator(t.seed) for t in tasks]
    latents = prepare_latents(components, scheduler, timesteps, tasks, generators, init_images)

    # 6. Build the step callbacks the batch asks for (step capture, guidance loss)
    captures = capture_callbacks(first.capture)
    callbacks = step_callbacks(components, captures, loss)

    # 7. Denoise
    latents = denoise(components, scheduler, timesteps, latents, cond, first.guidance, generators, callbacks, control)

    # 8. Decode (captured steps too, all frames in VAE-sized chunks)
    frames = {kind: decode_frames(components, c.frames, len(tasks), first) for kind, c in captures.items()}
    return RenderResult(
        images=decode_latents(components, latents),
        scheduler_config=scheduler_config(scheduler),
        prompt_tokens=cond.tokens,
        prompt_truncated=cond.truncated,
        frames=frames,
    )
