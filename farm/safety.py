"""The opt-in safety checker: Stable Diffusion's own NSFW classifier, run on finished images.

``load_checker`` takes the checker a loaded model carries (its ``safety_checker`` and
``feature_extractor`` components) or loads one from a folder; ``check_images`` returns one verdict
per image and leaves the images alone (diffusers' checker blacks flagged ones out; the job decides
what happens to them: ``images.blur`` makes a flagged image unrecognisable). Torch, diffusers and
transformers are imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from farm.errors import FarmError

# The two subfolders of a diffusers pipeline folder that make up its checker, and the file each must hold.
CHECKER_FOLDER = "safety_checker"
PROCESSOR_FOLDER = "feature_extractor"
CHECKER_CONFIG = "config.json"
PROCESSOR_CONFIG = "preprocessor_config.json"
# Weight files transformers loads for a model folder: safetensors (whole or sharded), or pickles.
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# The warning diffusers' checker logs for a flagged image; it says the image was replaced by a black
# one, which is not what farm does with it, so it is dropped (the row's nsfw field says it instead).
BLACKOUT_WARNING = "Potential NSFW content was detected"


class SafetyError(FarmError):
    """A safety checker that cannot be found or loaded; the message is for the user."""


@dataclass
class Checker:
    """A loaded safety checker: diffusers' StableDiffusionSafetyChecker and its CLIP image processor."""

    model: Any  # StableDiffusionSafetyChecker, in eval mode on ``device``
    processor: Any  # CLIPImageProcessorPil: the same pixels on every machine, torchvision or not
    device: str
    dtype: str
    path: str | None = None  # the folder it was loaded from; None for a model's own components


class BlackoutWarningFilter(logging.Filter):
    """Drops diffusers' 'black image will be returned' warning, which farm's use of the checker makes untrue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(BLACKOUT_WARNING)


BLACKOUT_FILTER = BlackoutWarningFilter()


def load_checker(source: str | os.PathLike[str] | Any, device: str, dtype: str, allow_pickle: bool = False) -> Checker:
    """A checker from a folder, a model's Components (or pipeline), or a (checker, processor) pair."""
    path: str | None = None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).expanduser()
        model, processor = load_folder(folder, device, dtype, allow_pickle)
        path = str(folder)
    else:
        if isinstance(source, tuple) and len(source) == 2:
            model, processor = source
        else:
            model = getattr(source, "safety_checker", None)
            processor = getattr(source, "feature_extractor", None)
        if model is None or processor is None:
            raise SafetyError(
                "safety check: the model has no safety checker (safety_checker and feature_extractor); "
                "give a folder holding safety_checker/ and feature_extractor/"
            )
        model = prepared(model, device, dtype, "safety check: the model's safety_checker")
        processor = pil_processor(processor, "safety check: the model's feature_extractor")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    # Idempotent: addFilter ignores a filter the logger already has.
    logging.getLogger(StableDiffusionSafetyChecker.__module__).addFilter(BLACKOUT_FILTER)
    return Checker(model=model, processor=processor, device=device, dtype=dtype, path=path)


def load_folder(folder: Path, device: str, dtype: str, allow_pickle: bool) -> tuple[Any, Any]:
    """The (model, processor) of a checker folder, every failure a one-line SafetyError naming it."""
    from transformers import CLIPImageProcessorPil

    from farm.embeddings import first_line

    what = f"safety checker {str(folder)!r}"
    if not folder.is_dir():
        raise SafetyError(f"{what}: no such folder")
    checker_dir, processor_dir = folder / CHECKER_FOLDER, folder / PROCESSOR_FOLDER
    for sub, name in ((checker_dir, CHECKER_CONFIG), (processor_dir, PROCESSOR_CONFIG)):
        if not (sub / name).is_file():
            raise SafetyError(
                f"{what}: no {sub.name}/{name} (expected a diffusers pipeline folder with a safety checker, "
                f"or a folder holding {CHECKER_FOLDER}/ and {PROCESSOR_FOLDER}/)"
            )
    has_safetensors = any((checker_dir / name).is_file() for name in SAFETENSORS_WEIGHTS)
    has_pickle = any((checker_dir / name).is_file() for name in PICKLE_WEIGHTS)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise SafetyError(
            f"{what}: its weights are .bin pickle files that can run arbitrary code when loaded; "
            "convert them to .safetensors, or pass --allow-pickle if you trust their source"
        )
    if not has_safetensors and not has_pickle:
        raise SafetyError(f"{what}: no weights in {CHECKER_FOLDER}/ (expected {SAFETENSORS_WEIGHTS[0]})")
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    try:
        model, info = StableDiffusionSafetyChecker.from_pretrained(
            checker_dir,
            dtype=getattr(torch, dtype),
            use_safetensors=True if has_safetensors else None,
            local_files_only=True,
            output_loading_info=True,
        )
        processor = CLIPImageProcessorPil.from_pretrained(processor_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many types; the user needs one clear line
        raise SafetyError(f"{what}: could not load ({first_line(exc)})") from exc
    # transformers fills tensors missing from the file with random values and only warns: a checker
    # with random concept embeddings would give random verdicts, so it is refused.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise SafetyError(
            f"{what}: its weights lack {len(missing)} of the checker's tensors (such as {missing[0]}); "
            "not a StableDiffusionSafetyChecker"
        )
    return prepared(model, device, dtype, what), processor


def prepared(model: Any, device: str, dtype: str, what: str) -> Any:
    """The checker model on the device and dtype, in eval mode; SafetyError when it is not one."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if not isinstance(model, StableDiffusionSafetyChecker):
        raise SafetyError(f"{what} is a {type(model).__name__}, not a StableDiffusionSafetyChecker")
    return model.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)


def pil_processor(processor: Any, what: str) -> Any:
    """The processor as a CLIPImageProcessorPil, so its pixels do not depend on torchvision being installed."""
    from transformers import CLIPImageProcessorPil

    if isinstance(processor, CLIPImageProcessorPil):
        return processor
    to_dict = getattr(processor, "to_dict", None)
    if to_dict is None:
        raise SafetyError(f"{what} is a {type(processor).__name__}, not a CLIP image processor")
    return CLIPImageProcessorPil.from_dict(to_dict())


def check_images(checker: Checker, images: np.ndarray) -> list[bool]:
    """One verdict per image of an (N, H, W, 3) uint8 array: True where the checker flags it."""
    if not (isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3):
        raise ValueError(f"expected an (N, H, W, 3) array, got {getattr(images, 'shape', type(images))}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    import torch

    torch_dtype = getattr(torch, checker.dtype)
    verdicts = []
    # One image at a time: kernels give slightly different floats for another batch size, and a
    # score near its threshold could then flip, so an image's verdict would depend on its batch.
    for image in images:
        # A PIL image, as diffusers' pipeline hands its feature extractor.
        pixels = checker.processor(Image.fromarray(image), return_tensors="pt").pixel_values
        # The checker blacks out flagged entries of the images it is given: it gets a throwaway
        # stand-in, never ours.
        stand_in = np.zeros((1, 1, 1, 3), dtype=np.float32)
        with torch.inference_mode():
            _, flagged = checker.model(clip_input=pixels.to(checker.device, torch_dtype), images=stand_in)
        verdicts.append(bool(flagged[0]))
    return verdicts
