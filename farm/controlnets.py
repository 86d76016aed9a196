"""ControlNet references -> loaded ControlNet modules, kept per model for an actor's lifetime.

A ControlNet reference (``ControlNetUnit.model``) is one of:

- a preset name (``tiny-controlnet``, for ``tiny``), built once from a fixed seed (farm.presets);
- a diffusers ControlNet folder (its ``config.json`` names ``ControlNetModel``);
- a Hugging Face hub id (``org/name``) of one, already in the local hub cache;
- a single ``.safetensors`` file, loaded with ``ControlNetModel.from_single_file``: in diffusers' layout
  beside its ``config.json`` (a folder's ``diffusion_pytorch_model.safetensors``), or in the original
  layout (``control_model.*``) with the configs diffusers infers for it, from the local hub cache;
- a pickle (``.ckpt``, ``.bin``, ``.pt``, ``.pth``, or a folder with only ``.bin`` weights), refused
  unless allowed, as ``farm.models`` refuses a pickle checkpoint (DESIGN.md, "Safety").

``load_controlnets(components, the batch's controlnet_models, allow_pickle)`` is what an actor calls
before each batch: through the model's own cache (``ControlNetCache``, kept with its UNet) it reads
each reference's config, checks that it fits the UNet (same family: cross-attention width, added
embeddings, block layout) before any weight is read, loads it onto the model's device and dtype in
eval mode without gradients, and keeps the ``CONTROLNETS_KEPT`` most recently used. Anything that
fails raises ``ControlNetError``: one line naming the reference. Torch and diffusers are imported
inside functions, so resolving a reference stays light.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import FarmError
from farm.models import FAMILY_WORDS, HUB_ID, PICKLE_SUFFIXES, Components, cached_snapshot
from farm.presets import CONTROLNET_PRESETS, ensure_preset

# ControlNets kept loaded per model, on its device: an SD 1.x ControlNet holds ~700 MB in fp16, an SDXL
# one up to ~2.5 GB. Three covers a job that compares a few (or chains two) without reading one twice.
CONTROLNETS_KEPT = 3
CONTROLNET_CLASS = "ControlNetModel"
# The config diffusers' from_pretrained reads, and the weights file beside it that from_single_file reads.
CONFIG_FILE = "config.json"
# The config entries a ControlNet shares with the UNet it steers: its residuals are added to the UNet's
# (same block widths and count), it reads the same text embeddings (cross_attention_dim) and, for SDXL,
# the same pooled embeddings and time ids (addition_embed_type, projection_class_embeddings_input_dim).
FITTING_FIELDS = (
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "in_channels",
    "block_out_channels",
    "layers_per_block",
)
# A control image is RGB (after its preprocessing).
CONTROL_CHANNELS = 3
# diffusers' ControlNetConditioningEmbedding downsamples once per entry after the first.
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)
MESSAGE_LIMIT = 200


class ControlNetError(FarmError):
    """A ControlNet that cannot be loaded or does not fit the model; the message names the reference."""


@dataclass(frozen=True)
class ControlNetSource:
    """Where a ControlNet reference points on this node and how to load it."""

    ref: str
    kind: str  # "folder" | "single_file"
    path: str
    config: str  # the folder whose config.json describes it
    allow_pickle: bool = False


# ---------------------------------------------------------------------------------------
# References (JSON files and safetensors headers only)


def resolve_controlnet(ref: str, allow_pickle: bool = False) -> ControlNetSource:
    """A ControlNet reference -> its local path and config folder, or ControlNetError saying why not."""
    if ref in CONTROLNET_PRESETS:
        return folder_source(ref, ensure_preset(ref), allow_pickle)
    path = Path(ref).expanduser()
    if path.is_dir():
        return folder_source(ref, path, allow_pickle)
    if path.is_file():
        return file_source(ref, path, allow_pickle)
    if HUB_ID.fullmatch(ref):
        folder = cached_snapshot(ref)
        if folder is None:
            raise ControlNetError(
                f"controlnet {ref!r} is not in the local Hugging Face cache; "
                f"download it first (hf download {ref}) or give a local folder"
            )
        return folder_source(ref, Path(folder), allow_pickle)
    raise ControlNetError(
        f"controlnet {ref!r}: not a preset ({', '.join(CONTROLNET_PRESETS)}), an existing folder or file, "
        "or a hub id (org/name)"
    )


def folder_source(ref: str, folder: Path, allow_pickle: bool) -> ControlNetSource:
    """A diffusers ControlNet folder; its weights must be .safetensors unless pickles are allowed."""
    check_config(ref, read_config(ref, folder))
    weights = {p.suffix.lower() for p in folder.iterdir() if p.is_file()}
    if ".safetensors" not in weights and weights & set(PICKLE_SUFFIXES) and not allow_pickle:
        raise ControlNetError(pickle_message(ref, "its weights are .bin"))
    return ControlNetSource(ref, "folder", str(folder.resolve()), str(folder.resolve()), allow_pickle)


def file_source(ref: str, path: Path, allow_pickle: bool) -> ControlNetSource:
    """A single file, with the configs beside it or, failing that, the ones diffusers infers from its keys."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ControlNetError(pickle_message(ref, f"{suffix} files are pickles"))
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise ControlNetError(f"controlnet {ref!r}: expected a .safetensors file, a diffusers folder or a hub id")
    folder = path.parent if (path.parent / CONFIG_FILE).is_file() else inferred_config(ref, path)
    check_config(ref, read_config(ref, folder))
    return ControlNetSource(ref, "single_file", str(path.resolve()), str(folder.resolve()), allow_pickle)


def inferred_config(ref: str, path: Path) -> Path:
    """The configs diffusers' from_single_file would fetch for this file (by its keys), from the hub cache."""
    if path.suffix.lower() != ".safetensors":
        raise ControlNetError(f"controlnet {ref!r}: a pickle ControlNet file needs its {CONFIG_FILE} beside it")
    import torch
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            # diffusers tells checkpoints apart by key names and shapes, which meta tensors carry.
            shapes = {key: torch.empty(fh.get_slice(key).get_shape(), device="meta") for key in fh.keys()}  # noqa: SIM118
        repo = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    except (OSError, SafetensorError) as exc:
        raise ControlNetError(f"controlnet {ref!r}: cannot read as safetensors ({short(exc)})") from exc
    except Exception as exc:  # diffusers raises several types for keys it does not know
        raise ControlNetError(f"controlnet {ref!r}: not a ControlNet checkpoint diffusers can read") from exc
    folder = cached_snapshot(repo, ["*.json"])
    if folder is None or not (Path(folder) / CONFIG_FILE).is_file():
        raise ControlNetError(
            f"controlnet {ref!r}: no {CONFIG_FILE} beside it and the configs of its base ControlNet {repo!r} are "
            f"not in the local Hugging Face cache; put its {CONFIG_FILE} beside it, or fetch them first "
            f"(hf download {repo} {CONFIG_FILE})"
        )
    return Path(folder)


def read_config(ref: str, folder: Path) -> dict[str, Any]:
    """A ControlNet folder's config.json, or ControlNetError unless it names a ControlNetModel."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ControlNetError(f"controlnet {ref!r}: no readable {CONFIG_FILE} (not a diffusers ControlNet)") from exc
    except ValueError as exc:
        raise ControlNetError(f"controlnet {ref!r}: its {CONFIG_FILE} is not valid JSON") from exc
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != CONTROLNET_CLASS:
        shown = name if isinstance(name, str) and name.isidentifier() else "nothing"
        raise ControlNetError(f"controlnet {ref!r}: its {CONFIG_FILE} names {shown}, not a {CONTROLNET_CLASS}")
    return config


def check_config(ref: str, config: dict[str, Any]) -> None:
    """Refuse what farm's loop does not run: guess-mode ControlNets and control images other than RGB."""
    if config.get("global_pool_conditions"):
        raise ControlNetError(
            f"controlnet {ref!r} pools its conditions (global_pool_conditions, run in guess mode), "
            "which farm does not run"
        )
    if config.get("conditioning_channels", CONTROL_CHANNELS) != CONTROL_CHANNELS:
        raise ControlNetError(
            f"controlnet {ref!r} takes {config.get('conditioning_channels')}-channel control images, "
            f"not the {CONTROL_CHANNELS} (RGB) farm gives"
        )


def check_fit(ref: str, config: dict[str, Any], components: Components) -> None:
    """ControlNetError unless the ControlNet's config fits the model's UNet (and its VAE's scale)."""
    unet = components.unet.config
    family = FAMILY_WORDS.get(components.family, components.family)
    for name in FITTING_FIELDS:
        theirs, ours = comparable(config.get(name)), comparable(unet.get(name))
        if theirs != ours:
            raise ControlNetError(
                f"controlnet {ref!r} is for another model: its {name} is {theirs}, "
                f"this {family} model's UNet has {ours}"
            )
    embedding = config.get("conditioning_embedding_out_channels") or DEFAULT_EMBEDDING_CHANNELS
    factor = 2 ** (len(embedding) - 1)
    if factor != components.vae_scale_factor:
        raise ControlNetError(
            f"controlnet {ref!r} downsamples control images by {factor}, "
            f"this {family} model's VAE by {components.vae_scale_factor}"
        )


def comparable(value: Any) -> Any:
    """A config value as JSON gives it (tuples as lists), so a saved config and a live one compare."""
    return list(value) if isinstance(value, tuple) else value


def pickle_message(ref: str, why: str) -> str:
    """The one line refusing a pickle ControlNet."""
    return (
        f"controlnet {ref!r}: {why}, which can run arbitrary code when loaded; "
        "convert it to .safetensors, or pass --allow-pickle if you trust its source"
    )


def short(exc: Exception) -> str:
    """An exception's first line, cut to MESSAGE_LIMIT characters (its type's name when it has none)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 1] + "…"


# ---------------------------------------------------------------------------------------
# Loading


def load_controlnet(source: ControlNetSource, components: Components) -> Any:
    """Load a ControlNet onto the model's device and dtype, in eval mode, without gradients; never downloads."""
    import torch
    from diffusers import ControlNetModel

    kwargs: dict[str, Any] = {"dtype": getattr(torch, components.dtype), "local_files_only": True}
    try:
        if source.kind == "single_file":
            model = ControlNetModel.from_single_file(source.path, config=source.config, **kwargs)
        else:
            # A folder whose weights are only .bin files holds pickles: refused unless allowed.
            safetensors_only = None if source.allow_pickle else True
            model = ControlNetModel.from_pretrained(source.path, use_safetensors=safetensors_only, **kwargs)
    except Exception as exc:  # diffusers, torch and safetensors raise many types; the user needs one line
        raise ControlNetError(f"controlnet {source.ref!r}: could not load from {source.path}: {short(exc)}") from exc
    return model.to(components.device).eval().requires_grad_(False)


class ControlNetCache:
    """The ControlNets loaded for one model, least recently used first, by resolved path."""

    def __init__(self, kept: int = CONTROLNETS_KEPT) -> None:
        self.kept = kept
        self.loaded: OrderedDict[str, Any] = OrderedDict()

    def get(self, components: Components, refs: Sequence[str], allow_pickle: bool = False) -> list[Any]:
        """The modules of ``refs`` (a batch's, in order), loading those not loaded yet; evicts the
        least recently used beyond ``kept``, never one of ``refs``."""
        modules = []
        for ref in refs:
            source = resolve_controlnet(ref, allow_pickle)
            modules.append(self.load(source, components))
        keep = {id(module) for module in modules}
        for path in list(self.loaded):
            if len(self.loaded) <= self.kept:
                break
            if id(self.loaded[path]) not in keep:
                del self.loaded[path]
        return modules

    def load(self, source: ControlNetSource, components: Components) -> Any:
        """One ControlNet, loaded unless it is loaded already; now most recently used."""
        key = f"{source.kind}:{source.path}"
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        # Checked on its config before its weights are read: a misfit costs no load, and fails alike every time.
        check_fit(source.ref, read_config(source.ref, Path(source.config)), components)
        module = self.loaded[key] = load_controlnet(source, components)
        return module


# Each loaded model's ControlNets, by its UNet; weak, so a model an actor drops takes its ControlNets along.
CONTROLNET_CACHES: weakref.WeakKeyDictionary[Any, ControlNetCache] = weakref.WeakKeyDictionary()


def load_controlnets(components: Components, refs: Sequence[str], allow_pickle: bool = False) -> list[Any]:
    """The loaded ControlNets of a batch's ``controlnet_models`` (``()``: none), through the model's own
    cache, so each loads once per actor. Raises ``ControlNetError`` (one line naming the reference)."""
    if not refs:
        return []
    cache = CONTROLNET_CACHES.get(components.unet)
    if cache is None:
        cache = CONTROLNET_CACHES[components.unet] = ControlNetCache()
    return cache.get(components, refs, allow_pickle)
