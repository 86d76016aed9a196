"""LoRA files -> adapters in the loaded model, switched batch by batch; and A1111's ``Lora hashes``.

``apply_loras(components, batch's loras, allow_pickle)`` is what an actor calls before each batch:
through the model's own adapter cache (``LoraAdapters``, kept with its pipeline) it loads the files
not loaded yet (``load_lora_weights``, the adapter named from the file's sha256, so a file loads once
per actor for a whole job), evicts the least recently used beyond ``ADAPTERS_KEPT``
(``delete_adapters``), activates the entries with a weight (``set_adapters``) or, with none, disables
every LoRA layer (``disable_lora``), so a weight of 0 gives the image without the LoRA bit for bit,
and sets ``components.lora_key`` to the active set.

Layouts: diffusers/PEFT (``unet.<module>.lora_A.weight``, as ``save_lora_weights`` writes) and
kohya/A1111 (``lora_unet_<module>.lora_down.weight`` with ``alpha``; ``lora_te_``, ``lora_te1_``,
``lora_te2_`` for text encoders), which diffusers converts. Pickles (anything but .safetensors) are
refused unless allowed, and then read with ``torch.load(weights_only=True)`` (DESIGN.md, "Safety").
Torch, diffusers and peft are imported inside functions: ``a1111_lora_hashes`` needs none of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from farm.errors import FarmError
from farm.models import FAMILY_WORDS, Components, file_sha256
from farm.spec import Lora

# Adapters kept loaded per model. Each stays on the device while loaded: a typical SD 1.x LoRA holds
# 10-150 MB of weights, an SDXL one up to ~900 MB in fp16; eight covers a job that compares several
# LoRAs (or sweeps weights of a few) without reading a file twice, within a few GB.
ADAPTERS_KEPT = 8
# The pipeline components a LoRA file adapts (SD: unet, text_encoder; SDXL: text_encoder_2 too).
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The down (A) factor of one adapted layer, in each layout diffusers reads: PEFT's lora_A, kohya's
# lora_down, diffusers' older lora.down, lora_linear_layer.down (text encoders) and to_q_lora.down
# (attention processors). One per layer, so counting them counts the layers a file adapts.
DOWN_KEY = re.compile(r"(\.lora_A|\.lora_down|[._]lora\.down|\.lora_linear_layer\.down)\.weight$")
# torch's words for a parameter whose shape differs between a file and the model.
SIZE_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)
# The tail peft gives an adapter's parameter name: <layer>.lora_A.<adapter>.weight.
LORA_PARAMETER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.[^.]+\.(weight|bias)$")
# Longest piece of a library's message put into one of ours (some list every key of a file).
MESSAGE_LIMIT = 200
# A1111 writes the first 12 hex digits of a LoRA's hash (extensions-builtin/Lora/network.py, shorthash).
A1111_HASH_DIGITS = 12
# Characters A1111 removes from a LoRA's name in its "Lora hashes" field, which uses them as separators.
A1111_NAME_SEPARATORS = str.maketrans("", "", ":,")


class LoraError(FarmError):
    """A LoRA file that cannot be applied to the loaded model; the message names the file."""


class LoraAdapters:
    """The LoRA adapters loaded into one model's pipeline, least recently used first: their names and
    the active set, not the model, which ``apply`` is given (so a cache never keeps a dropped model alive)."""

    def __init__(self, kept: int = ADAPTERS_KEPT) -> None:
        self.kept = kept
        self.loaded: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name
        self.weights: dict[str, float] = {}  # the active set: sha256 -> weight

    def apply(self, components: Components, loras: Sequence[Lora], allow_pickle: bool = False) -> None:
        """Make ``loras`` (a batch's, in order) the active adapters of ``components``; () means none.

        Every file is loaded (a bad one fails whatever its weight); only entries with a weight are
        activated. A file named twice counts once with the sum of its weights. Raises ``LoraError``
        naming the file, the adapters active before left as they were.
        """
        weights: dict[str, float] = {}
        try:
            for lora in loras:
                sha = self.load(components, lora, allow_pickle)
                weights[sha] = weights.get(sha, 0.0) + float(lora.weight)
        except LoraError:
            self.activate(components, self.weights)  # loading may switch adapters in the layers it touched
            raise
        self.evict(components.pipeline, keep=weights)
        self.activate(components, {sha: weight for sha, weight in weights.items() if weight != 0})

    def load(self, components: Components, lora: Lora, allow_pickle: bool) -> str:
        """Load one file as an adapter unless it is loaded already -> its sha256, now most recently used."""
        if lora.sha256 in self.loaded:
            self.loaded.move_to_end(lora.sha256)
            return lora.sha256
        pickled = is_pickle(lora.path)
        if pickled and not allow_pickle:
            raise LoraError(
                f"{lora.path}: not a .safetensors file: a pickle LoRA (.bin, .pt, .ckpt) can run arbitrary code "
                "when loaded; convert it to .safetensors, or pass --allow-pickle if you trust its source"
            )
        sha = checked_sha256(lora)
        if sha in self.loaded:  # no sha256 recorded, and the same bytes are loaded already
            self.loaded.move_to_end(sha)
            return sha
        source = read_pickle(lora.path) if pickled else lora.path
        expected = len(down_keys(source if isinstance(source, dict) else header_keys(lora.path), lora.path))
        name = adapter_name(sha)
        pipeline = components.pipeline
        try:
            with warnings.catch_warnings():
                # peft warns whenever a model gets a second adapter; holding several is the point here.
                warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
                # A path, not a state dict, so diffusers reads the adapter metadata in a safetensors header.
                pipeline.load_lora_weights(source, adapter_name=name)
        except Exception as exc:  # diffusers, peft and torch raise many types; the user needs one line
            pipeline.delete_adapters([name])  # what loaded before the failure
            raise LoraError(load_failure(lora.path, exc, components.family)) from exc
        adapted = adapted_layers(pipeline, name)
        if adapted < expected:  # keys no component of this model has: diffusers skips them with a warning
            pipeline.delete_adapters([name])
            raise LoraError(
                f"{lora.path}: {expected - adapted} of its {expected} LoRA layers have no match in this "
                f"{family_words(components.family)} model (a LoRA for another architecture?)"
            )
        self.loaded[sha] = name
        return sha

    def evict(self, pipeline: Any, keep: dict[str, float]) -> None:
        """Delete least recently used adapters beyond ``kept``, never one in ``keep`` (the batch's)."""
        for sha in list(self.loaded):
            if len(self.loaded) <= self.kept:
                break
            if sha not in keep:
                pipeline.delete_adapters([self.loaded.pop(sha)])

    def activate(self, components: Components, weights: dict[str, float]) -> None:
        """Switch to these adapters at these weights; none -> every LoRA layer off (the plain model)."""
        pipeline = components.pipeline
        if weights:
            pipeline.enable_lora()  # disable_lora switched the layers off; set_adapters leaves that as is
            pipeline.set_adapters([self.loaded[sha] for sha in weights], list(weights.values()))
        elif self.loaded:
            pipeline.disable_lora()
        freeze(pipeline)
        self.weights = dict(weights)
        components.lora_key = tuple(weights.items())


# Each loaded model's adapter cache, by its pipeline; weak, so a model an actor drops takes its cache along.
ADAPTER_CACHES: weakref.WeakKeyDictionary[Any, LoraAdapters] = weakref.WeakKeyDictionary()


def apply_loras(components: Components, loras: Sequence[Lora], allow_pickle: bool = False) -> None:
    """Switch the model's LoRA adapters to a batch's ``loras`` before rendering it (``()``: none), through
    the model's own adapter cache. Raises ``LoraError`` (one line naming the file) for a file that cannot
    be applied; the batch's tasks fail with it, and the next batch starts from a consistent state."""
    pipeline = components.pipeline
    if pipeline is None:
        if loras:
            raise ValueError("components.pipeline is None: LoRA adapters load into the model's pipeline")
        components.lora_key = ()
        return
    adapters = ADAPTER_CACHES.get(pipeline)
    if adapters is None:
        adapters = ADAPTER_CACHES[pipeline] = LoraAdapters()
    adapters.apply(components, loras, allow_pickle)


def adapter_name(sha256: str) -> str:
    """The adapter's name in the pipeline: from the file's content, so the same bytes load once."""
    return f"lora_{sha256[:16]}"


def is_pickle(path: str) -> bool:
    """Anything but .safetensors may be a pickle (.bin, .pt, .ckpt, ...)."""
    return Path(path).suffix.lower() != ".safetensors"


def checked_sha256(lora: Lora) -> str:
    """The file's sha256, which must be the one the job recorded (the manifest row is the recipe)."""
    try:
        actual = file_sha256(lora.path)
    except OSError as exc:
        raise LoraError(f"{lora.path}: cannot read ({exc.strerror or exc})") from exc
    if lora.sha256 and actual != lora.sha256:
        raise LoraError(
            f"{lora.path}: changed since the job was read (sha256 {actual[:12]}..., expected {lora.sha256[:12]}...)"
        )
    return actual


def header_keys(path: str) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return list(fh.keys())
    except (OSError, SafetensorError) as exc:
        raise LoraError(f"{path}: cannot read as safetensors ({short(exc)})") from exc


def read_pickle(path: str) -> dict[str, Any]:
    """A pickle LoRA's state dict, read without running code: tensors and plain containers only."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a refused object; RuntimeError, EOFError for a corrupt file
        raise LoraError(f"{path}: cannot read as a torch.save file of tensors ({short(exc)})") from exc
    if not isinstance(state, dict):
        raise LoraError(f"{path}: holds a {type(state).__name__}, not a LoRA state dict")
    return state


def down_keys(keys: Any, path: str) -> list[str]:
    """The keys of a file's LoRA down factors, one per adapted layer; LoraError when there are none."""
    found = [key for key in keys if isinstance(key, str) and DOWN_KEY.search(key)]
    if not found:
        raise LoraError(f"{path}: holds no LoRA layers (no lora_A or lora_down weights); not a LoRA file")
    return found


def adapted_layers(pipeline: Any, name: str) -> int:
    """How many layers of the pipeline's components hold adapter ``name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for part in LORA_COMPONENTS:
        model = getattr(pipeline, part, None)
        if model is None:
            continue
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and (
                name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {})
            ):
                count += 1
    return count


def freeze(pipeline: Any) -> None:
    """No gradients for adapter weights: set_adapters marks the active ones trainable, and farm only infers."""
    for part in LORA_COMPONENTS:
        model = getattr(pipeline, part, None)
        if model is not None:
            model.requires_grad_(False)


def family_words(family: str) -> str:
    """A model family in words (SD 1.x, SDXL)."""
    return FAMILY_WORDS.get(family, family)


def load_failure(path: str, exc: Exception, family: str) -> str:
    """One line for a file diffusers could not load: what does not fit, in our words where we can tell."""
    family = family_words(family)
    text = str(exc)
    mismatch = SIZE_MISMATCH.search(text)
    if mismatch:
        parameter, theirs, ours = mismatch.groups()
        layer = LORA_PARAMETER.sub("", parameter)  # the model's layer, without peft's lora_A.<adapter>.weight
        return (
            f"{path}: a LoRA for another architecture: its factor for layer {layer} is ({theirs}) in the file "
            f"but ({ours}) in this {family} model"
        )
    if "ignore_mismatched_sizes" in text:  # transformers: text-encoder shapes differ (its report is a log)
        return f"{path}: a LoRA for another architecture: its text encoder layers do not fit this {family} model"
    if "not found in the base model" in text:  # peft: none of the file's target layers exist here
        return f"{path}: a LoRA for another architecture: none of its layers are in this {family} model"
    return f"{path}: cannot load as a LoRA for this {family} model ({short(exc)})"


def short(exc: Exception) -> str:
    """An exception's first line, cut to MESSAGE_LIMIT characters (its type's name when it has none)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 1] + "…"


# ---------------------------------------------------------------------------------------
# A1111's "Lora hashes" (no torch)


def a1111_lora_hashes(loras: Sequence[Lora]) -> str:
    """The value A1111 writes after ``Lora hashes:`` for these LoRAs: ``name: hash, name: hash``.

    The name is the file's stem without ``:`` and ``,``; a name given twice is written once, at its
    first place, with the last hash (A1111 fills a dict). Reads each file's header (and, unless the
    header holds kohya's ``sshs_model_hash``, its tensor data) once per process.
    """
    hashes: dict[str, str] = {}
    for lora in loras:
        hashes[Path(lora.path).stem.translate(A1111_NAME_SEPARATORS)] = a1111_short_hash(lora.path, lora.sha256)
    return ", ".join(f"{name}: {short_hash}" for name, short_hash in hashes.items())


@functools.lru_cache(maxsize=64)
def a1111_short_hash(path: str, sha256: str) -> str:
    """A1111's short hash of a LoRA file (network.py: ``shorthash``), cached per file content (``sha256``).

    For a .safetensors file: the header's ``sshs_model_hash`` when it holds one (kohya's sd-scripts
    store it), else the sha256 of the bytes after the header (kohya's "addnet" hash, A1111's
    ``hashes.addnet_hash_safetensors``); for any other file the sha256 of all its bytes. First 12 hex digits.
    """
    if is_pickle(path):
        return (sha256 or file_sha256(path))[:A1111_HASH_DIGITS]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            header = {}
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        stored = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
        if isinstance(stored, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", stored):
            return stored[:A1111_HASH_DIGITS]
        fh.seek(8 + size)
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:A1111_HASH_DIGITS]
