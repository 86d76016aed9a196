"""Per-family conditioning: what the UNet is given besides the latents and the timestep. No Ray, no files.

A family contributes one conditioning object (DESIGN.md, "Model families"). SD 1.x and 2.x: the text
embeddings of each task's prompt and negative prompt. SDXL adds text_encoder_2's pooled embeddings and
the micro-conditioning time ids, for both halves of classifier-free guidance. Each object gives the
UNet's keyword arguments, so the sampling loop never asks which family it runs; prompts are encoded by
``farm.text``, the way diffusers' ``encode_prompt`` and ``_get_add_time_ids`` prepare them.

ControlNets add to those arguments at every UNet call (``Control``): the residuals of each unit whose
step window covers the call, from its ControlNet run on the same input and conditioning, each task's
rows scaled by its own scale, summed over units, as diffusers' ``MultiControlNetModel`` sums them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from farm.models import Components
from farm.noise import slerp
from farm.samplers import to_device
from farm.spec import RenderTask
from farm.text import EncodedPrompt, LoadedEmbedding, PromptEncoder, PromptError, pad_chunks

# Prompt encoders kept per model (one per set of textual-inversion files, long-prompt mode, CLIP
# layer and LoRA set); each holds up to text.CACHE_SIZE encoded prompts.
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
class Conditioning:
    """SD 1.x and 2.x: per-task text conditioning, padded to one sequence length for the batch."""

    text: torch.Tensor  # (N, 77k, d)
    uncond: torch.Tensor  # (N, 77k, d)
    tokens: list[int]
    truncated: list[bool]

    def unet_kwargs(self, guided: bool) -> dict[str, Any]:
        """The UNet's conditioning arguments for a batch of N latents, or of 2N when ``guided``."""
        return {"encoder_hidden_states": halves(self.uncond, self.text, guided)}


@dataclass
class XLConditioning(Conditioning):
    """SDXL: both encoders' text embeddings, plus the pooled embeddings and time ids that
    ``addition_embed_type="text_time"`` adds to the timestep embedding."""

    pooled: torch.Tensor  # (N, p): text_encoder_2's projected pooled output
    uncond_pooled: torch.Tensor  # (N, p)
    time_ids: torch.Tensor  # (N, 6): original size, crop top-left, target size
    uncond_time_ids: torch.Tensor  # (N, 6)

    def unet_kwargs(self, guided: bool) -> dict[str, Any]:
        """diffusers' SDXL ``added_cond_kwargs`` beside the text embeddings."""
        added = {
            "text_embeds": halves(self.uncond_pooled, self.pooled, guided),
            "time_ids": halves(self.uncond_time_ids, self.time_ids, guided),
        }
        return super().unet_kwargs(guided) | {"added_cond_kwargs": added}


def halves(uncond: torch.Tensor, cond: torch.Tensor, guided: bool) -> torch.Tensor:
    """Classifier-free guidance's two halves in one UNet batch, the negative first as diffusers orders
    them; the prompt's half alone when unguided."""
    return torch.cat([uncond, cond]) if guided else cond


def prompt_encoder(
    components: Components, embeddings: Sequence[LoadedEmbedding], long_prompt: str, clip_skip: int | None = None
) -> PromptEncoder:
    """The model's prompt encoder for these textual-inversion files, long-prompt mode and CLIP layer,
    kept across batches: building one copies the tokenizer, and its cache spares re-encoding a grid's
    prompts in every batch (the embeddings are the same bits either way). Kept per LoRA set too: an
    adapter on the text encoder changes every embedding."""
    key = (tuple(e.embedding for e in embeddings), long_prompt, clip_skip, components.lora_key)
    kept = components.encoders
    encoder = kept.pop(key, None) or PromptEncoder(components, embeddings, long_prompt, clip_skip)
    kept[key] = encoder  # most recently used last
    while len(kept) > ENCODERS_KEPT:
        kept.pop(next(iter(kept)))
    return encoder


def encode_conditioning(
    components: Components, tasks: Sequence[RenderTask], embeddings: Sequence[LoadedEmbedding] = ()
) -> Conditioning:
    """The batch's conditioning in its family's object: each task's prompt (or prompt mix) and negative
    prompt as text embeddings, with SDXL's pooled embeddings and time ids; ``embeddings`` holds the
    vectors of the batch's textual-inversion files.

    Raises ``TaskInputError`` naming every task whose prompt, token mix, embedding or CLIP layer
    this model cannot use.
    """
    first = tasks[0]
    try:
        encoder = prompt_encoder(components, embeddings, first.long_prompt, first.clip_skip)
    except PromptError as exc:  # embeddings and clip_skip are batch fields: every task shares the problem
        raise TaskInputError(dict.fromkeys(range(len(tasks)), str(exc))) from exc
    empty = encoder.encode("")
    prompts: list[EncodedPrompt] = []
    negatives: list[EncodedPrompt] = []
    errors: dict[int, str] = {}
    for i, task in enumerate(tasks):
        try:
            prompt = encode_prompt(encoder, task, empty)
            negative = encoder.encode(task.negative_prompt)
        except PromptError as exc:
            errors[i] = str(exc)
            continue
        prompts.append(prompt)
        negatives.append(negative)
    if errors:
        raise TaskInputError(errors)
    count = len(tasks)
    padded = pad_chunks([p.embeds for p in prompts + negatives], empty.embeds)
    # diffusers' SDXL conditions an absent negative prompt (farm's "") as zeros when the model's
    # config says force_zeros_for_empty_prompt; the whole padded length, pooled output too.
    zeros = [components.force_zeros_for_empty_prompt and t.negative_prompt == "" for t in tasks]
    text, uncond = padded[:count], zero_rows(padded[count:], zeros)
    tokens = [p.tokens for p in prompts]
    truncated = [p.truncated or n.truncated for p, n in zip(prompts, negatives, strict=True)]
    if components.family != "sdxl":
        return Conditioning(text, uncond, tokens, truncated)
    # The negative half gets the prompt's own time ids: diffusers' default without negative_original_size.
    ids = torch.tensor([time_ids(t) for t in tasks], dtype=text.dtype, device=text.device)
    return XLConditioning(
        text,
        uncond,
        tokens,
        truncated,
        pooled=torch.cat([p.pooled for p in prompts]),
        uncond_pooled=zero_rows(torch.cat([n.pooled for n in negatives]), zeros),
        time_ids=ids,
        uncond_time_ids=ids,
    )


def encode_prompt(encoder: PromptEncoder, task: RenderTask, empty: EncodedPrompt) -> EncodedPrompt:
    """A task's prompt with its token mixes, or its prompt mix blended at the text encoders' output
    (the embeddings and the pooled embedding alike)."""
    if not task.mix:
        return encoder.encode(task.prompt, task.token_mix)
    parts = [encoder.encode(part.prompt) for part in task.mix]
    weights = [part.weight for part in task.mix]
    embeds = mix_embeddings([p.embeds for p in parts], weights, task.mix_mode, empty.embeds)
    pooled = None
    if empty.pooled is not None:
        pooled = mix_embeddings([p.pooled for p in parts], weights, task.mix_mode, empty.pooled)
    return EncodedPrompt(embeds, max(p.tokens for p in parts), any(p.truncated for p in parts), pooled)


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


def zero_rows(values: torch.Tensor, rows: Sequence[bool]) -> torch.Tensor:
    """``values`` with the marked rows (first axis) set to zero; the same tensor when none is marked."""
    if not any(rows):
        return values
    marked = torch.tensor(rows, device=values.device).reshape(-1, *[1] * (values.ndim - 1))
    return values.masked_fill(marked, 0)


def time_ids(task: RenderTask) -> tuple[int, ...]:
    """SDXL's micro-conditioning of a task: original size (h, w), crop top-left (top, left), target
    size (h, w), each defaulting as diffusers' pipeline does (the task's size; no crop)."""
    size = (task.height, task.width)
    original = task.original_size or size
    crop = task.crops_coords_top_left or (0, 0)
    return (*original, *crop, *(task.target_size or size))


# ---------------------------------------------------------------------------------------
# ControlNets


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a batch: its module, each task's control image, scale and step window."""

    model: Any  # a diffusers ControlNetModel (farm.controlnets.load_controlnets)
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], as diffusers' control_image_processor gives them
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]

    def weights(self, call: int, calls: int) -> list[float]:
        """Each task's scale at UNet call ``call`` of ``calls``: its own scale inside its [start, end]
        window, else 0 (diffusers' ``controlnet_keep``, counted over UNet calls as diffusers counts them)."""
        return [
            scale * (1.0 - float(call / calls < start or (call + 1) / calls > end))
            for scale, start, end in zip(self.scales, self.starts, self.ends, strict=True)
        ]

    def residuals(
        self, model_input: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any], weights: Sequence[float]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet's down and mid residuals for the UNet's input, each task's rows times its weight
        (both halves of classifier-free guidance alike, as diffusers runs it without guess mode)."""
        guided = model_input.shape[0] == 2 * self.images.shape[0]
        images = halves(self.images, self.images, guided)
        # Made on the host and copied without waiting: a tensor built on the device from a list waits for it.
        rows = to_device(torch.tensor(list(weights) * (2 if guided else 1)), model_input.device)
        rows = rows.to(model_input.dtype).reshape(-1, 1, 1, 1)
        down, mid = self.model(
            model_input,
            t,
            encoder_hidden_states=unet_kwargs["encoder_hidden_states"],
            controlnet_cond=images,
            added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"),
            return_dict=False,
        )
        return [d * rows for d in down], mid * rows


@dataclass(frozen=True)
class Control:
    """A batch's ControlNet units; with none, the UNet gets nothing more."""

    units: tuple[ControlUnit, ...] = ()

    def unet_kwargs(
        self, model_input: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any], call: int, calls: int
    ) -> dict[str, Any]:
        """The UNet's ``down_block_additional_residuals`` and ``mid_block_additional_residual`` at this
        call, summed over units; {} when no unit acts on it."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit in self.units:
            weights = unit.weights(call, calls)
            # Scale 0 for every task, or outside every window: not run at all, so the image is the one
            # without it bit for bit (and no time is spent on it).
            if not any(weights):
                continue
            unit_down, unit_mid = unit.residuals(model_input, t, unet_kwargs, weights)
            if down is None or mid is None:
                down, mid = unit_down, unit_mid
            else:
                down, mid = [a + b for a, b in zip(down, unit_down, strict=True)], mid + unit_mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


# The batch without ControlNets.
NO_CONTROL = Control()


def prepare_control(
    components: Components,
    tasks: Sequence[RenderTask],
    controlnets: Sequence[Any],
    images: Sequence[Sequence[np.ndarray]],
) -> Control:
    """The batch's ControlNet units: one per entry of the tasks' ``controlnet``, with the loaded modules
    (``controlnets``, the batch's ``controlnet_models`` in order) and each task's control images as
    pixels (H, W, 3) uint8, already fitted to the task's size and preprocessed."""
    first = tasks[0]
    if len(controlnets) != len(first.controlnet):
        raise ValueError("controlnets: one loaded ControlNet per entry of the batch's controlnet_models")
    if len(images) != len(tasks) or any(len(row) != len(first.controlnet) for row in images):
        raise ValueError("control_images: one image per ControlNet unit of each task")
    if any(image.shape != (first.height, first.width, 3) for row in images for image in row):
        raise ValueError("control_images: (height, width, 3) uint8 pixels fitted to the task's size")
    units = []
    for index, model in enumerate(controlnets):
        pixels = np.stack([row[index] for row in images])
        units.append(
            ControlUnit(
                model,
                control_tensor(pixels).to(components.device, model.dtype),
                scales=tuple(float(t.controlnet[index].scale) for t in tasks),
                starts=tuple(float(t.controlnet[index].start) for t in tasks),
                ends=tuple(float(t.controlnet[index].end) for t in tasks),
            )
        )
    return Control(tuple(units))


def control_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]: diffusers' control image processor
    (``VaeImageProcessor(do_normalize=False)``), its resizing already done by the caller."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
