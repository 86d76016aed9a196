"""Model families: SD 1.x, SD 2.x and SDXL are told apart from a model's reference alone (presets'
constants, model_index.json and the configs beside it, a single file's header keys), load through their
own pipeline class, and render; every other architecture is refused before Ray starts, in one line.
No weights are read to decide, no torch, no Ray."""

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
from farm.presets import PRESET_FACTS, PRESETS, ensure_preset

RENDERED = (
    "SD 1.x, SD 2.x and SDXL: StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, "
    "StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline"
)
REFINER = (
    "an SDXL refiner (it has no first text encoder), not a model farm renders (SD 1.x, SD 2.x and SDXL base models)"
)
# A refusal reads a JSON file or a header: anything near this is a load, or Ray.
QUICK_S = 10.0
SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
}
SD2_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "cond_stage_model.model.token_embedding.weight": (16, 8),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
}
SDXL_KEYS = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (8, 16),
}
# The refiner keeps only the OpenCLIP bigG encoder, as conditioner.embedders.0.model.
REFINER_KEYS = {
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
    "conditioner.embedders.0.model.text_projection": (8, 8),
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (8, 16),
}
TEXT_ENCODER = ["transformers", "CLIPTextModel"]


def pipeline_folder(
    root: Path,
    class_name: str | None,
    name: str = "model",
    text_encoder: list | None = TEXT_ENCODER,
    configs: dict[str, dict] | None = None,
) -> Path:
    """A diffusers folder that is only its JSON files (model_index.json, and ``configs`` as
    {"unet/config.json": {...}}): all farm reads before Ray."""
    folder = root / name
    folder.mkdir(parents=True)
    index = {
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": text_encoder,
    }
    if class_name is not None:
        index["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(index))
    for relative, config in (configs or {}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(json.dumps(config))
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
# Folders and hub-cache snapshots: model_index.json's _class_name, and the configs beside it


@pytest.mark.parametrize(
    ("class_name", "family"),
    [
        ("StableDiffusionPipeline", "sd1"),
        ("StableDiffusionImg2ImgPipeline", "sd1"),
        ("StableDiffusionXLPipeline", "sdxl"),
        ("StableDiffusionXLImg2ImgPipeline", "sdxl"),
    ],
)
def test_rendered_pipelines_resolve_with_their_family(tmp_path: Path, class_name: str, family: str):
    resolved = models.resolve_model(str(pipeline_folder(tmp_path, class_name)))
    assert (resolved.kind, resolved.family) == ("folder", family)


@pytest.mark.parametrize(
    "class_name",
    [
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "PixArtAlphaPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionUpscalePipeline",
        "KandinskyPipeline",
        "KandinskyV22Pipeline",
    ],
)
def test_other_pipelines_are_refused_naming_the_class(tmp_path: Path, class_name: str):
    folder = pipeline_folder(tmp_path, class_name)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(folder))
    assert str(caught.value) == f"model {str(folder)!r}: pipeline {class_name} is not one farm renders ({RENDERED})"
    assert models.reference_facts(str(folder)) is None


@pytest.mark.parametrize("text_encoder", [[None, None], None])
def test_an_sdxl_refiner_folder_is_refused(tmp_path: Path, text_encoder: list | None):
    folder = pipeline_folder(tmp_path, "StableDiffusionXLImg2ImgPipeline", text_encoder=text_encoder)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(folder))
    assert str(caught.value) == f"model {str(folder)!r}: {REFINER}"
    assert models.reference_facts(str(folder)) is None


def test_a_folder_whose_unet_takes_a_mask_is_refused(tmp_path: Path):
    """An inpainting UNet saved under the text-to-image class: its config's in_channels gives it away."""
    folder = pipeline_folder(tmp_path, "StableDiffusionPipeline", configs={"unet/config.json": {"in_channels": 9}})
    with pytest.raises(models.ModelError, match="its UNet takes 9 input channels"):
        models.resolve_model(str(folder))


def test_refusals_exit_2_in_one_line_before_ray(tmp_path: Path, no_ray: None):
    for name, class_name, text_encoder, expected in (
        ("refiner", "StableDiffusionXLImg2ImgPipeline", [None, None], REFINER),
        ("sd3", "StableDiffusion3Pipeline", TEXT_ENCODER, "pipeline StableDiffusion3Pipeline is not one farm renders"),
    ):
        folder = pipeline_folder(tmp_path, class_name, name, text_encoder)
        code, lines, seconds = render(tmp_path / name, str(folder))
        assert code == 2, lines
        assert len(lines) == 1 and lines[0].startswith(f"error: model {str(folder)!r}: {expected}"), lines
        assert seconds < QUICK_S
        assert not (tmp_path / name / "out").exists()


def test_a_flux_hub_snapshot_exits_2_in_one_line_before_ray(tmp_path: Path, monkeypatch, no_ray: None):
    import huggingface_hub.constants

    source = pipeline_folder(tmp_path, "FluxPipeline")
    fake_hub_cache(tmp_path / "cache", "farm-tests/tiny-flux", source)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelError, match="pipeline FluxPipeline is not one farm renders"):
        models.resolve_model("farm-tests/tiny-flux")
    code, lines, _ = render(tmp_path, "farm-tests/tiny-flux")
    assert code == 2
    assert lines == [f"error: model 'farm-tests/tiny-flux': pipeline FluxPipeline is not one farm renders ({RENDERED})"]


def test_model_index_without_a_class_or_not_json_is_refused(tmp_path: Path):
    nameless = pipeline_folder(tmp_path, None, "nameless")
    with pytest.raises(models.ModelError, match=r"model_index.json names no pipeline \(_class_name\)"):
        models.resolve_model(str(nameless))
    broken = pipeline_folder(tmp_path, "StableDiffusionPipeline", "broken")
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(models.ModelError, match="model_index.json is not valid JSON"):
        models.resolve_model(str(broken))
    assert models.reference_facts(str(broken)) is None
    listed = pipeline_folder(tmp_path, None, "listed")
    (listed / "model_index.json").write_text(json.dumps({"_class_name": ["StableDiffusionPipeline"]}))
    with pytest.raises(models.ModelError, match=r"names no pipeline"):
        models.resolve_model(str(listed))
    assert models.reference_facts(str(listed)) is None


def test_a_hostile_class_name_is_shown_bounded(tmp_path: Path):
    folder = pipeline_folder(tmp_path, "X\x1b[2J" + "A" * 5000)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(folder))
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("configs", "facts"),
    [
        ({}, models.ModelFacts("sd1", None, None)),
        (
            {
                "text_encoder/config.json": {"hidden_act": "quick_gelu"},
                "unet/config.json": {"sample_size": 64, "cross_attention_dim": 768},
                "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
                "scheduler/scheduler_config.json": {"prediction_type": "epsilon"},
            },
            models.ModelFacts("sd1", (512, 512), "epsilon"),
        ),
        (
            {
                "text_encoder/config.json": {"hidden_act": "gelu"},
                "unet/config.json": {"sample_size": 96},
                "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
                "scheduler/scheduler_config.json": {"prediction_type": "v_prediction"},
            },
            models.ModelFacts("sd2", (768, 768), "v_prediction"),
        ),
        (
            # No text encoder config: the UNet's cross-attention width (OpenCLIP ViT-H's 1024) tells.
            {"unet/config.json": {"sample_size": [64, 96], "cross_attention_dim": 1024}},
            models.ModelFacts("sd2", None, None),
        ),
    ],
    ids=["bare", "sd1", "sd2-v", "sd2-by-unet"],
)
def test_folder_facts_come_from_the_configs(tmp_path: Path, configs: dict, facts: models.ModelFacts):
    folder = pipeline_folder(tmp_path, "StableDiffusionPipeline", configs=configs)
    assert models.reference_facts(str(folder)) == facts
    assert models.resolve_model(str(folder)).family == facts.family


def test_facts_of_unreadable_references_are_none(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert models.reference_facts(str(tmp_path / "missing")) is None
    assert models.reference_facts("nobody/not-cached") is None
    assert models.reference_facts("not a reference at all") is None


# ---------------------------------------------------------------------------------------
# Single files: the keys in the safetensors header


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (SD1_KEYS, "sd1"),
        (SD2_KEYS, "sd2"),
        (SDXL_KEYS, "sdxl"),
        ({"add_embedding.linear_1.weight": (8, 8), "conv_in.weight": (8, 4, 3, 3)}, "sdxl"),  # diffusers' layout
    ],
    ids=["sd1", "sd2", "sdxl", "sdxl_diffusers_layout"],
)
def test_single_file_family_comes_from_its_keys(tmp_path: Path, keys: dict, family: str):
    path = single_file(tmp_path, keys)
    resolved = models.resolve_model(str(path))
    assert (resolved.kind, resolved.family) == ("single_file", family)
    # Without a config folder, only the family is known: size and prediction type come from the configs.
    assert models.reference_facts(str(path)) == models.ModelFacts(family, None, None)


def test_single_file_size_and_prediction_come_from_its_config(tmp_path: Path):
    path = single_file(tmp_path, SD2_KEYS)
    config = pipeline_folder(
        tmp_path,
        "StableDiffusionPipeline",
        "sd2-config",
        configs={
            "unet/config.json": {"sample_size": 96, "cross_attention_dim": 1024},
            "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
            "scheduler/scheduler_config.json": {"prediction_type": "v_prediction"},
        },
    )
    assert models.reference_facts(str(path), str(config)) == models.ModelFacts("sd2", (768, 768), "v_prediction")


def test_unreadable_single_file_still_resolves(tmp_path: Path):
    """Not a safetensors file at all: loading reports it, in the actor, as before."""
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"garbage")
    assert models.resolve_model(str(path)).kind == "single_file"
    assert models.reference_facts(str(path)) is None


@pytest.mark.parametrize(
    ("keys", "family", "prefix"),
    [
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
        (
            {"x_embedder.proj.weight": (8, 4, 2, 2), "blocks.0.attn.qkv.weight": (24, 8)},
            "a DiT (PixArt or similar)",
            "x_embedder.",
        ),
    ],
    ids=["sd3", "flux", "pixart"],
)
def test_other_architectures_in_one_file_are_refused(tmp_path: Path, keys: dict, family: str, prefix: str):
    path = single_file(tmp_path, keys)
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(path))
    assert str(caught.value) == (
        f"model {str(path)!r}: {family} checkpoint (it has {prefix}* keys), "
        "not an architecture farm renders (SD 1.x, SD 2.x and SDXL)"
    )
    assert models.reference_facts(str(path)) is None


def test_an_sdxl_refiner_single_file_exits_2_in_one_line_before_ray(tmp_path: Path, no_ray: None):
    path = single_file(tmp_path, REFINER_KEYS, "sd_xl_refiner_1.0.safetensors")
    with pytest.raises(models.ModelError) as caught:
        models.resolve_model(str(path))
    assert str(caught.value) == f"model {str(path)!r}: {REFINER}"
    code, lines, seconds = render(tmp_path, str(path))
    assert code == 2, lines
    assert lines == [f"error: model {str(path)!r}: {REFINER}"]
    assert seconds < QUICK_S


def test_an_inpainting_unet_in_one_file_is_refused(tmp_path: Path):
    path = single_file(tmp_path, {**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)})
    with pytest.raises(models.ModelError, match="its UNet takes 9 input channels"):
        models.resolve_model(str(path))


def test_a_model_config_of_another_pipeline_is_refused(tmp_path: Path):
    path = single_file(tmp_path, SD1_KEYS)
    config = pipeline_folder(tmp_path, "StableDiffusion3Pipeline", "sd3-config")
    with pytest.raises(models.ModelError, match=r"^model_config '.*sd3-config': pipeline StableDiffusion3Pipeline"):
        models.resolve_model(str(path), config=str(config))


def test_a_model_config_of_another_family_is_refused(tmp_path: Path):
    path = single_file(tmp_path, SDXL_KEYS)
    config = pipeline_folder(tmp_path, "StableDiffusionPipeline", "sd1-config")
    with pytest.raises(models.ModelError, match=r"is SDXL but its model_config '.*sd1-config' is SD 1.x"):
        models.resolve_model(str(path), config=str(config))


# ---------------------------------------------------------------------------------------
# The presets, and each family loaded and rendered


@pytest.mark.parametrize("name", PRESETS)
def test_preset_facts_equal_the_built_configs(name: str, request: pytest.FixtureRequest):
    fixture = {"tiny": "tiny_path", "tiny-xl": "tiny_xl_path"}.get(name)  # shapes is shipped, copied in place
    folder = request.getfixturevalue(fixture) if fixture else ensure_preset(name)
    assert folder == ensure_preset(name)  # built (or copied) once, then reused
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    facts = PRESET_FACTS[name]
    assert facts.native_size == (side, side)
    assert facts.prediction_type == scheduler["prediction_type"]
    assert models.reference_facts(str(folder)) == facts  # what the configs say, read as any folder's
    assert models.reference_facts(name) == facts
    assert models.resolve_model(name).family == facts.family
    assert PRESET_FACTS["tiny"].native_size != PRESET_FACTS["tiny-xl"].native_size  # a size default shows the family


def test_a_hub_snapshot_of_tiny_xl_is_sdxl(tmp_path: Path, tiny_xl_path: Path, monkeypatch):
    import huggingface_hub.constants

    fake_hub_cache(tmp_path, "farm-tests/tiny-xl", tiny_xl_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.reference_facts("farm-tests/tiny-xl") == PRESET_FACTS["tiny-xl"]
    assert models.resolve_model("farm-tests/tiny-xl").family == "sdxl"


def test_tiny_xl_loads_as_sdxl_through_from_pretrained(tiny_xl_components):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    c = tiny_xl_components
    assert c.family == "sdxl" and isinstance(c.pipeline, StableDiffusionXLPipeline)
    assert isinstance(c.text_encoder, CLIPTextModel) and isinstance(c.text_encoder_2, CLIPTextModelWithProjection)
    assert c.tokenizer_2 is not None and c.tokenizer_2.get_vocab() == c.tokenizer.get_vocab()
    assert c.force_zeros_for_empty_prompt is True
    assert not any(p.requires_grad for p in c.text_encoder_2.parameters()) and not c.text_encoder_2.training
    # SDXL's conditioning shapes: both encoders' hidden states side by side; the pooled projection and
    # six embedded time ids into the timestep embedding.
    unet = c.unet.config
    assert unet.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert unet.addition_embed_type == "text_time"
    expected = c.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    assert unet.projection_class_embeddings_input_dim == expected
    assert c.text_encoder.config.hidden_act == "quick_gelu" and c.text_encoder_2.config.hidden_act == "gelu"
    assert (c.vae_scale_factor, c.latent_channels) == (8, 4)
    assert c.vae.config.force_upcast is True
    assert c.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert c.scheduler_config["timestep_spacing"] == "leading" and c.scheduler_config["steps_offset"] == 1


def test_tiny_loads_as_sd1(tiny_components):
    from diffusers import StableDiffusionPipeline

    c = tiny_components
    assert c.family == "sd1" and isinstance(c.pipeline, StableDiffusionPipeline)
    assert c.text_encoder_2 is None and c.tokenizer_2 is None and c.force_zeros_for_empty_prompt is False
    assert (c.vae_scale_factor, c.latent_channels) == (8, 4)


# stabilityai/stable-diffusion-2-1's own scheduler_config.json: DDIM, v-prediction.
SD2_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


@pytest.fixture(scope="module")
def tiny_sd2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x shrunk: an OpenCLIP-like text encoder (gelu), linear attention projections, a v-prediction
    DDIM scheduler, a native 96x96; weights from a fixed seed, saved as a diffusers folder."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from farm.presets import build_tiny_tokenizer, build_tiny_vae, tiny_text_config

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=12,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    torch.manual_seed(3)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden_act="gelu"))
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SD2_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_an_sd2_v_prediction_folder_loads_and_renders(tiny_sd2_path: Path):
    from dataclasses import replace

    from farm.render import render_batch
    from farm.spec import RenderTask

    assert models.reference_facts(str(tiny_sd2_path)) == models.ModelFacts("sd2", (96, 96), "v_prediction")
    resolved = models.resolve_model(str(tiny_sd2_path))
    assert resolved.family == "sd2"
    components = models.load_components(resolved, "cpu", "float32")
    assert components.family == "sd2" and components.text_encoder_2 is None
    assert components.scheduler_config["prediction_type"] == "v_prediction"
    tasks = [RenderTask(str(tiny_sd2_path), "euler", "a cat", "", 1, 2, 7.5, 64, 64)]
    result = render_batch(components, tasks)
    assert result.images.shape == (1, 64, 64, 3)
    assert result.scheduler_config["prediction_type"] == "v_prediction"
    # The loop follows the model's prediction type: read as epsilon, the same model gives other pixels.
    as_epsilon = replace(components, scheduler_config={**components.scheduler_config, "prediction_type": "epsilon"})
    assert render_batch(as_epsilon, tasks).images.tobytes() != result.images.tobytes()
