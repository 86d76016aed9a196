"""A single ``.safetensors`` checkpoint in the original LDM layout loads and renders like the diffusers folder.

The checkpoints are the tiny presets written by ``ldm_export`` (SD 1.x, and SDXL in sgm's layout); the
configs they load with come from a copy of the preset's folder without its weights, so every tensor
must come from the single file.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from ldm_export import export_single_file

from farm.models import Components, load_components, resolve_model
from farm.render import render_batch
from farm.spec import RenderTask

MODULES = ("unet", "vae", "text_encoder")


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def single_file(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("single_file") / "tiny-ldm.safetensors"
    export_single_file(tiny_path, target)
    return target


@pytest.fixture(scope="module")
def config_only(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny folder's configs and tokenizer, without any weights."""
    target = tmp_path_factory.mktemp("config") / "tiny-config"
    shutil.copytree(tiny_path, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


@pytest.fixture(scope="module")
def single_file_components(single_file: Path, config_only: Path) -> Components:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        return load_components(resolve_model(str(single_file), config=str(config_only)), "cpu", "float32")


def test_export_uses_the_ldm_layout(single_file: Path, tiny_path: Path) -> None:
    from safetensors.torch import load_file

    checkpoint = load_file(str(single_file))
    folder_tensors = sum(len(load_file(str(f))) for f in tiny_path.glob("*/*.safetensors"))
    assert len(checkpoint) == folder_tensors
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in checkpoint)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in checkpoint, key
    # LDM's VAE attention projections are 1x1 convolutions.
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)


def test_diffusers_converters_recover_every_tensor(single_file: Path, tiny_components: Components) -> None:
    """No missing or unexpected keys: ``from_single_file`` would leave a missing one uninitialised."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    checkpoint = load_file(str(single_file))
    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, tiny_components.unet.config),
        "vae": convert_ldm_vae_checkpoint(checkpoint, tiny_components.vae.config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()},
    }
    for name in MODULES:
        expected = getattr(tiny_components, name).state_dict()
        assert converted[name].keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(converted[name][key], tensor), f"{name}.{key}"


def test_single_file_loads_the_same_weights(single_file_components: Components, tiny_components: Components) -> None:
    for name in MODULES:
        loaded = getattr(single_file_components, name).state_dict()
        expected = getattr(tiny_components, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(loaded[key], tensor), f"{name}.{key}"
    assert single_file_components.scheduler_config == tiny_components.scheduler_config
    assert single_file_components.tokenizer.get_vocab() == tiny_components.tokenizer.get_vocab()


def test_single_file_renders_identical_bytes(single_file_components: Components, tiny_components: Components) -> None:
    tasks = [RenderTask("tiny", "euler", "a cat", "", 1, 4, 7.5, 64, 64)]
    file_result = render_batch(single_file_components, tasks)
    folder_result = render_batch(tiny_components, tasks)
    from_file, file_scheduler = file_result.images, file_result.scheduler_config
    from_folder, folder_scheduler = folder_result.images, folder_result.scheduler_config
    assert from_file.shape == (1, 64, 64, 3)
    assert from_file.tobytes() == from_folder.tobytes()
    assert file_scheduler == folder_scheduler


def test_farm_reproduce_takes_a_single_files_model_config(single_file: Path, config_only: Path, tmp_path: Path):
    """A PNG does not record the job's model_config: `farm reproduce PNG --model-config DIR` renders it
    again from the single file, bit for bit; without it, the configs cannot be found (exit 2, one line)."""
    from click.testing import CliRunner

    from farm.actor import BatchRenderer
    from farm.cli import main
    from farm.spec import Batch

    task = RenderTask(str(single_file), "euler", "a cat", "", 1, 4, 7.5, 64, 64)
    root = tmp_path / "job"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        renderer = BatchRenderer(
            "job", str(root), str(single_file), "float32", model_config=str(config_only), threads=1
        )
        (row,) = renderer.render(Batch.of([task]))
    png = root / row["image_path"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        again = CliRunner().invoke(
            main, ["reproduce", str(png), "--model-config", str(config_only), "--diff-dir", str(tmp_path / "diff")]
        )
        assert again.exit_code == 0, again.output
        assert "identical" in again.output
        without = CliRunner().invoke(main, ["reproduce", str(png), "--diff-dir", str(tmp_path / "diff")])
    assert without.exit_code == 2, without.output
    assert without.output.startswith("error: ") and "model_config" in without.output, without.output
    assert "Traceback" not in without.output


# ---------------------------------------------------------------------------------------
# SDXL: two text encoders (CLIP under conditioner.embedders.0, OpenCLIP under .1), StableDiffusionXLPipeline

XL_MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def xl_single_file(tiny_xl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("xl_single_file") / "tiny-xl-sgm.safetensors"
    export_single_file(tiny_xl_path, target)
    return target


def test_an_sdxl_export_uses_sgm_keys(xl_single_file: Path, tiny_xl_path: Path) -> None:
    from safetensors.torch import load_file

    checkpoint = load_file(str(xl_single_file))
    for key in (
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",  # level 1, two layers
    ):
        assert key in checkpoint, key
    assert not any(key.startswith("cond_stage_model.") for key in checkpoint)


def test_an_sdxl_single_file_loads_the_same_weights(
    xl_single_file: Path, tiny_xl_path: Path, tiny_xl_components: Components, tmp_path: Path
) -> None:
    config = tmp_path / "tiny-xl-config"
    shutil.copytree(tiny_xl_path, config, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        resolved = resolve_model(str(xl_single_file), config=str(config))
        assert resolved.family == "sdxl"
        loaded = load_components(resolved, "cpu", "float32")
    assert loaded.family == "sdxl" and loaded.force_zeros_for_empty_prompt is True
    for name in XL_MODULES:
        got = getattr(loaded, name).state_dict()
        expected = getattr(tiny_xl_components, name).state_dict()
        assert got.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"{name}.{key}"
    assert loaded.scheduler_config == tiny_xl_components.scheduler_config
    assert loaded.vae.config.scaling_factor == tiny_xl_components.vae.config.scaling_factor
    assert loaded.tokenizer_2.get_vocab() == tiny_xl_components.tokenizer_2.get_vocab()
