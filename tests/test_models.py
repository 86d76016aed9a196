"""Model references: the presets, diffusers folders, hub ids in the cache, pickle safety, the safety checker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from farm import models, presets
from farm.cli import main


def test_tiny_is_a_real_diffusers_folder(tiny_path: Path):
    assert (tiny_path / "model_index.json").is_file()
    for part in ("unet", "vae", "text_encoder"):
        assert list((tiny_path / part).glob("*.safetensors")), part
    assert presets.ensure_tiny() == tiny_path  # built once, then reused


def test_tiny_tokenizer_is_a_real_clip_tokenizer(tiny_components):
    from transformers import CLIPTokenizer

    tokenizer = tiny_components.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    ids = tokenizer("a cute shiba inu").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.tokenize("a cute shiba inu") == ["a</w>", "cute</w>", "shiba</w>", "inu</w>"]
    # words outside the small vocabulary fall back to characters, never to <unk>
    assert tokenizer.tokenize("zqx") == ["z", "q", "x</w>"]
    assert tokenizer.model_max_length == 77


def test_every_tiny_word_is_one_token(tiny_components):
    # token mixing and textual inversion need whole words; "cat" must not split on "at"
    split = [w for w in presets.TINY_WORDS if len(tiny_components.tokenizer.tokenize(w)) != 1]
    assert split == []


@pytest.mark.parametrize(
    ("name", "parts"), [("tiny", ("unet", "vae", "text_encoder")), ("tiny-xl", ("unet", "text_encoder_2"))]
)
def test_preset_weights_come_from_a_fixed_seed(
    tmp_path: Path, monkeypatch, name: str, parts: tuple[str, ...], request: pytest.FixtureRequest
):
    built = request.getfixturevalue({"tiny": "tiny_path", "tiny-xl": "tiny_xl_path"}[name])
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    rebuilt = presets.ensure_preset(name)
    assert rebuilt == tmp_path / "models" / built.name and rebuilt != built
    assert not [p for p in rebuilt.parent.iterdir() if p.name.startswith(".")]  # the staging folder was renamed
    for part in parts:
        (a,) = (built / part).glob("*.safetensors")
        (b,) = (rebuilt / part).glob("*.safetensors")
        assert models.file_sha256(a) == models.file_sha256(b), part


def test_an_unknown_preset_name_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'tiny-sd3'"):
        presets.ensure_preset("tiny-sd3")


def test_model_hash_is_stable_and_content_based(tmp_path: Path, tiny_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    assert models.model_hash(copy) == models.model_hash(tiny_path)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models.model_hash(copy) != models.model_hash(tiny_path)


def test_components_have_sd_shapes(tiny_components):
    c = tiny_components
    assert c.unet.config.in_channels == 4 and c.vae.config.latent_channels == 4
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size
    assert c.dtype == "float32" and c.unet.dtype == torch.float32
    assert len(c.model_hash) == 64


def test_diffusers_folder_loads_through_from_pretrained(tmp_path: Path, tiny_path: Path):
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_path, folder)
    resolved = models.resolve_model(str(folder))
    assert resolved.kind == "folder"
    loaded = models.load_components(resolved, "cpu", "float32")
    assert loaded.model_hash == models.model_hash(tiny_path)


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay a folder out the way huggingface_hub caches a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def test_hub_id_in_the_local_cache_loads(tmp_path: Path, tiny_path: Path, monkeypatch):
    import huggingface_hub.constants

    snapshot = fake_hub_cache(tmp_path, "farm-tests/tiny-sd", tiny_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    resolved = models.resolve_model("farm-tests/tiny-sd")
    assert Path(resolved.path) == snapshot
    assert models.load_components(resolved, "cpu", "float32").unet is not None


def test_hub_id_missing_from_cache_is_a_clear_error(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(models.ModelError, match=r"'nobody/no-such-model' is not in the local Hugging Face cache"):
        models.resolve_model("nobody/no-such-model")


def job_with_model(tmp_path: Path, model: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {model}\ndefaults: {{prompt: a cat, width: 64, height: 64, steps: 2}}\n")
    return job


def test_cli_missing_hub_id_exits_2_naming_it(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(main, ["render", str(job_with_model(tmp_path, "nobody/no-such-model"))])
    assert result.exit_code == 2
    assert "nobody/no-such-model" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_checkpoint_is_refused_without_allow_pickle(tmp_path: Path, suffix: str):
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(b"not really a pickle")
    with pytest.raises(models.ModelError, match="pickle"):
        models.resolve_model(str(checkpoint))
    assert models.resolve_model(str(checkpoint), allow_pickle=True).kind == "single_file"
    result = CliRunner().invoke(
        main, ["render", str(job_with_model(tmp_path, str(checkpoint))), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--allow-pickle" in result.output and "Traceback" not in result.output


def test_folder_without_model_index_is_refused(tmp_path: Path):
    with pytest.raises(models.ModelError, match="model_index.json"):
        models.resolve_model(str(tmp_path))


def test_dtype_defaults():
    assert models.pick_dtype("cuda") == "float16"
    assert models.pick_dtype("cpu") == "float32"
    assert models.pick_dtype("cpu", "bfloat16") == "bfloat16"


def test_folder_with_only_pickle_weights_needs_allow_pickle(tmp_path: Path, tiny_path: Path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin-weights"
    shutil.copytree(tiny_path, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(models.ModelError, match="--allow-pickle"):
        models.load_components(models.resolve_model(str(folder)), "cpu", "float32")
    loaded = models.load_components(models.resolve_model(str(folder), allow_pickle=True), "cpu", "float32")
    assert loaded.unet is not None


def test_the_safety_checker_is_loaded_only_when_asked(tmp_path: Path, tiny_components):
    """A model with its own safety_checker and feature_extractor: kept on Components when asked for,
    left unloaded otherwise."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(vision_config={**vision, "image_size": 32, "patch_size": 8}, projection_dim=32)
    c = tiny_components
    StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=c.pipeline.scheduler,
        safety_checker=StableDiffusionSafetyChecker(config).eval(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ).save_pretrained(tmp_path / "with-checker", safe_serialization=True)
    resolved = models.resolve_model(str(tmp_path / "with-checker"))
    checked = models.load_components(resolved, "cpu", "float32", safety_checker=True)
    assert isinstance(checked.safety_checker, StableDiffusionSafetyChecker) and not checked.safety_checker.training
    assert checked.feature_extractor is not None
    assert models.load_components(resolved, "cpu", "float32").safety_checker is None


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_a_model_without_a_safety_checker_says_so(name: str, request: pytest.FixtureRequest):
    request.getfixturevalue({"tiny": "tiny_path", "tiny-xl": "tiny_xl_path"}[name])
    with pytest.raises(models.ModelError) as caught:
        models.load_components(models.resolve_model(name), "cpu", "float32", safety_checker=True)
    assert str(caught.value) == (
        f"model {name!r} has no safety_checker component; name a checker with safety_check.checker"
    )
