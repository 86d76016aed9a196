"""Write jobs/loras/tiny-style.safetensors: a LoRA for the `tiny` preset (committed; this script shows how it was made).

The diffusers layout, as ``save_lora_weights`` writes it (``unet.<module>.lora_A.weight``,
``text_encoder.<module>.lora_B.weight``): rank-4 adapters on the UNet's attention projections and
the text encoder's self-attention, with both factors drawn at random from a fixed seed (a trained
LoRA starts with lora_B at zero; random factors, lora_B scaled up, make the change plain at weight 1). Alpha
equals the rank (scale 1), so the same tensors renamed to the kohya layout with ``alpha`` = rank
apply identically.

It is deterministic: running the script again writes the same bytes.

    .venv/bin/python scripts/make_tiny_lora.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from farm.presets import build_tiny_pipeline

TARGET = Path(__file__).resolve().parents[1] / "jobs" / "loras" / "tiny-style.safetensors"
LORA_SEED = 14
RANK = 4
# Attention projections, as most LoRAs people bring target them (kohya's default network modules).
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# lora_B at nn.Linear's own init scale moves the tiny images by ~5 of 255 levels on average at weight 1;
# four times that moves them by ~22, a change one sees at a glance.
LORA_B_SCALE = 4.0


def lora_layers(model: torch.nn.Module, modules: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Random rank-RANK adapters on ``modules`` of ``model`` -> their peft state dict (lora_A / lora_B)."""
    torch.manual_seed(seed)
    # init_lora_weights=False keeps nn.Linear's own random init for both factors (lora_B is not zeroed).
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=modules, init_lora_weights=False)
    # peft's own injection, for the UNet and the CLIP text encoder alike (transformers' add_adapter
    # insists on a newer peft than diffusers needs).
    inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    return {k: (v * LORA_B_SCALE if ".lora_B." in k else v).detach().contiguous() for k, v in state.items()}


def main() -> None:
    pipe = build_tiny_pipeline()
    unet = lora_layers(pipe.unet, UNET_MODULES, LORA_SEED)
    text_encoder = lora_layers(pipe.text_encoder, TEXT_ENCODER_MODULES, LORA_SEED + 1)
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        TARGET.parent, unet_lora_layers=unet, text_encoder_lora_layers=text_encoder, weight_name=TARGET.name
    )
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes, {len(unet) + len(text_encoder)} tensors)")


if __name__ == "__main__":
    main()
