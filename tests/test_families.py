"""Architectures farm does not render are refused before Ray starts, in one line, from the model's
reference alone: model_index.json's _class_name for a folder or a hub-cache snapshot, the key names
and shapes in a single file's header. No weights, no torch, no Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file
from test_models import fake_hub_cache

import farm.driver
from farm import models
from farm.cli import main

RENDERED = "StableDiffusionPipeline, StableDiffusionImg2ImgPipeline: Stable Diffusion 1.x and 2.x"
# A refusal reads a JSON file or a header: anything near this is a load, or Ray.
QUICK_S = 10.0
SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
}
SDXL_KEYS = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (8, 16),
}


def pipeline_folder(root: Path, class_name: str | None, name: str = "model") -> Path:
    """A diffusers folder that is only its model_index.json: all farm reads before Ray."""
    folder = root / name
    folder.mkdir(parents=True)
    index = {"_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"]}
    if class_name is not None:
        index["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def single_file(root: Path, keys: dict[str, tuple[int, ...]], name: str = "model.safetensors") -> Path:
    path = root / name
    save_file({key: np.zeros(shape, np.float16) for key, shape in keys.items()}, str(path))
    return path


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address):
        raise AssertionError("Ray started for a model farm should have refused")

    monkeypatch.setattr(farm.driver, "start_ray", refuse)


def render(tmp_path: Path, model: str) -> tuple[int, list[str], float]:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {json.dumps(model)}\ndefaults: {{prompt: a cat, width: 64, height: 64, steps: 2}}\n")
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["render", str(job), "--out", str(tmp_path / "out")])
    return result.exit_code, result.output.splitlines(), time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Folders and hub-cache snapshots: model_index.json's _class_name


@pytest.mark.parametrize("class_name", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"])
def test_sd_pipelines_resolve(tmp_path: Path, class_name: str):
    assert models.resolve_model(str(pipeline_folder(tmp_path, class_name))).kind == "folder"


@pytest.mark.parametrize(
    "class_name",
    [
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionUpscalePipeline",
        "KandinskyPipeline",
    ],
)
def test_other_pipelines_are_refused_naming_the_class(tmp_path: Path, class_name: str):
    folder = pipeline_folder(tmp_path, class_name)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(folder))
    assert str(caught.value) == f"model {str(folder)!r}: pipeline {class_name} is not one farm renders ({RENDERED})"


def test_sdxl_folder_exits_2_in_one_line_before_ray(tmp_path: Path, no_ray: None):
    folder = pipeline_folder(tmp_path, "StableDiffusionXLPipeline")
    code, lines, seconds = render(tmp_path, str(folder))
    assert code == 2, lines
    assert lines == [
        f"error: model {str(folder)!r}: pipeline StableDiffusionXLPipeline is not one farm renders ({RENDERED})"
    ]
    assert seconds < QUICK_S
    assert not (tmp_path / "out").exists()


def test_sdxl_hub_snapshot_exits_2_in_one_line_before_ray(tmp_path: Path, monkeypatch, no_ray: None):
    import huggingface_hub.constants

    source = pipeline_folder(tmp_path, "StableDiffusionXLPipeline")
    fake_hub_cache(tmp_path / "cache", "farm-tests/tiny-xl", source)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelError, match="pipeline StableDiffusionXLPipeline is not one farm renders"):
        models.resolve_model("farm-tests/tiny-xl")
    code, lines, _ = render(tmp_path, "farm-tests/tiny-xl")
    assert code == 2
    assert lines == [
        f"error: model 'farm-tests/tiny-xl': pipeline StableDiffusionXLPipeline is not one farm renders ({RENDERED})"
    ]


def test_model_index_without_a_class_or_not_json_is_refused(tmp_path: Path):
    nameless = pipeline_folder(tmp_path, None, "nameless")
    with pytest.raises(models.ModelError, match=r"model_index.json names no pipeline \(_class_name\)"):
        models.resolve_model(str(nameless))
    broken = pipeline_folder(tmp_path, "StableDiffusionPipeline", "broken")
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(models.ModelError, match="model_index.json is not valid JSON"):
        models.resolve_model(str(broken))


def test_a_hostile_class_name_is_shown_bounded(tmp_path: Path):
    folder = pipeline_folder(tmp_path, "X\x1b[2J" + "A" * 5000)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(folder))
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 400


# ---------------------------------------------------------------------------------------
# Single files: the keys in the safetensors header


def test_sd1_like_single_file_resolves(tmp_path: Path):
    assert models.resolve_model(str(single_file(tmp_path, SD1_KEYS))).kind == "single_file"


def test_unreadable_single_file_still_resolves(tmp_path: Path):
    """Not a safetensors file at all: loading reports it, in the actor, as before."""
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"garbage")
    assert models.resolve_model(str(path)).kind == "single_file"


@pytest.mark.parametrize(
    ("keys", "family", "prefix"),
    [
        (SDXL_KEYS, "an SDXL", "conditioner.embedders."),
        (
            {"add_embedding.linear_1.weight": (8, 8), "conv_in.weight": (8, 4, 3, 3)},
            "an SDXL",
            "add_embedding.",
        ),
        (
            {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,)},
            "an SD3",
            "model.diffusion_model.joint_blocks.",
        ),
        (
            {"double_blocks.0.img_attn.norm.key_norm.scale": (8,)},
            "a Flux",
            "double_blocks.",
        ),
    ],
    ids=["sdxl", "sdxl_diffusers_layout", "sd3", "flux"],
)
def test_other_architectures_in_one_file_are_refused(tmp_path: Path, keys: dict, family: str, prefix: str):
    path = single_file(tmp_path, keys)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(path))
    assert str(caught.value) == (
        f"model {str(path)!r}: {family} checkpoint (it has {prefix}* keys), "
        "not an architecture farm renders (Stable Diffusion 1.x and 2.x)"
    )


def test_sdxl_single_file_exits_2_in_one_line_before_ray(tmp_path: Path, no_ray: None):
    path = single_file(tmp_path, SDXL_KEYS, "sd_xl_base_1.0.safetensors")
    code, lines, seconds = render(tmp_path, str(path))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: model {str(path)!r}: an SDXL checkpoint"), lines
    assert seconds < QUICK_S


def test_an_inpainting_unet_in_one_file_is_refused(tmp_path: Path):
    path = single_file(tmp_path, {**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)})
    with pytest.raises(models.ModelError, match="its UNet takes 9 input channels"):
        models.resolve_model(str(path))


def test_a_model_config_of_another_pipeline_is_refused(tmp_path: Path):
    path = single_file(tmp_path, SD1_KEYS)
    config = pipeline_folder(tmp_path, "StableDiffusionXLPipeline", "xl-config")
    with pytest.raises(models.ModelError, match=r"^model_config '.*xl-config': pipeline StableDiffusionXLPipeline"):
        models.resolve_model(str(path), config=str(config))
