"""The safety checker's model side: loading, per-image verdicts, and the blur for flagged images."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_checker import add_checker_to_pipeline, build_tiny_checker, tiny_checker_parts

from farm.errors import FarmError
from farm.images import blur
from farm.safety import SafetyError, check_images, load_checker

# A margin either side of a hand-set threshold, well above the checker's rounding of scores to 3 decimals.
SCORE_MARGIN = 0.002


def random_images(count: int, seed: int = 0, side: int = 64) -> np.ndarray:
    """Distinct uint8 images: noise over a per-image colour, so their embeddings differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (count, 1, 1, 3))
    noise = rng.integers(-60, 61, (count, side, side, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checker_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Two saved checkers: one flags every image, one flags none."""
    root = tmp_path_factory.mktemp("checkers")
    return {flag: build_tiny_checker(root / f"flag-{flag}", flag) for flag in (True, False)}


@pytest.mark.parametrize("flag", [True, False])
def test_verdicts_follow_the_thresholds_and_leave_images_alone(checker_folders, flag):
    checker = load_checker(checker_folders[flag], "cpu", "float32")
    images = random_images(3)
    before = images.copy()
    assert check_images(checker, images) == [flag] * 3
    # diffusers' checker blacks out what it flags; ours must not touch the images it is given
    assert np.array_equal(images, before)
    assert check_images(checker, images[:0]) == []


def test_the_checkers_blackout_warning_is_dropped(checker_folders):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(StableDiffusionSafetyChecker.__module__)
    logger.addHandler(handler)
    try:
        assert check_images(load_checker(checker_folders[True], "cpu", "float32"), random_images(1)) == [True]
    finally:
        logger.removeHandler(handler)
    # It says flagged images were replaced by black ones, which farm does not do
    assert not [record for record in records if "black image" in record.getMessage()]


def embedding(checker, image: np.ndarray) -> torch.Tensor:
    """The checker's normalised embedding of one image, computed the way its forward does."""
    from PIL import Image

    pixels = checker.processor(Image.fromarray(image), return_tensors="pt").pixel_values
    with torch.no_grad():
        pooled = checker.model.vision_model(pixels)[1]
        return torch.nn.functional.normalize(checker.model.visual_projection(pooled), dim=-1)[0]


def test_verdicts_are_per_image_and_batch_independent(checker_folders):
    checker = load_checker(checker_folders[False], "cpu", "float32")
    images = random_images(4, seed=1)
    target = embedding(checker, images[2])
    others = max(float(embedding(checker, image) @ target) for i, image in enumerate(images) if i != 2)
    # Concept 0 becomes image 2's own embedding, its threshold halfway between image 2's cosine (1)
    # and the nearest other image's: only image 2 scores above it.
    assert 1 - others > 4 * SCORE_MARGIN, "the test images are too alike for a clean threshold"
    checker.model.concept_embeds.data[0] = target
    checker.model.concept_embeds_weights.data[0] = (1 + others) / 2
    assert check_images(checker, images) == [False, False, True, False]
    assert check_images(checker, images[2:3]) == [True]
    assert check_images(checker, images[::-1]) == [False, True, False, False]
    assert check_images(checker, images[[0, 1, 3]]) == [False, False, False]
    assert check_images(checker, images) == [False, False, True, False]  # deterministic


def test_loads_a_models_own_components():
    model, processor = tiny_checker_parts(flag_everything=True)
    components = SimpleNamespace(safety_checker=model, feature_extractor=processor)
    assert check_images(load_checker(components, "cpu", "float32"), random_images(2)) == [True, True]
    assert check_images(load_checker((model, processor), "cpu", "float32"), random_images(1)) == [True]
    assert load_checker(components, "cpu", "float32").path is None
    # With torchvision installed, a pipeline's feature_extractor is the torchvision-backed processor:
    # the checker rebuilds it from its config as the PIL one, so its pixels are the same everywhere.
    settings = {**processor.to_dict(), "image_processor_type": "CLIPImageProcessor"}
    other_backend = SimpleNamespace(to_dict=lambda: settings)
    rebuilt = load_checker((model, other_backend), "cpu", "float32").processor
    assert type(rebuilt) is type(processor) and rebuilt.to_dict() == processor.to_dict()


def test_a_model_without_a_checker_is_refused():
    with pytest.raises(SafetyError, match="has no safety checker") as info:
        load_checker(SimpleNamespace(safety_checker=None, feature_extractor=None), "cpu", "float32")
    assert "\n" not in str(info.value)


def test_a_pipeline_folder_with_sd1_processor_config_loads(tmp_path):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    add_checker_to_pipeline(folder, flag_everything=False)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    # Stable Diffusion 1.x's feature_extractor/preprocessor_config.json, in its older format (a
    # CLIPFeatureExtractor with int sizes), shrunk to the tiny checker's 32 pixels.
    legacy = {
        "crop_size": 32,
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 32,
    }
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(legacy))
    checker = load_checker(folder, "cpu", "float32")
    assert checker.path == str(folder)
    assert check_images(checker, random_images(2)) == [False, False]


def one_line_error(source, allow_pickle: bool = False) -> str:
    """The SafetyError message load_checker gives for a source, checked to be one line."""
    with pytest.raises(SafetyError) as info:
        load_checker(source, "cpu", "float32", allow_pickle=allow_pickle)
    message = str(info.value)
    assert isinstance(info.value, FarmError) and "\n" not in message
    return message


def pickle_weights(folder: Path) -> None:
    """Replace the checker's safetensors weights by the same tensors in a .bin pickle."""
    from safetensors.torch import load_file

    weights = folder / "safety_checker" / "model.safetensors"
    torch.save(load_file(weights), folder / "safety_checker" / "pytorch_model.bin")
    weights.unlink()


def test_pickle_weights_need_allow_pickle(tmp_path):
    folder = build_tiny_checker(tmp_path / "bin", flag_everything=True)
    pickle_weights(folder)
    message = one_line_error(folder)
    assert str(folder) in message and "--allow-pickle" in message
    checker = load_checker(folder, "cpu", "float32", allow_pickle=True)
    assert check_images(checker, random_images(1)) == [True]


def test_folders_without_a_checker_are_refused(tmp_path, checker_folders):
    assert "no such folder" in one_line_error(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    message = one_line_error(empty)
    assert str(empty) in message and "safety_checker/config.json" in message
    # The checker without its image processor
    half = build_tiny_checker(tmp_path / "half", flag_everything=True)
    (half / "feature_extractor" / "preprocessor_config.json").unlink()
    assert "feature_extractor/preprocessor_config.json" in one_line_error(half)
    # A config without weights
    bare = build_tiny_checker(tmp_path / "bare", flag_everything=True)
    (bare / "safety_checker" / "model.safetensors").unlink()
    assert "no weights" in one_line_error(bare)


def test_weights_of_another_model_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = build_tiny_checker(tmp_path / "partial", flag_everything=True)
    weights = folder / "safety_checker" / "model.safetensors"
    # transformers would fill the missing concept embeddings with random values and only warn
    state = {key: value for key, value in load_file(weights).items() if "concept" not in key}
    save_file(state, weights, metadata={"format": "pt"})
    message = one_line_error(folder)
    assert str(folder) in message and "not a StableDiffusionSafetyChecker" in message
    # A file that is not safetensors at all
    weights.write_bytes(b"not weights")
    assert "could not load" in one_line_error(folder)


def high_frequency(image: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels, across and down."""
    pixels = image.astype(np.float64)
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


def test_blur_makes_an_image_unrecognisable():
    noise = random_images(1, seed=3, side=128)[0]
    blurred = blur(noise)
    assert blurred.shape == noise.shape and blurred.dtype == np.uint8
    assert high_frequency(blurred) < high_frequency(noise) / 20
    assert np.array_equal(blur(noise), blurred)  # deterministic
    # A shape (a white square on black) leaves no edge behind, only a soft glow
    square = np.zeros((512, 384, 3), dtype=np.uint8)
    square[200:300, 150:250] = 255
    soft = blur(square)
    assert soft.shape == square.shape
    assert np.abs(np.diff(soft.astype(int), axis=0)).max() < 40
    assert np.abs(soft.astype(int) - square).mean() > 10
    # A flat image stays as it was: the blur averages, it does not darken or shift colours
    flat = np.full((64, 64, 3), (10, 200, 90), dtype=np.uint8)
    assert np.array_equal(blur(flat), flat)
