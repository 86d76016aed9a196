"""Model references -> their family -> loaded components.

A model reference is one of:

- a preset name (``tiny``, ``tiny-xl``), built once from a fixed seed into the farm cache (farm.presets);
- a diffusers folder (one holding ``model_index.json``);
- a Hugging Face hub id (``org/name``) already present in the local hub cache;
- a single ``.safetensors`` checkpoint (loaded with ``from_single_file``);
- a pickle checkpoint (``.ckpt``, ``.bin``, ``.pt``, ``.pth``), refused unless allowed.

Resolving a reference (``resolve_model``) and reading its family (``reference_facts``) touch only JSON
files and safetensors headers, so the driver and the spec can call them without importing torch;
``load_components`` does the heavy lifting inside an actor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import FarmError

# PRESETS, ModelFacts and farm_home are also the spec's names for them, through this module.
from farm.presets import PRESET_FACTS, PRESETS, ModelFacts, ensure_preset, farm_home

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# The diffusers pipeline classes (model_index.json's _class_name) whose folders farm renders, with the
# pipeline class that loads them: the text-to-image pipelines of Stable Diffusion 1.x/2.x and SDXL, and
# their img2img twins, which have the same components, so the text-to-image class loads them as they
# are. Everything else is refused before Ray starts: the inpainting, depth, upscale and pix2pix pipelines
# share those names but not the UNet's inputs, and SD3, Flux, PixArt, Kandinsky and the rest condition
# differently; a Stable Diffusion class would load them wrongly and every task would fail, three tries each.
RENDERED_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline",
}
RENDERED_FAMILIES = "SD 1.x, SD 2.x and SDXL"
# The families farm renders (ModelFacts.family, ResolvedModel.family, Components.family), in words for messages.
FAMILY_WORDS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# SD 2.x's text encoder is OpenCLIP ViT-H: gelu (SD 1.x's OpenAI CLIP uses quick_gelu), 1024 wide.
SD2_HIDDEN_ACT = "gelu"
SD2_CROSS_ATTENTION_DIM = 1024
# Key name prefixes (in a single file's original layout, bare or under model.diffusion_model., or in
# diffusers' own) that mark a checkpoint of an architecture farm does not render, with its name (and
# article), checked in this order. diffusers tells these files apart by the same keys
# (loaders/single_file_utils.py, CHECKPOINT_KEY_NAMES).
OTHER_ARCHITECTURE_KEYS = (
    ("joint_blocks.", "an SD3"),  # the MMDiT of Stable Diffusion 3 and 3.5
    ("double_blocks.", "a Flux"),  # Flux's double-stream transformer blocks
    ("x_embedder.", "a DiT (PixArt or similar)"),  # a transformer's patch embedding, never in a UNet
)
# A single file's text encoders, by the keys of its original layout: SDXL keeps both under conditioner
# (CLIP ViT-L as embedders.0.transformer, OpenCLIP bigG as embedders.1.model), and its refiner only the
# OpenCLIP one, as embedders.0.model; SD 2.x's OpenCLIP sits under cond_stage_model.model, SD 1.x's
# CLIP under cond_stage_model.transformer.
SDXL_KEYS = "conditioner.embedders."
SDXL_FIRST_ENCODER_KEYS = "conditioner.embedders.0.transformer."
SD2_KEYS = "cond_stage_model.model."
SD1_KEYS = "cond_stage_model.transformer."
# The micro-conditioning embedding of a diffusers-layout SDXL UNet.
SDXL_UNET_KEYS = "add_embedding."
REFINER = "an SDXL refiner (it has no first text encoder)"
LDM_UNET_PREFIX = "model.diffusion_model."
# A single file's first UNet convolution, (channels, in_channels, 3, 3): its in_channels is the latent
# channels farm feeds (4), or more for a UNet that also takes an image or mask (inpainting 9, depth 5,
# instruct-pix2pix 8, the x4 upscaler 7), which farm's text-to-image and img2img loop never gives.
UNET_IN_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight")
LATENT_CHANNELS = 4
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(FarmError):
    """A model reference that cannot be resolved or loaded; the message is for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points on this node, how to load it, and its family."""

    ref: str
    kind: str  # "preset" | "folder" | "single_file"
    path: str
    config: str | None = None  # a diffusers folder whose configs a single file uses
    allow_pickle: bool = False  # may a folder's .bin (pickle) weights be loaded
    family: str = "sd1"  # "sd1" | "sd2" | "sdxl": which pipeline class loads it


def is_known_model_ref(ref: str) -> bool:
    """Cheap syntactic check used by the spec: a preset, an existing path or a hub id."""
    if ref in PRESETS or HUB_ID.fullmatch(ref):
        return True
    try:
        return Path(ref).expanduser().exists()
    except (OSError, RuntimeError):  # a name too long for the OS, ~unknown-user
        return False


def resolve_model(ref: str, allow_pickle: bool = False, config: str | None = None) -> ResolvedModel:
    """Turn a model reference into a local path and its family, with a clear error when it cannot be, or
    when it holds an architecture farm does not render (read from model_index.json and the configs beside
    it, or a single file's header, never the weights)."""
    if ref in PRESETS:
        return ResolvedModel(ref, "preset", str(ensure_preset(ref)), family=PRESET_FACTS[ref].family)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model {ref!r}: folder has no model_index.json (not a diffusers pipeline folder)")
        family = pipeline_family(path, f"model {ref!r}")
        return ResolvedModel(ref, "folder", str(path.resolve()), allow_pickle=allow_pickle, family=family)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelError(
                f"model {ref!r}: {suffix} checkpoints are pickle files that can run arbitrary code when loaded; "
                "convert it to .safetensors, or pass --allow-pickle if you trust its source"
            )
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise ModelError(f"model {ref!r}: expected a .safetensors file, a diffusers folder or a hub id")
        family = single_file_family(path, f"model {ref!r}") if suffix == ".safetensors" else None
        config_family = None
        if config is not None and (Path(config).expanduser() / "model_index.json").is_file():
            config_family = pipeline_family(Path(config).expanduser(), f"model_config {config!r}")
        # SD 1.x and 2.x configs differ in sizes that loading reports; SDXL and SD differ in pipeline class.
        if family and config_family and family != config_family and "sdxl" in (family, config_family):
            raise ModelError(
                f"model {ref!r} is {FAMILY_WORDS[family]} but its model_config {config!r} is "
                f"{FAMILY_WORDS[config_family]}; give the configs of the checkpoint's own architecture"
            )
        family = family or config_family or "sd1"
        return ResolvedModel(ref, "single_file", str(path.resolve()), config, family=family)
    if HUB_ID.fullmatch(ref):
        folder = find_in_hub_cache(ref)
        family = pipeline_family(Path(folder), f"model {ref!r}")
        return ResolvedModel(ref, "folder", folder, allow_pickle=allow_pickle, family=family)
    raise ModelError(
        f"model {ref!r}: not a preset ({', '.join(PRESETS)}), an existing folder or file, or a hub id (org/name)"
    )


def pipeline_family(folder: Path, what: str) -> str:
    """The family of a diffusers folder; ModelError unless its model_index.json names a pipeline farm
    renders (RENDERED_PIPELINES) with a text-to-image UNet and a first text encoder."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{what}: cannot read its model_index.json ({exc.strerror or exc})") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ModelError(f"{what}: its model_index.json is not valid JSON ({exc})") from exc
    name = index.get("_class_name") if isinstance(index, dict) else None
    rendered = f"{RENDERED_FAMILIES}: {', '.join(RENDERED_PIPELINES)}"
    if not isinstance(name, str) or not name:
        raise ModelError(f"{what}: its model_index.json names no pipeline (_class_name); farm renders {rendered}")
    if name not in RENDERED_PIPELINES:
        raise ModelError(f"{what}: pipeline {_shown(name)} is not one farm renders ({rendered})")
    family = index_family(index, folder)
    if family is None:
        raise ModelError(f"{what}: {REFINER}, not a model farm renders ({RENDERED_FAMILIES} base models)")
    channels = read_json(folder / "unet" / "config.json").get("in_channels", LATENT_CHANNELS)
    if channels != LATENT_CHANNELS:
        raise ModelError(unet_channels_message(what, channels))
    return family


def index_family(index: dict[str, Any], folder: Path) -> str | None:
    """The family of a rendered pipeline's model_index.json (and the configs beside it); None for an
    SDXL refiner, whose first text encoder is null (it conditions on OpenCLIP bigG alone)."""
    if RENDERED_PIPELINES.get(str(index.get("_class_name"))) == "StableDiffusionXLPipeline":
        encoder = index.get("text_encoder")
        if not isinstance(encoder, list) or not encoder or encoder[0] is None:
            return None
        return "sdxl"
    text_config = read_json(folder / "text_encoder" / "config.json")
    unet_config = read_json(folder / "unet" / "config.json")
    if (
        text_config.get("hidden_act") == SD2_HIDDEN_ACT
        or unet_config.get("cross_attention_dim") == SD2_CROSS_ATTENTION_DIM
    ):
        return "sd2"
    return "sd1"


def unet_channels_message(what: str, channels: Any) -> str:
    """The one line refusing a UNet that takes more than the latents (an image or a mask as well)."""
    return (
        f"{what}: its UNet takes {_shown(channels)} input channels (an inpainting, depth, instruct-pix2pix or "
        f"upscaler model), not the {LATENT_CHANNELS} of the text-to-image UNets farm renders"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def single_file_family(path: Path, what: str) -> str | None:
    """The family of a .safetensors checkpoint from its header (key names and shapes; no tensor is
    read); ModelError when they show an architecture farm does not render. None when the header cannot
    be read (loading reports it) or names no text encoder (a UNet alone: its configs decide)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = list(fh.keys())
            first = next((fh.get_slice(key).get_shape() for key in UNET_IN_KEYS if key in keys), None)
    except (OSError, SafetensorError):
        return None
    for prefix, name in OTHER_ARCHITECTURE_KEYS:
        for key in keys:
            bare = key.removeprefix(LDM_UNET_PREFIX)
            if bare.startswith(prefix):
                found = key[: len(key) - len(bare)] + prefix  # our own words: no text from the file
                raise ModelError(
                    f"{what}: {name} checkpoint (it has {found}* keys), "
                    f"not an architecture farm renders ({RENDERED_FAMILIES})"
                )
    if first is not None and len(first) == 4 and first[1] != LATENT_CHANNELS:
        raise ModelError(unet_channels_message(what, first[1]))
    return keys_family(keys, what)


def keys_family(keys: list[str], what: str) -> str | None:
    """A single file's family from where its text encoders sit; ModelError for an SDXL refiner."""
    if any(key.startswith(SDXL_KEYS) for key in keys):
        if not any(key.startswith(SDXL_FIRST_ENCODER_KEYS) for key in keys):
            raise ModelError(f"{what}: {REFINER}, not a model farm renders ({RENDERED_FAMILIES} base models)")
        return "sdxl"
    if any(key.removeprefix(LDM_UNET_PREFIX).startswith(SDXL_UNET_KEYS) for key in keys):
        return "sdxl"
    if any(key.startswith(SD2_KEYS) for key in keys):
        return "sd2"
    if any(key.startswith(SD1_KEYS) for key in keys):
        return "sd1"
    return None


def reference_facts(ref: str, config: str | None = None) -> ModelFacts | None:
    """A model's family, native size and prediction type from its reference alone (presets' constants,
    model_index.json and the configs beside it, a single file's header keys); None when the reference
    cannot be read here or is not a model farm renders (resolve_model says why)."""
    if ref in PRESETS:
        return PRESET_FACTS[ref]
    try:
        path = Path(ref).expanduser()
        if path.is_dir():
            return folder_facts(path)
        if path.is_file():
            return single_file_facts(path, config)
    except (OSError, RuntimeError, ModelError):  # unreadable, ~unknown-user, or refused
        return None
    if HUB_ID.fullmatch(ref):
        folder = cached_snapshot(ref)
        return folder_facts(Path(folder)) if folder is not None else None
    return None


def folder_facts(folder: Path) -> ModelFacts | None:
    """What a diffusers folder's JSON files say: family, native size (UNet sample size x VAE factor) and
    the scheduler's prediction type; None unless it is a pipeline farm renders."""
    index = read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if not isinstance(name, str) or name not in RENDERED_PIPELINES:
        return None
    family = index_family(index, folder)
    if family is None:
        return None
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    native = None
    sample, levels = unet.get("sample_size"), vae.get("block_out_channels")
    if isinstance(levels, list) and levels:
        factor = 2 ** (len(levels) - 1)
        if isinstance(sample, int) and not isinstance(sample, bool):
            native = (sample * factor, sample * factor)
        elif isinstance(sample, list) and len(sample) == 2 and all(isinstance(s, int) for s in sample):
            native = (sample[0] * factor, sample[1] * factor)
    prediction = read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type")
    return ModelFacts(family, native, prediction if isinstance(prediction, str) else None)


def single_file_facts(path: Path, config: str | None) -> ModelFacts | None:
    """A single file's family from its keys; its native size and prediction type from its config folder
    (a path or a cached hub id), when given, else unknown."""
    from_config = None
    if config is not None:
        folder = Path(config).expanduser()
        if not folder.is_dir() and HUB_ID.fullmatch(config):
            cached = cached_snapshot(config)
            folder = Path(cached) if cached is not None else folder
        from_config = folder_facts(folder) if folder.is_dir() else None
    family = single_file_family(path, f"model {str(path)!r}") if path.suffix.lower() == ".safetensors" else None
    family = family or (from_config.family if from_config is not None else None)
    if family is None:
        return None
    if from_config is None:
        return ModelFacts(family, None, None)
    return ModelFacts(family, from_config.native_size, from_config.prediction_type)


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
    # Prompt encoders the render core keeps for this model (farm.conditioning.prompt_encoder).
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
    # The model's own safety checker and its image preprocessor, loaded only when a job asks for the
    # check (load_components(safety_checker=True)); farm.safety runs them.
    safety_checker: Any = field(default=None, repr=False)
    feature_extractor: Any = field(default=None, repr=False)
    # The render path (load_components(compile=True)): torch.compile's mode, None for eager, and
    # whether the UNet and VAE hold channels_last weights. Both change the bytes: rows record them.
    compile_mode: str | None = None
    channels_last: bool = False

    @property
    def vae_scale_factor(self) -> int:
        """How much the VAE downsamples: 2 per level after the first, as diffusers' pipelines compute it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """The channels of the latents the UNet denoises (4 for every family farm renders)."""
        return self.unet.config.in_channels


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, requested: str | None = None) -> str:
    """fp16 on CUDA, fp32 on CPU, unless the user asked for another."""
    if requested and requested != "auto":
        return requested
    return "float16" if device == "cuda" else "float32"


def load_pipeline(model: ResolvedModel, dtype: str, safety_checker: bool = False) -> Any:
    """Load the family's pipeline (StableDiffusionXLPipeline for SDXL, StableDiffusionPipeline for SD 1.x
    and 2.x) through diffusers' own loaders; never downloads. SD's safety checker only when asked."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if model.family == "sdxl" else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if model.family == "sdxl":
        kwargs["add_watermarker"] = False  # only the pipeline's own __call__ watermarks, and farm never calls it
    elif not safety_checker:
        kwargs["safety_checker"] = None  # SDXL has no such component; SD's is loaded only when asked for
    try:
        if model.kind == "single_file":
            kwargs["config"] = model.config or default_single_file_config(model)
            return pipeline_class.from_single_file(model.path, **kwargs)
        # A folder whose weights are only .bin files holds pickles: refused like a .ckpt.
        safetensors_only = None if model.allow_pickle else True  # None: either format, as diffusers defaults
        return pipeline_class.from_pretrained(model.path, use_safetensors=safetensors_only, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # diffusers raises many types; the user needs one clear line
        hint = ""
        if model.kind == "folder" and not model.allow_pickle and "safetensors" in str(exc).lower():
            hint = " (its weights may be .bin pickle files: convert them to .safetensors, or pass --allow-pickle)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {model.ref!r}: could not load from {model.path}: {first}{hint}") from exc


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


def load_components(
    model: ResolvedModel, device: str, dtype: str, safety_checker: bool = False, compile: bool | str = False
) -> Components:
    """Load the model stack onto a device, in eval mode, with its content hash; with ``safety_checker``,
    the model's own safety checker and feature extractor too (farm.safety runs them).

    ``compile`` turns on the compiled render path (farm.compiled): True takes the device's mode, a
    string is a recorded ``compile_mode`` to rebuild (farm reproduce). Loading stays as fast: the
    first UNet call and the first decode of each shape compile (the warm-up).
    """
    from farm.compiled import CompileError, compile_mode, compile_model

    try:
        mode = compile_mode(device, compile)
    except CompileError as exc:
        raise ModelError(f"model {model.ref!r}: {exc}") from exc
    pipe = load_pipeline(model, dtype, safety_checker)
    checker = getattr(pipe, "safety_checker", None) if safety_checker else None
    extractor = getattr(pipe, "feature_extractor", None) if safety_checker else None
    if safety_checker and (checker is None or extractor is None):
        raise ModelError(
            f"model {model.ref!r} has no safety_checker component; name a checker with safety_check.checker"
        )
    pipe.to(device)
    sdxl = model.family == "sdxl"
    text_encoder_2 = pipe.text_encoder_2 if sdxl else None
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_2, checker):
        if module is not None:
            module.eval().requires_grad_(False)
    if mode is not None:
        compile_model(pipe.unet, pipe.vae, mode)
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler_config=dict(pipe.scheduler.config),
        device=device,
        dtype=dtype,
        model_hash=model_hash(model.path),
        family=model.family,
        tokenizer_2=pipe.tokenizer_2 if sdxl else None,
        text_encoder_2=text_encoder_2,
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)) if sdxl else False,
        pipeline=pipe,
        safety_checker=checker,
        feature_extractor=extractor,
        compile_mode=mode,
        channels_last=mode is not None,
    )


def render_path(components: Components) -> dict[str, Any]:
    """The manifest columns that say how the images were computed beyond the model and dtype: the
    compiled path (compile_mode, channels_last, torch and triton versions) and the GPU (name, CUDA,
    cuDNN). A compiled image's PNG carries them too (its ``render_path``), for farm reproduce."""
    import torch

    from farm.compiled import INDUCTOR_MODES, triton_version

    cuda = components.device == "cuda"
    cudnn = torch.backends.cudnn.version() if cuda else None
    # inductor writes Triton kernels on a GPU only (C++ on a CPU); other backends generate no code.
    triton = cuda and components.compile_mode in INDUCTOR_MODES
    return {
        "compile_mode": components.compile_mode,
        "channels_last": components.channels_last,
        "torch_version": torch.__version__,  # a column already; here too for the PNG's render_path
        "triton_version": triton_version() if triton else None,
        "gpu_name": torch.cuda.get_device_name() if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": str(cudnn) if cudnn is not None else None,
    }
