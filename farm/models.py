"""Model references -> loaded components.

A model reference is one of:

- a preset name (``tiny``), built once from a fixed seed into the farm cache;
- a diffusers folder (one holding ``model_index.json``);
- a Hugging Face hub id (``org/name``) already present in the local hub cache;
- a single ``.safetensors`` checkpoint (loaded with ``from_single_file``);
- a pickle checkpoint (``.ckpt``, ``.bin``, ``.pt``, ``.pth``), refused unless allowed.

Resolving a reference (``resolve_model``) touches only the file system, so the driver and
the spec can call it without importing torch; ``load_components`` does the heavy lifting
inside an actor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import FarmError

PRESETS = ("tiny",)
# Bumped whenever the tiny architecture or its vocabulary changes, so an old cache
# folder is never mistaken for the current preset.
TINY_VERSION = "v3"
TINY_SEED = 20221122
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# The diffusers pipeline classes (model_index.json's _class_name) whose folders farm renders: Stable
# Diffusion 1.x and 2.x as saved by the text-to-image pipeline or by its img2img twin, which has the
# same components (vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor),
# so StableDiffusionPipeline loads it as it is. Everything else is refused before Ray starts: the
# inpainting, depth, upscale and pix2pix pipelines share those names but not the UNet's inputs, and
# SDXL, SD3, Flux and the rest condition differently; StableDiffusionPipeline would load them wrongly
# and every task would fail, three tries each.
RENDERED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
RENDERED_FAMILIES = "Stable Diffusion 1.x and 2.x"
# Key name prefixes (in a single file's original layout, bare or under model.diffusion_model., or in
# diffusers' own) that mark a checkpoint of an architecture farm does not render, with its name (and article).
# diffusers tells these files apart by the same keys (loaders/single_file_utils.py, CHECKPOINT_KEY_NAMES).
OTHER_ARCHITECTURE_KEYS = (
    ("conditioner.embedders.", "an SDXL"),  # SDXL base and refiner: their text encoders sit under conditioner
    ("add_embedding.", "an SDXL"),  # a diffusers-layout SDXL UNet: the micro-conditioning embedding
    ("joint_blocks.", "an SD3"),  # the MMDiT of Stable Diffusion 3 and 3.5
    ("double_blocks.", "a Flux"),  # Flux's double-stream transformer blocks
)
LDM_UNET_PREFIX = "model.diffusion_model."
# A single file's first UNet convolution, (channels, in_channels, 3, 3): its in_channels is the latent
# channels farm feeds (4), or more for a UNet that also takes an image or mask (inpainting 9, depth 5,
# instruct-pix2pix 8, the x4 upscaler 7), which farm's text-to-image and img2img loop never gives.
UNET_IN_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight")
LATENT_CHANNELS = 4
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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


class ModelError(FarmError):
    """A model reference that cannot be resolved or loaded; the message is for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points on this node, and how to load it."""

    ref: str
    kind: str  # "preset" | "folder" | "single_file"
    path: str
    config: str | None = None  # a diffusers folder whose configs a single file uses
    allow_pickle: bool = False  # may a folder's .bin (pickle) weights be loaded


def farm_home() -> Path:
    """The farm cache folder: ``$FARM_HOME`` or ``~/.cache/farm``."""
    return Path(os.environ.get("FARM_HOME") or Path.home() / ".cache" / "farm")


def is_known_model_ref(ref: str) -> bool:
    """Cheap syntactic check used by the spec: a preset, an existing path or a hub id."""
    if ref in PRESETS or HUB_ID.fullmatch(ref):
        return True
    try:
        return Path(ref).expanduser().exists()
    except (OSError, RuntimeError):  # a name too long for the OS, ~unknown-user
        return False


def resolve_model(ref: str, allow_pickle: bool = False, config: str | None = None) -> ResolvedModel:
    """Turn a model reference into a local path, with a clear error when it cannot be, or when it
    holds an architecture farm does not render (read from model_index.json or a single file's
    header, never the weights)."""
    if ref in PRESETS:
        return ResolvedModel(ref, "preset", str(ensure_tiny()))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model {ref!r}: folder has no model_index.json (not a diffusers pipeline folder)")
        check_pipeline_class(path, f"model {ref!r}")
        return ResolvedModel(ref, "folder", str(path.resolve()), allow_pickle=allow_pickle)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelError(
                f"model {ref!r}: {suffix} checkpoints are pickle files that can run arbitrary code when loaded; "
                "convert it to .safetensors, or pass --allow-pickle if you trust its source"
            )
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise ModelError(f"model {ref!r}: expected a .safetensors file, a diffusers folder or a hub id")
        if suffix == ".safetensors":
            check_single_file(path, f"model {ref!r}")
        if config is not None and (Path(config).expanduser() / "model_index.json").is_file():
            check_pipeline_class(Path(config).expanduser(), f"model_config {config!r}")
        return ResolvedModel(ref, "single_file", str(path.resolve()), config)
    if HUB_ID.fullmatch(ref):
        folder = find_in_hub_cache(ref)
        check_pipeline_class(Path(folder), f"model {ref!r}")
        return ResolvedModel(ref, "folder", folder, allow_pickle=allow_pickle)
    raise ModelError(
        f"model {ref!r}: not a preset ({', '.join(PRESETS)}), an existing folder or file, or a hub id (org/name)"
    )


def check_pipeline_class(folder: Path, what: str) -> None:
    """ModelError unless the folder's model_index.json names a pipeline farm renders (RENDERED_PIPELINES)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{what}: cannot read its model_index.json ({exc.strerror or exc})") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ModelError(f"{what}: its model_index.json is not valid JSON ({exc})") from exc
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name in RENDERED_PIPELINES:
        return
    rendered = f"{', '.join(RENDERED_PIPELINES)}: {RENDERED_FAMILIES}"
    if not isinstance(name, str) or not name:
        raise ModelError(f"{what}: its model_index.json names no pipeline (_class_name); farm renders {rendered}")
    raise ModelError(f"{what}: pipeline {_shown(name)} is not one farm renders ({rendered})")


def check_single_file(path: Path, what: str) -> None:
    """ModelError when a .safetensors file's header (key names and shapes; no tensor is read) shows an
    architecture farm does not render. A header that cannot be read passes: loading reports it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = list(fh.keys())
            first = next((fh.get_slice(key).get_shape() for key in UNET_IN_KEYS if key in keys), None)
    except (OSError, SafetensorError):
        return
    for key in keys:
        bare = key.removeprefix(LDM_UNET_PREFIX)
        for prefix, family in OTHER_ARCHITECTURE_KEYS:
            if bare.startswith(prefix):
                found = key[: len(key) - len(bare)] + prefix  # our own words: no text from the file
                raise ModelError(
                    f"{what}: {family} checkpoint (it has {found}* keys), "
                    f"not an architecture farm renders ({RENDERED_FAMILIES})"
                )
    if first is not None and len(first) == 4 and first[1] != LATENT_CHANNELS:
        raise ModelError(
            f"{what}: its UNet takes {first[1]} input channels (an inpainting, depth, instruct-pix2pix or "
            f"upscaler checkpoint), not the {LATENT_CHANNELS} of the text-to-image UNets farm renders"
        )


def _shown(text: Any, limit: int = 80) -> str:
    """A name read from a file, for a one-line message: as is when plain, else a bounded repr."""
    if isinstance(text, str) and len(text) <= limit and re.fullmatch(r"[\w.\-]+", text):
        return text
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def cached_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> str | None:
    """The local snapshot folder of a hub repo, or None when it is not cached; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def find_in_hub_cache(repo_id: str) -> str:
    """The local snapshot folder of a hub id, with a clear error when it is not cached."""
    folder = cached_snapshot(repo_id)
    if folder is None:
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
            f"download it first (hf download {repo_id}) or give a local folder"
        )
    if not (Path(folder) / "model_index.json").is_file():
        raise ModelError(f"model {repo_id!r}: cached snapshot has no model_index.json (not a diffusers pipeline)")
    return folder


# ---------------------------------------------------------------------------------------
# Content hash


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: str | Path) -> str:
    """A content hash over every file of a model folder (or one file), cached by size and mtime.

    Hashing a multi-GB checkpoint takes seconds, so each file's digest is kept in
    ``$FARM_HOME/hashes.json`` and reused while its size and mtime are unchanged.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    cache_file = farm_home() / "hashes.json"
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    changed = False
    for f in files:
        stat = f.stat()
        key = f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = file_sha256(f)
            changed = True
        name = f.name if root.is_file() else f.relative_to(root).as_posix()
        digest.update(f"{name}:{cache[key]}\n".encode())
    if changed:
        _write_atomic(cache_file, json.dumps(cache, indent=0).encode())
    return digest.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------
# The tiny preset


def tiny_path() -> Path:
    return farm_home() / "models" / f"tiny-{TINY_VERSION}"


def ensure_tiny() -> Path:
    """Build the tiny preset into the farm cache once; later calls just return its folder."""
    target = tiny_path()
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
    try:
        staging.rename(target)
    except OSError:
        # Another process (a second actor) finished first; its copy is identical.
        shutil.rmtree(staging, ignore_errors=True)
    return target


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


def build_tiny_tokenizer() -> Any:
    """A real CLIPTokenizer over a small byte-level BPE vocabulary: bytes, then word merges."""
    from transformers import CLIPTokenizer

    byte_chars = byte_alphabet()
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
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


def build_tiny_pipeline() -> Any:
    """The Stable Diffusion 1.x architecture shrunk, weights from a fixed seed."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
    torch.manual_seed(TINY_SEED + 1)
    # Four levels, so the VAE downsamples by 8 and latents keep the real (4, H/8, W/8) shape.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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


# ---------------------------------------------------------------------------------------
# Loading


@dataclass
class Components:
    """The loaded model stack an actor holds for its lifetime."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    device: str
    dtype: str
    model_hash: str
    # Prompt encoders the render core keeps for this model (farm.render.prompt_encoder).
    encoders: dict[Any, Any] = field(default_factory=dict, repr=False)
    # The model's family ("sd1", "sd2", "sdxl"); SDXL's second tokenizer and text encoder (the one
    # with a projection, whose pooled output conditions the UNet), None for SD; its pipeline config's
    # force_zeros_for_empty_prompt (an empty negative prompt conditions as zeros).
    family: str = "sd1"
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    # The loaded diffusers pipeline: LoRA adapters load into it (farm.loras); rendering never calls it.
    pipeline: Any = field(default=None, repr=False)
    # The LoRA set applied now, ((sha256, weight), ...) as farm.loras set it: text embeddings depend
    # on it, so prompt encoders are kept per set.
    lora_key: tuple = ()


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, requested: str | None = None) -> str:
    """fp16 on CUDA, fp32 on CPU, unless the user asked for another."""
    if requested and requested != "auto":
        return requested
    return "float16" if device == "cuda" else "float32"


def load_pipeline(model: ResolvedModel, dtype: str) -> Any:
    """Load a StableDiffusionPipeline through diffusers' own loaders; never downloads."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "safety_checker": None, "local_files_only": True}
    try:
        if model.kind == "single_file":
            kwargs["config"] = model.config or default_single_file_config(model)
            return StableDiffusionPipeline.from_single_file(model.path, **kwargs)
        # A folder whose weights are only .bin files holds pickles: refused like a .ckpt.
        safetensors_only = None if model.allow_pickle else True  # None: either format, as diffusers defaults
        return StableDiffusionPipeline.from_pretrained(model.path, use_safetensors=safetensors_only, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # diffusers raises many types; the user needs one clear line
        hint = ""
        if model.kind == "folder" and not model.allow_pickle and "safetensors" in str(exc).lower():
            hint = " (its weights may be .bin pickle files: convert them to .safetensors, or pass --allow-pickle)"
        raise ModelError(f"model {model.ref!r}: could not load from {model.path}: {exc}{hint}") from exc


# The files diffusers fetches for a single file's configs (diffusers/loaders/single_file.py).
SINGLE_FILE_CONFIG_FILES = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def default_single_file_config(model: ResolvedModel) -> str:
    """The configs for a single file given no ``config``: its base model's, from the local hub cache.

    Given no ``config``, ``from_single_file`` downloads the base model's configs when they are not
    cached, even with ``local_files_only=True``; finding them here keeps loading offline.
    """
    import torch
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors import safe_open

    if Path(model.path).suffix.lower() != ".safetensors":
        raise ModelError(f"model {model.ref!r}: a pickle checkpoint needs model_config (a diffusers folder)")
    with safe_open(model.path, framework="pt") as fh:
        # diffusers tells base models apart by key names and shapes, which meta tensors carry.
        shapes = {key: torch.empty(fh.get_slice(key).get_shape(), device="meta") for key in fh.keys()}  # noqa: SIM118
    repo = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    folder = cached_snapshot(repo, SINGLE_FILE_CONFIG_FILES)
    if folder is None:
        raise ModelError(
            f"model {model.ref!r}: no model_config given and the configs of its base model {repo!r} are not in "
            f"the local Hugging Face cache; set model_config to a diffusers folder of the same architecture, "
            f"or fetch the configs first (hf download {repo} --include '*.json' --include '*.txt')"
        )
    return folder


def load_components(model: ResolvedModel, device: str, dtype: str) -> Components:
    """Load the model stack onto a device, in eval mode, with its content hash."""
    pipe = load_pipeline(model, dtype)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler_config=dict(pipe.scheduler.config),
        device=device,
        dtype=dtype,
        model_hash=model_hash(model.path),
    )
