"""Write a diffusers Stable Diffusion folder as one original-layout (LDM/CompVis) ``.safetensors`` file.

A test helper: it lets the tests exercise the single-file loading path
(``StableDiffusionPipeline.from_single_file``, ``StableDiffusionXLPipeline.from_single_file``) on the
tiny presets, without any download. It is the inverse of diffusers' ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(``diffusers/loaders/single_file_utils.py``), for SD 1.x and SDXL shaped models:

- UNet under ``model.diffusion_model.``: ``input_blocks`` / ``middle_block`` / ``output_blocks``,
  numbered from the UNet's own config (levels and ``layers_per_block``), not SD's 4 x 2;
- VAE under ``first_stage_model.``: ``encoder.down.N`` / ``decoder.up.N`` (the decoder's levels
  numbered in reverse), with the mid attention's q/k/v/proj_out as 1x1 conv weights ``[C, C, 1, 1]``;
- CLIP text model under ``cond_stage_model.transformer.text_model.``; for SDXL (sgm's layout) the CLIP
  encoder under ``conditioner.embedders.0.transformer.text_model.`` and the OpenCLIP one (the second,
  with its projection) under ``conditioner.embedders.1.model.``, attention q/k/v fused as ``in_proj``;
- SDXL's micro-conditioning embedding (``add_embedding``) as the UNet's ``label_emb.0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# OpenCLIP's names for the parts of one transformer layer, diffusers (transformers' CLIP) -> OpenCLIP.
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

# Module names inside one residual block, diffusers -> LDM.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# A table maps a diffusers key prefix to (LDM key prefix, module renames applied to the rest).
Table = dict[str, tuple[str, dict[str, str]]]


def export_single_file(pipeline_folder: Path, target: Path) -> None:
    """Write the unet, vae and text_encoder of a diffusers folder as one LDM-layout checkpoint."""
    folder = Path(pipeline_folder)
    sdxl = (folder / "text_encoder_2").is_dir()
    unet, unet_config = _load(folder / "unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = _load(folder / "vae", "diffusion_pytorch_model.safetensors")
    text, _ = _load(folder / "text_encoder", "model.safetensors")

    checkpoint: dict[str, torch.Tensor] = {}
    checkpoint.update(_rename_all(unet, unet_table(unet_config), UNET_PREFIX))
    for key, value in _rename_all(vae, vae_table(vae_config), VAE_PREFIX).items():
        # LDM's VAE attention projections are 1x1 convolutions; diffusers stores them as linear.
        is_projection = key.partition(".mid.attn_1.")[2] in ("q.weight", "k.weight", "v.weight", "proj_out.weight")
        checkpoint[key] = value[:, :, None, None] if is_projection else value
    for key, value in text.items():
        # transformers >= 5.6 saves CLIPTextModel without its ``text_model.`` level.
        checkpoint[(SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX) + key.removeprefix("text_model.")] = value
    if sdxl:
        text_2, _ = _load(folder / "text_encoder_2", "model.safetensors")
        checkpoint.update(open_clip_state(text_2, SDXL_OPEN_CLIP_PREFIX))

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(target), metadata={"format": "pt"})


def unet_table(config: dict) -> Table:
    """The UNet's prefix table, numbered as LDM's ``UNetModel`` numbers its blocks."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("per-level layers_per_block is not supported")
    levels = len(config["block_out_channels"])
    table: Table = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),  # SDXL's micro-conditioning
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET),
    }
    # input_blocks.0 is conv_in; each level then has per_block (resnet, attention) blocks and a
    # downsampler block (all but the last level).
    for level in range(levels):
        first = 1 + level * (per_block + 1)
        for layer in range(per_block):
            table[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{first + layer}.0.", UNET_RESNET)
            table[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{first + layer}.1.", {})
        table[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{first + per_block}.0.op.", {})
    # Each up level has per_block + 1 output blocks: (resnet, attention); the last one also holds
    # the upsampler, after the attention when the level has one.
    for level, block_type in enumerate(config["up_block_types"]):
        first = level * (per_block + 1)
        for layer in range(per_block + 1):
            table[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{first + layer}.0.", UNET_RESNET)
            table[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{first + layer}.1.", {})
        slot = 2 if "CrossAttn" in block_type else 1
        table[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{first + per_block}.{slot}.conv.", {})
    return table


def vae_table(config: dict) -> Table:
    """The VAE's prefix table; LDM numbers the decoder's levels from the lowest resolution up."""
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    table: Table = {}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            table[f"{part}.{name}."] = (f"{part}.{name}.", {})
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        table[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", VAE_RESNET)
        table[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", VAE_RESNET)
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
    for name in ("quant_conv", "post_quant_conv"):
        table[f"{name}."] = (f"{name}.", {})
    for level in range(levels):
        for layer in range(per_block):
            table[f"encoder.down_blocks.{level}.resnets.{layer}."] = (
                f"encoder.down.{level}.block.{layer}.",
                VAE_RESNET,
            )
        table[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"encoder.down.{level}.downsample.conv.", {})
        up = levels - 1 - level
        for layer in range(per_block + 1):
            table[f"decoder.up_blocks.{level}.resnets.{layer}."] = (f"decoder.up.{up}.block.{layer}.", VAE_RESNET)
        table[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"decoder.up.{up}.upsample.conv.", {})
    return table


def open_clip_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's names: q/k/v fused into ``in_proj``, the
    projection stored transposed (OpenCLIP multiplies by it: ``x @ text_projection``)."""
    weights = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    out = {
        "positional_embedding": weights.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": weights.pop("final_layer_norm.weight"),
        "ln_final.bias": weights.pop("final_layer_norm.bias"),
        "text_projection": weights.pop("text_projection.weight").T,
    }
    layers = {int(key.split(".")[2]) for key in weights if key.startswith("encoder.layers.")}
    for n in sorted(layers):
        source, target = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            fused = [weights.pop(f"{source}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(fused)
            out[f"{target}attn.out_proj.{kind}"] = weights.pop(f"{source}self_attn.out_proj.{kind}")
            for old, new in OPEN_CLIP_LAYER.items():
                out[f"{target}{new}.{kind}"] = weights.pop(f"{source}{old}.{kind}")
    if weights:
        raise KeyError(f"no OpenCLIP name for {sorted(weights)!r}")
    return {prefix + key: value for key, value in out.items()}


def _rename_all(state_dict: dict[str, torch.Tensor], table: Table, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + _rename(key, table): value for key, value in state_dict.items()}


def _rename(key: str, table: Table) -> str:
    """One diffusers key in LDM's names; fails on a key the table does not cover."""
    for old, (new, modules) in table.items():
        if key.startswith(old):
            module, dot, param = key[len(old) :].rpartition(".")
            return new + modules.get(module, module) + dot + param
    raise KeyError(f"no LDM name for {key!r}")


def _load(folder: Path, weights: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(folder / weights)), json.loads((folder / "config.json").read_text())
