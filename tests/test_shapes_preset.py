"""The `shapes` preset (issue 17): weights trained by scripts/shapes/train.py, shipped in farm/weights/shapes,
loaded like any other preset, and drawing what their prompts say (checked by the OpenCV checker)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "benchmarks"):  # `pytest` without `python -m`: neither is importable otherwise
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import shapes_quality  # noqa: E402
import shapes_steering  # noqa: E402

from farm import models  # noqa: E402
from farm.presets import PRESET_FACTS, SHIPPED_PRESETS, ensure_preset, preset_path  # noqa: E402
from farm.spec import parse_job  # noqa: E402
from scripts.shapes import components, dataset, train  # noqa: E402

SHIPPED = SHIPPED_PRESETS["shapes"]
RECORD = json.loads((SHIPPED / "train.json").read_text())
COMPONENTS = ("vae", "unet", "text_encoder")
# Keys a config gains from saving or training, not from the script's construction.
SAVED_KEYS = {
    "_name_or_path", "_diffusers_version", "_use_default_values", "_class_name", "architectures",
    "transformers_version", "dtype", "torch_dtype",
}  # fmt: skip


def test_the_shipped_folder_is_a_diffusers_pipeline_in_safetensors_with_its_training_record():
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    weights = sorted(p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.suffix in (".safetensors",))
    assert weights == [f"{c}/{name}" for c, name in (
        ("text_encoder", "model.safetensors"),
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    )]  # fmt: skip
    assert not [p for p in SHIPPED.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 16e6  # "a few MB" in the repo
    assert RECORD["config"]["seed"] == train.DEFAULT_SEED
    assert RECORD["native_size"] == list(PRESET_FACTS["shapes"].native_size)
    for stage in ("vae", "unet"):
        assert RECORD["stages"][stage]["steps"] > 0


def test_the_training_script_reproduces_the_shipped_config():
    """The recorded command, parsed by today's script, gives the recorded settings and, built from them, the
    shipped components' configs and tokenizer."""
    args = train.parse_args(shlex.split(RECORD["command"])[1:])
    assert train.recorded_config(args) == RECORD["config"]
    tokenizer = components.build_tokenizer(args.tokenizer)
    built = {
        "vae": components.build_vae(args).config,
        "unet": components.build_unet(args).config,
        # What save_pretrained writes: the settings that differ from transformers' defaults.
        "text_encoder": json.loads(components.build_text_encoder(args, tokenizer).config.to_json_string(use_diff=True)),
    }
    for name in COMPONENTS:
        shipped = json.loads((SHIPPED / name / "config.json").read_text())
        mine = json.loads(json.dumps(dict(built[name]), default=list))  # tuples as JSON lists
        if name == "vae":  # measured on the trained VAE's latents, so set after training
            assert shipped.pop("scaling_factor") == RECORD["stages"]["vae"]["scaling_factor"]
            mine.pop("scaling_factor")
        differ = {k for k in set(shipped) | set(mine) if k not in SAVED_KEYS and shipped.get(k) != mine.get(k)}
        assert not differ, (name, {k: (shipped.get(k), mine.get(k)) for k in differ})
    vocabulary = json.loads((SHIPPED / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocabulary == tokenizer.get_vocab()
    assert all(f"{word}</w>" in vocabulary for word in dataset.WORDS)  # every caption word is one token


def test_shapes_is_copied_into_the_cache_byte_for_byte_and_loads_as_sd1():
    folder = ensure_preset("shapes")
    assert folder == preset_path("shapes") and folder.name == "shapes-v3"
    shipped = {p.relative_to(SHIPPED): p.read_bytes() for p in SHIPPED.rglob("*") if p.is_file()}
    cached = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert cached == shipped
    assert models.model_hash(folder) == models.model_hash(SHIPPED)  # the row's hash is the shipped bytes'
    assert models.reference_facts("shapes") == models.reference_facts(str(folder)) == PRESET_FACTS["shapes"]
    assert models.resolve_model("shapes").family == "sd1"


def test_a_shapes_job_without_a_size_renders_at_the_native_size():
    spec = parse_job("name: s\nmodel: shapes\ndefaults: {prompt: a red circle}\n")
    (task,) = list(spec.tasks())
    assert (task.width, task.height) == PRESET_FACTS["shapes"].native_size == (64, 64)


@pytest.fixture(scope="module")
def quality(farm_home: Path) -> dict:
    args = shapes_quality.parse_args(["shapes", "--count", "24", "--batch", "12"])
    return shapes_quality.evaluate(args)


# Floors from what the shipped weights do on this sample (24 prompts: background 100%, colour 100%, shape 92%;
# chance is 1 of 8, about 1 of 7, 1 of 3); the 96-prompt figures against the goals are in docs/shapes.md.
# Renders are deterministic, so the margin is for other CPUs' arithmetic, not for luck.
FLOORS = {"background": 0.9, "colour": 0.9, "shape": 0.85}


@pytest.mark.slow
def test_shapes_draws_the_prompted_background_colour_and_shape_on_unseen_prompts(quality: dict):
    rates = {name: r["rate"] for name, r in quality["rates"].items()}
    assert quality["count"] == 24 and quality["size"] == 64
    for name, floor in FLOORS.items():
        assert rates[name] >= floor, (name, rates, quality["failures"])


@pytest.fixture(scope="module")
def steering(farm_home: Path) -> dict:
    args = shapes_steering.parse_args(["shapes", "--count", "6", "--frames", "6"])
    return shapes_steering.evaluate(args)


@pytest.mark.slow
def test_img2img_turns_a_red_circle_blue_mostly_in_its_place(steering: dict):
    figures = steering["img2img"]
    # This sample: all 6 blue, 5 in place, median move 2.4% of the side.
    assert figures["img2img_blue"] >= 5 / 6 and figures["img2img_place"] >= 4 / 6, figures
    assert figures["median_move"] < shapes_steering.PLACE_TOLERANCE, figures


@pytest.mark.slow
def test_a_variation_sweep_moves_in_steps_smaller_than_the_full_swap(steering: dict):
    figures = steering["variations"]
    # 5 of these 6 sweeps have every step below the full swap, median largest step 0.87 of it (67% of 12 in
    # docs/shapes.md); a sweep that jumped in one step would put it at 1 or above.
    assert figures["variation_smooth"] >= 4 / 6 and figures["largest_step_over_full_median"] < 0.95, figures


@pytest.mark.slow
def test_a_walk_passes_through_both_prompts(steering: dict):
    # Both ends right by chance (colour and shape, twice) is about 1 in 400; 6 of 6 here, 100% of 12 in docs/shapes.md.
    assert steering["walk"]["walk_through_both"] >= 5 / 6, steering["walk"]


@pytest.mark.slow
def test_the_colour_loss_makes_images_bluer(steering: dict):
    figures = steering["color_loss"]
    # On average (+49 and +50 on this sample): most images turn far bluer, a few a little less blue (docs/shapes.md).
    assert figures["blueness_with"] - figures["blueness_without"] > 30, figures
    assert figures["blue_channel_with"] - figures["blue_channel_without"] > 30, figures


def test_blueness_goes_up_with_blue_and_difference_is_symmetric():
    grey = np.full((8, 8, 3), 100, dtype=np.uint8)
    bluer = grey.copy()
    bluer[..., 2] = 160
    assert shapes_steering.blueness(bluer) > shapes_steering.blueness(grey) == 0.0
    assert shapes_steering.difference(grey, bluer) == shapes_steering.difference(bluer, grey) == 20.0
