"""The presets: Stable Diffusion families shrunk, built locally from a fixed seed (or shipped) into the farm cache.

``tiny`` is SD 1.x shrunk and ``tiny-xl`` is SDXL shrunk (DESIGN.md, "The embedded default model" and
"Model families"): real diffusers components with a few channels, farm's own small CLIP vocabulary,
weights from a fixed seed, saved once with ``save_pretrained`` under ``$FARM_HOME/models`` and loaded
through the same ``from_pretrained`` path as a real model. Their images are coloured noise; every
mechanism around them is real. ``shapes`` is different: an SD 1.x model trained by ``scripts/shapes``
to draw coloured shapes on flat backgrounds, shipped as weights in ``farm/weights/shapes`` and copied
into the cache as they are (docs/shapes.md). Torch is imported only inside the builders, so the references layer
(and the spec, through ``PRESET_FACTS``) can name them without it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESETS = ("tiny", "tiny-xl", "shapes")
# ControlNets built the same way, for tiny's UNet: a ControlNet job renders with no download.
CONTROLNET_PRESETS = ("tiny-controlnet",)
# Bumped whenever a preset's architecture or its vocabulary changes, so an old cache folder is never
# mistaken for the current preset (the folder is $FARM_HOME/models/<name>-<version>).
TINY_VERSION = "v3"
TINY_XL_VERSION = "v1"
# shapes' version is its shipped weights': bump it whenever farm/weights/shapes is retrained.
PRESET_VERSIONS = {"tiny": TINY_VERSION, "tiny-xl": TINY_XL_VERSION, "shapes": "v3", "tiny-controlnet": "v1"}
# Presets trained by a script in the repo (scripts/shapes) and shipped as weights, not built from a seed:
# copied byte for byte into the cache, so they load and hash like any other diffusers folder.
SHIPPED_PRESETS = {"shapes": Path(__file__).resolve().parent / "weights" / "shapes"}
TINY_SEED = 20221122
# tiny-xl's own seeds, apart from tiny's so no component of one is a copy of the other's.
TINY_XL_SEED = 20230726
TINY_CONTROLNET_SEED = 20230210
# The spread of tiny-controlnet's zero convolutions: large enough that scale 1 visibly steers the image.
TINY_CONTROLNET_SCALE = 0.3
# Its control-image embedding's widths: small, as tiny is (diffusers' default is 16, 32, 96, 256);
# three halvings, the tiny VAE's factor 8.
TINY_CONTROLNET_EMBEDDING = (8, 8, 16, 16)
# Words given whole-word BPE merges in the tiny tokenizer, so the demo prompts tokenize
# into words like a real CLIP vocabulary would; anything else falls back to characters.
TINY_WORDS = (
    "a an the of in on with and at by from to riding giant flying space digital art "
    "cute shiba inu dog cat puppy skunk alien beetle photo painting portrait landscape "
    "watercolor oil sunset forest city night mountain river sea ocean blue red green "
    "yellow orange purple black white golden house castle robot astronaut horse rabbit "
    "wooden carving highly detailed realistic style by trending artstation blurry ugly "
    "low quality lake tree flower sky cloud snow winter summer"
).split()
# SDXL's micro-conditioning embeds six numbers (original size, crop top-left, target size), each
# into addition_time_embed_dim channels (diffusers' StableDiffusionXLPipeline._get_add_time_ids).
SDXL_TIME_IDS = 6
TINY_XL_TIME_EMBED_DIM = 8
# tiny-xl's text encoders: the second wider than the first, as SDXL's OpenCLIP bigG (1280) is wider than its
# CLIP ViT-L (768); diffusers' single-file loader tells the two apart by that width. The pooled projection
# is narrower still, so a hidden state passed where the pooled embedding belongs fails loudly.
TINY_XL_TEXT_HIDDEN = 32
TINY_XL_TEXT_HIDDEN_2 = 64
TINY_XL_PROJECTION_DIM = 32


@dataclass(frozen=True)
class ModelFacts:
    """What the spec needs of a model without loading it: read by farm.models.reference_facts."""

    family: str  # "sd1" | "sd2" | "sdxl"
    native_size: tuple[int, int] | None  # (height, width) the model was trained at, None when unknown
    prediction_type: str | None  # the scheduler's "epsilon" | "v_prediction" | ..., None when unknown


# Each preset's facts, written out so the spec knows them without torch or a built folder;
# tests/test_families.py holds them equal to the built configs (sample_size x VAE factor, scheduler).
PRESET_FACTS = {
    "tiny": ModelFacts("sd1", (64, 64), "epsilon"),
    "tiny-xl": ModelFacts("sdxl", (128, 128), "epsilon"),
    "shapes": ModelFacts("sd1", (64, 64), "epsilon"),
}


def farm_home() -> Path:
    """The farm cache folder: ``$FARM_HOME`` or ``~/.cache/farm``."""
    return Path(os.environ.get("FARM_HOME") or Path.home() / ".cache" / "farm")


def preset_path(name: str) -> Path:
    """Where a preset lives in the farm cache: ``$FARM_HOME/models/<name>-<version>``."""
    return farm_home() / "models" / f"{name}-{PRESET_VERSIONS[name]}"


def tiny_path() -> Path:
    """Where the tiny preset lives in the farm cache."""
    return preset_path("tiny")


def ensure_preset(name: str) -> Path:
    """Build a preset into the farm cache once; later calls just return its folder."""
    if name not in PRESETS + CONTROLNET_PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS + CONTROLNET_PRESETS)}")
    target = preset_path(name)
    # A pipeline folder is marked by its model_index.json, a single model's (a ControlNet) by its config.json.
    if (target / ("config.json" if name in CONTROLNET_PRESETS else "model_index.json")).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden staging folder and renamed in one step, so a reader never sees half a model.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    if name in SHIPPED_PRESETS:
        shutil.copytree(SHIPPED_PRESETS[name], staging, dirs_exist_ok=True)
    else:
        PRESET_BUILDERS[name]().save_pretrained(staging, safe_serialization=True)
    try:
        staging.rename(target)
    except OSError:
        # Another process (a second actor) finished first; its copy is identical.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny() -> Path:
    """Build the tiny preset into the farm cache once; later calls just return its folder."""
    return ensure_preset("tiny")


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2 and CLIP byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding: merge the adjacent pair of lowest rank until no pair has a merge."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols[:-1], symbols[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_tiny_tokenizer(words: Sequence[str] = TINY_WORDS) -> Any:
    """A real CLIPTokenizer over a small byte-level BPE vocabulary: bytes, then merges making each of
    ``words`` one token (tiny's words; a trained preset's script adds its own captions' words)."""
    from transformers import CLIPTokenizer

    byte_chars = byte_alphabet()
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        # Apply the merges made so far, as the tokenizer will ("at" is merged before "cat" is
        # seen), then add merges for what is left, so every word ends up one token.
        symbols = apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_vae(seed: int, scaling_factor: float = 0.18215) -> Any:
    """The presets' VAE: four levels, so it downsamples by 8 and latents keep the real (4, H/8, W/8) shape."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=True,  # as SD's and SDXL's VAE configs say: decode in fp32 when the model is fp16
    )


def tiny_text_config(tokenizer: Any, **overrides: Any) -> Any:
    """A small CLIPTextConfig over farm's tokenizer (32 wide, two layers), with family overrides."""
    from transformers import CLIPTextConfig

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**{**settings, **overrides})


def build_tiny_pipeline() -> Any:
    """The Stable Diffusion 1.x architecture shrunk, weights from a fixed seed."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = build_tiny_vae(TINY_SEED + 1)
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    # Stable Diffusion 1.x's own scheduler_config.json, so every scheduler built from this
    # config behaves as it would on a real checkpoint; clip_sample is not a PNDM argument but
    # the file carries it, and DDIM reads it from there (its own default would clip x0).
    scheduler = PNDMScheduler.from_config(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "skip_prk_steps": True,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        }
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_xl_pipeline() -> Any:
    """The SDXL architecture shrunk (two text encoders, micro-conditioning), weights from a fixed seed.

    Shaped like diffusers' own SDXL test components (tests/pipelines/stable_diffusion_xl,
    get_dummy_components), with farm's tokenizer for both encoders and SDXL base's scheduler config.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(TINY_XL_SEED)
    unet = UNet2DConditionModel(
        # 16 latents x the VAE's 8: a native 128x128, unlike tiny's 64, so size defaults show the family.
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # SDXL's shape: no attention at the top level, more transformer layers lower down.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        norm_num_groups=32,
        # The prompt embeddings are both encoders' hidden states side by side.
        cross_attention_dim=TINY_XL_TEXT_HIDDEN + TINY_XL_TEXT_HIDDEN_2,
        # The pooled text embedding of encoder 2 plus the six embedded time ids condition the timestep.
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_XL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_XL_PROJECTION_DIM + SDXL_TIME_IDS * TINY_XL_TIME_EMBED_DIM,
    )
    # SDXL's VAE has its own latent scale (sdxl-vae's config.json), read from the config by the render core.
    vae = build_tiny_vae(TINY_XL_SEED + 1, scaling_factor=0.13025)
    torch.manual_seed(TINY_XL_SEED + 2)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden_size=TINY_XL_TEXT_HIDDEN))
    torch.manual_seed(TINY_XL_SEED + 3)
    # SDXL's second encoder is OpenCLIP (gelu, not CLIP's quick_gelu) with a projection of its pooled output.
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_text_config(
            tokenizer,
            hidden_size=TINY_XL_TEXT_HIDDEN_2,
            intermediate_size=2 * TINY_XL_TEXT_HIDDEN_2,
            hidden_act="gelu",
            projection_dim=TINY_XL_PROJECTION_DIM,
        )
    )
    # stable-diffusion-xl-base-1.0's own scheduler_config.json (its leading spacing and offset included).
    scheduler = EulerDiscreteScheduler.from_config(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        }
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,  # farm never calls the pipeline; no invisible-watermark dependency
    )


# How each preset is built; ensure_preset saves the result.
def build_tiny_controlnet() -> Any:
    """A ControlNet for tiny: ControlNetModel.from_unet(tiny's UNet) with weights from a fixed seed."""
    return controlnet_from_unet(build_tiny_pipeline().unet, TINY_CONTROLNET_SEED)


def controlnet_from_unet(unet: Any, seed: int) -> Any:
    """ControlNetModel.from_unet(unet) made to act: as from_unet builds it, its zero convolutions add
    exactly nothing at any scale; they get random weights from ``seed`` here, and the control image's
    embedding He-normal ones throughout, so the image's signal reaches the residuals (diffusers'
    default init lets it fade to ~1e-4 over the embedding's layers)."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONTROLNET_EMBEDDING)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * TINY_CONTROLNET_SCALE)
        for parameter in controlnet.controlnet_cond_embedding.parameters():
            std = (2 / parameter[0].numel()) ** 0.5 if parameter.ndim > 1 else 0.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return controlnet


PRESET_BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny": build_tiny_pipeline,
    "tiny-xl": build_tiny_xl_pipeline,
    "tiny-controlnet": build_tiny_controlnet,
}
