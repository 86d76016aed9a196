"""The `shapes` preset's components, built from the training script's settings: the SD 1.x architecture
shrunk like `tiny` (farm.presets), with farm's own tokenizer. Each model starts from its own seed."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from scripts.shapes import dataset


def build_tokenizer(kind: str) -> Any:
    """farm's tiny tokenizer, or the same construction with the caption words appended to its word list
    (tiny's tokens keep their ids; only the special tokens move up)."""
    from farm.presets import TINY_WORDS, build_tiny_tokenizer

    if kind == "tiny":
        return build_tiny_tokenizer()
    return build_tiny_tokenizer(list(dict.fromkeys([*TINY_WORDS, *dataset.WORDS])))


def vae_factor(args: argparse.Namespace) -> int:
    """How much the VAE downsamples: by 2 at every level but the last (diffusers' vae_scale_factor)."""
    return 2 ** (len(args.vae_channels) - 1)


def build_vae(args: argparse.Namespace) -> Any:
    """tiny's VAE (farm.presets.build_tiny_vae) with this run's widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed + 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(args.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(args.vae_channels),
        block_out_channels=tuple(args.vae_channels),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=args.resolution,
        scaling_factor=0.18215,  # replaced by the measured one after training
        force_upcast=True,
    )


def build_text_encoder(args: argparse.Namespace, tokenizer: Any) -> Any:
    from transformers import CLIPTextModel

    from farm.presets import tiny_text_config

    torch.manual_seed(args.seed + 2)
    config = tiny_text_config(
        tokenizer,
        hidden_size=args.text_width,
        intermediate_size=2 * args.text_width,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
    )
    return CLIPTextModel(config)


def build_unet(args: argparse.Namespace) -> Any:
    """tiny's UNet (farm.presets.build_tiny_pipeline) with this run's widths and attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed + 3)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in args.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(args.unet_attention))
    return UNet2DConditionModel(
        sample_size=args.resolution // vae_factor(args),
        in_channels=4,
        out_channels=4,
        layers_per_block=args.unet_layers,
        block_out_channels=tuple(args.unet_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=args.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_scheduler() -> Any:
    """The scheduler tiny ships (SD 1.x's own scheduler_config.json, as a PNDMScheduler)."""
    from farm.presets import build_tiny_pipeline

    return build_tiny_pipeline().scheduler


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
