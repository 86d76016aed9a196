"""The spec side of the models people bring: LoRA entries and their weight sweeps and schedules,
A1111's prompt tags refused, schedule types, clip skip, family defaults read from the model's
reference (native size, SDXL micro-conditioning), fields a family refuses, the safety check."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main
from farm.models import file_sha256
from farm.spec import Lora, RenderTask, SafetyCheck, SpecError, parse_job


@pytest.fixture
def lora_files(tmp_path: Path) -> Path:
    (tmp_path / "style.safetensors").write_bytes(b"not really a lora, but hashed all the same")
    (tmp_path / "other.safetensors").write_bytes(b"another one")
    (tmp_path / "old.pt").write_bytes(b"a pickle")
    return tmp_path


def tasks(text: str, base_dir: Path | None = None) -> list[RenderTask]:
    return list(parse_job(text, base_dir=base_dir).tasks())


def test_a_lora_entry_is_made_absolute_and_hashed(lora_files: Path):
    (task,) = tasks("defaults: {loras: [style.safetensors, {path: other.safetensors, weight: 0.5}]}", lora_files)
    style, other = task.loras
    assert style == Lora(str(lora_files / "style.safetensors"), file_sha256(lora_files / "style.safetensors"), 1.0)
    assert other.weight == 0.5 and other.sha256 == file_sha256(lora_files / "other.safetensors")
    assert RenderTask.from_json(task.canonical_json()) == task


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ("[missing.safetensors]", r"defaults.loras\[0\].path: no such file: missing.safetensors"),
        ("[{path: style.safetensors, weight: 11}]", r"defaults.loras\[0\].weight: expected a number from -10 to 10"),
        ("[{path: style.safetensors, scale: 1}]", r"defaults.loras\[0\].scale: unknown field"),
        ("style.safetensors", "defaults.loras: expected a list of LoRA files"),
    ],
)
def test_bad_lora_entries_are_refused(lora_files: Path, loras: str, message: str):
    with pytest.raises(SpecError, match=message):
        parse_job(f"defaults: {{loras: {loras}}}", base_dir=lora_files)


def test_a_lora_weight_sweep_is_one_line_and_keeps_the_entry_at_zero(lora_files: Path):
    job = """
defaults: {loras: [style.safetensors, other.safetensors]}
sweep: {loras.0.weight: [0, 0.25, 0.5, 1], seed: [1, 2]}
"""
    found = tasks(job, lora_files)
    assert len(found) == 8
    assert [t.loras[0].weight for t in found[::2]] == [0, 0.25, 0.5, 1]
    assert {t.loras[1].weight for t in found} == {1.0}
    assert all(t.loras[0].path.endswith("style.safetensors") for t in found)
    # the weight is part of the batch key: the weight axis is outermost and batches never mix sets
    assert found[0].batch_key == found[1].batch_key != found[2].batch_key
    assert '"weight":0.0' in found[0].canonical_json()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("{loras.2.weight: [0, 1]}", r"sweep.loras.2.weight: defaults.loras has 2 entries"),
        ("{loras.0.weight: [0, 1], loras: [[], [style.safetensors]]}", "loras is swept too"),
        ("{loras.0.weight: [0, 20]}", r"sweep.loras.0.weight\[1\]: expected a number from -10 to 10"),
        ("{loras.0.scale: [0, 1]}", "sweep.loras.0.scale: unknown task field"),
    ],
)
def test_bad_lora_weight_sweeps_are_refused(lora_files: Path, sweep: str, message: str):
    with pytest.raises(SpecError, match=message):
        parse_job(f"defaults: {{loras: [style.safetensors, other.safetensors]}}\nsweep: {sweep}", base_dir=lora_files)


def test_a_lora_weight_can_be_keyframed(lora_files: Path):
    job = """
kind: walk
defaults: {loras: [style.safetensors], width: 64, height: 64}
walk: {prompts: [a cat, a dog], seeds: [1, 2], frames: 2, schedules: {loras.0.weight: "0:(0), 2:(1)"}}
"""
    found = tasks(job, lora_files)
    assert [t.loras[0].weight for t in found] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("where", ["defaults: {prompt: '{p}'}", "sweep: {prompt: ['a cat', '{p}']}"])
def test_an_a1111_lora_tag_is_refused_with_the_entry_to_write(where: str):
    job = where.replace("{p}", "a cat, <lora:detail-tweaker:0.8>")
    with pytest.raises(SpecError, match=r"loras: \[\{path: detail-tweaker.safetensors, weight: 0.8\}\]"):
        parse_job(job)


def test_schedule_type_and_clip_skip_are_task_fields_left_out_of_a_plain_id():
    plain, karras = tasks("scheduler: euler\nsweep: {schedule_type: [automatic, karras]}")
    assert "schedule_type" not in plain.canonical_json() and "clip_skip" not in plain.canonical_json()
    assert karras.schedule_type == "karras" and karras.batch_key != plain.batch_key
    (skipped,) = tasks("defaults: {clip_skip: 2, width: 64, height: 64}")
    assert skipped.clip_skip == 2
    with pytest.raises(SpecError, match="defaults.schedule_type: expected one of automatic, karras, exponential"):
        parse_job("defaults: {schedule_type: polyexponential}")
    with pytest.raises(SpecError, match="defaults.clip_skip: expected a whole number from 1 to 12"):
        parse_job("defaults: {clip_skip: 0}")


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ("scheduler: ddim\ndefaults: {schedule_type: karras}", "schedule_type: sampler ddim has no karras schedule"),
        ("sweep: {scheduler: [euler, euler_a], schedule_type: [exponential]}", "sampler euler_a has no exponential"),
        ("scheduler: lcm\ndefaults: {steps: 60}", "steps: lcm takes at most 50 steps"),
    ],
)
def test_a_sampler_is_refused_a_schedule_it_cannot_take(job: str, message: str):
    with pytest.raises(SpecError, match=message):
        parse_job(job)


def test_a_job_without_a_size_renders_at_the_models_native_size():
    (tiny,) = tasks("model: tiny")
    assert (tiny.width, tiny.height) == (64, 64) and tiny.original_size is None
    (xl,) = tasks("model: tiny-xl")
    assert (xl.width, xl.height) == (128, 128)
    # SDXL's micro-conditioning gets diffusers' defaults, so the task is fully resolved
    assert xl.original_size == (128, 128) and xl.target_size == (128, 128) and xl.crops_coords_top_left == (0, 0)
    (wide,) = tasks("model: tiny-xl\ndefaults: {width: 192, original_size: [1024, 1024]}")
    assert (wide.height, wide.width) == (128, 192) and wide.original_size == (1024, 1024)
    assert wide.target_size == (128, 192)


def test_fields_a_family_cannot_take_are_refused(tmp_path: Path):
    with pytest.raises(SpecError, match="original_size: SDXL micro-conditioning; model 'tiny' is Stable Diffusion 1.x"):
        parse_job("model: tiny\ndefaults: {original_size: [512, 512]}")
    with pytest.raises(SpecError, match="crops_coords_top_left: .*model 'tiny'"):
        parse_job("sweep: {model: [tiny-xl, tiny], crops_coords_top_left: [[0, 0], [8, 8]]}")
    (tmp_path / "token.safetensors").write_bytes(b"x")
    with pytest.raises(SpecError, match="embeddings: .*model 'tiny-xl' is SDXL"):
        parse_job("model: tiny-xl\ndefaults: {embeddings: [token.safetensors]}", base_dir=tmp_path)
    with pytest.raises(SpecError, match=r"defaults.original_size: expected \[height, width\]"):
        parse_job("model: tiny-xl\ndefaults: {original_size: [512]}")


def test_the_safety_check_is_a_job_field(tmp_path: Path):
    assert parse_job("name: a").safety_check is None
    assert parse_job("safety_check: withhold").safety_check == SafetyCheck("withhold")
    (tmp_path / "checker").mkdir()
    spec = parse_job("safety_check: {checker: checker}", base_dir=tmp_path)
    assert spec.safety_check == SafetyCheck("blur", str((tmp_path / "checker").resolve()))
    with pytest.raises(SpecError, match="safety_check: expected one of keep, blur, withhold"):
        parse_job("safety_check: hide")
    with pytest.raises(SpecError, match="safety_check.checker: no such folder: nowhere"):
        parse_job("safety_check: {checker: nowhere}", base_dir=tmp_path)


def test_a_pickle_lora_is_refused_before_ray_starts(lora_files: Path, tmp_path: Path):
    job = lora_files / "job.yaml"
    job.write_text("name: pickled\ndefaults: {loras: [old.pt], width: 64, height: 64, steps: 1}\n")
    result = CliRunner().invoke(main, ["render", str(job), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: loras: {lora_files / 'old.pt'} is not a .safetensors file; pickle files can run arbitrary code "
        "when loaded: convert it to .safetensors, or pass --allow-pickle if you trust its source"
    ]
    assert not (tmp_path / "out" / "pickled").exists()
