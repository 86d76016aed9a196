"""Spec parsing of the steering fields: values, kinds, files, checks across fields (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_dry_run_fails

from farm.cli import main
from farm.models import file_sha256
from farm.spec import DEFAULT_LOSS_EVERY, DEFAULT_LOSS_SCALE, GuidanceLoss, RenderTask, SpecError, parse_job


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "init.png").write_bytes(b"an image")
    (tmp_path / "style.safetensors").write_bytes(b"an embedding")
    return tmp_path


def tasks(text: str, base_dir: Path | None = None) -> list[RenderTask]:
    return list(parse_job(text, base_dir=base_dir).tasks(random_base=7))


def test_plain_task_json_has_no_technique_fields():
    (task,) = tasks("defaults: {prompt: a dog}")
    assert set(json.loads(task.canonical_json())) == {
        "model",
        "scheduler",
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "guidance",
        "width",
        "height",
    }


def test_every_technique_round_trips_through_task_json(files: Path):
    (task,) = tasks(
        """
defaults:
  prompt: ""
  variation_seed: 9
  variation_strength: 0.25
  init_image: init.png
  strength: 0.5
  mix: [{prompt: a dog, weight: 0.7}, {prompt: a puppy, weight: 0.3}]
  mix_mode: slerp
  embeddings: [style.safetensors, {path: style.safetensors, token: <s>}]
  guidance_loss: {name: color, target: [null, null, 0.9], scale: 100, every: 2}
  capture: [x0]
  long_prompt: chunk
""",
        files,
    )
    again = RenderTask.from_json(task.canonical_json())
    assert again == task and again.task_id == task.task_id
    assert task.init_image == str((files / "init.png").resolve())
    assert task.init_image_sha256 == file_sha256(str(files / "init.png"))
    assert task.embeddings[1].token == "<s>" and task.embeddings[0].sha256 == file_sha256(
        str(files / "style.safetensors")
    )
    assert task.start_step == 10  # 20 steps at strength 0.5: int(20 x 0.5) run, from step 10


def test_strength_and_start_step_are_both_recorded(files: Path):
    (by_strength,) = tasks("defaults: {init_image: init.png, strength: 0.75, steps: 20}", files)
    (by_start,) = tasks("defaults: {init_image: init.png, start_step: 5, steps: 20}", files)
    (by_default,) = tasks("defaults: {init_image: init.png, steps: 20}", files)
    assert (by_strength.strength, by_strength.start_step) == (0.75, 5)
    assert (by_start.strength, by_start.start_step) == (0.75, 5)
    assert (by_default.strength, by_default.start_step) == (0.8, 4)  # diffusers' default strength


def test_strength_follows_diffusers_rounding(files: Path):
    # int(steps x strength) steps run: 0.29 x 100 is 28.999999999999996 in floats, so 28 run
    (task,) = tasks("defaults: {init_image: init.png, strength: 0.29, steps: 100}", files)
    assert task.start_step == 72


def test_a_changed_file_changes_the_task_id(files: Path):
    before = tasks("defaults: {init_image: init.png}", files)[0].task_id
    (files / "init.png").write_bytes(b"another image")
    assert tasks("defaults: {init_image: init.png}", files)[0].task_id != before


def test_perturb_kind_is_one_seed_times_variations_times_strengths():
    spec = parse_job(
        "kind: perturb\ndefaults: {prompt: a dog, seed: 42}\nperturb: {seeds: {random: 3}, strengths: [0.1, 0.2]}"
    )
    expanded = list(spec.tasks(random_base=1))
    assert len(expanded) == spec.count() == 6
    assert {t.seed for t in expanded} == {42}
    assert len({t.variation_seed for t in expanded}) == 3
    assert sorted({t.variation_strength for t in expanded}) == [0.1, 0.2]
    scaled = tasks("kind: perturb\ndefaults: {seed: 1}\nperturb: {seeds: [5], strengths: [0.001, 0.4], mode: scale}")
    assert [(t.perturb_scale, t.variation_strength) for t in scaled] == [(0.001, 0.0), (0.4, 0.0)]


def test_random_variation_seeds_are_fixed_by_the_run():
    text = "defaults: {variation_seed: random, variation_strength: 0.1}\nsweep: {seed: [1, 2]}"
    first = [t.variation_seed for t in parse_job(text).tasks(random_base=3)]
    assert first == [t.variation_seed for t in parse_job(text).tasks(random_base=3)]
    assert first != [t.variation_seed for t in parse_job(text).tasks(random_base=4)]
    assert len(set(first)) == 2 and all(s is not None for s in first)


def test_trajectory_kind_captures_both_unless_told():
    (task,) = tasks("kind: trajectory\ndefaults: {prompt: a dog}")
    assert task.capture == ("latents", "x0")
    (task,) = tasks("kind: trajectory\ndefaults: {prompt: a dog, capture: x0}")
    assert task.capture == ("x0",)


def test_techniques_can_be_swept(files: Path):
    spec = parse_job(
        """
defaults: {prompt: a dog}
sweep:
  guidance_loss: [null, {name: color, target: [null, null, 0.9]}]
  token_mix: [{token: dog, with: puppy, weight: 0.5}, [{token: dog, with: skunk}]]
""",
        base_dir=files,
    )
    expanded = list(spec.tasks())
    assert len(expanded) == 4
    assert [t.guidance_loss is None for t in expanded] == [True, True, False, False]  # a batch field: outermost
    assert expanded[1].token_mix[0].other == "skunk" and expanded[1].token_mix[0].weight == 0.5


BAD_STEERING = [
    ("defaults: {init_image: init.png, strength: 1.5}", "defaults.strength"),
    ("defaults: {init_image: missing.png}", "defaults.init_image: no such file"),
    ("sweep: {init_image: [init.png, gone.png]}", "sweep.init_image[1]: no such file"),
    ("defaults: {strength: 0.5}", "strength: needs an init_image"),
    ("defaults: {init_image: init.png, strength: 0.5, start_step: 3}", "start_step: give strength or start_step"),
    ("defaults: {init_image: init.png, start_step: 30, steps: 20}", "start_step: 30 is past the last step"),
    ("defaults: {variation_strength: 0.5}", "variation_strength: needs a variation_seed"),
    ("defaults: {variation_seed: 1, variation_strength: 2}", "defaults.variation_strength"),
    ("defaults: {variation_seed: 1, perturb_scale: -1}", "defaults.perturb_scale"),
    ("defaults: {variation_seed: 1, variation_strength: 0.1, perturb_scale: 0.1}", "perturb_scale: use"),
    ("defaults: {variation_seed: -3}", "defaults.variation_seed"),
    ("defaults: {init_image_sha256: abc}", "defaults.init_image_sha256"),
    ("defaults: {prompt: a dog, mix: [{prompt: a cat, weight: 1}]}", "mix: replaces prompt"),
    ("defaults: {mix: [{prompt: a cat}]}", "defaults.mix[0].weight: missing"),
    ("defaults: {mix: [{prompt: a, weight: 1, colour: red}]}", "defaults.mix[0].colour: unknown"),
    ("defaults: {mix: [{prompt: a, weight: 1}], mix_mode: slerp}", "mix_mode: slerp blends exactly two"),
    ("defaults: {mix_mode: average}", "defaults.mix_mode"),
    ("defaults: {token_mix: {token: dog}}", "defaults.token_mix.with: missing"),
    ("defaults: {token_mix: [{token: dog, with: ''}]}", "defaults.token_mix[0].with"),
    ("defaults: {embeddings: [missing.pt]}", "defaults.embeddings[0]: no such file"),
    ("defaults: {embeddings: style.safetensors}", "defaults.embeddings: expected a list"),
    ("defaults: {guidance_loss: {name: purple}}", "defaults.guidance_loss.name"),
    ("defaults: {guidance_loss: {name: color, target: [1, 2]}}", "defaults.guidance_loss.target"),
    ("defaults: {guidance_loss: {name: color, target: [null, null, null]}}", "defaults.guidance_loss.target"),
    ("defaults: {guidance_loss: {name: color, target: [0, 0, 1], every: 0}}", "defaults.guidance_loss.every"),
    ("defaults: {guidance_loss: {name: 'os:system; rm'}}", "defaults.guidance_loss.name"),
    ("defaults: {capture: [latents, frames]}", "defaults.capture[1]"),
    ("defaults: {capture: [x0, x0]}", "defaults.capture: each kind once"),
    ("defaults: {long_prompt: wrap}", "defaults.long_prompt"),
    ("kind: movie", "kind"),
    ("perturb: {seeds: [1], strengths: [0.1]}", "perturb: only for kind: perturb"),
    ("kind: perturb\nperturb: {seeds: [1]}", "perturb: needs seeds"),
    ("kind: perturb\nsweep: {seed: [1, 2]}\nperturb: {seeds: [1], strengths: [0.1]}", "sweep.seed"),
    ("kind: perturb\nperturb: {seeds: [1], strengths: [0.1], mode: wobble}", "perturb.mode"),
    ("kind: perturb\nperturb: {seeds: [1], strengths: [2]}", "perturb.strengths[0]"),
    ("defaults: {variation_seed: 1, variation_strength: " + "9" * 400 + "}", "defaults.variation_strength"),
    ("defaults: {guidance_loss: {name: color, target: [0, 0, " + "9" * 400 + "]}}", "defaults.guidance_loss.target"),
    ("defaults: {mix: [{prompt: a, weight: 1}, {prompt: b, weight: -1}], mix_mode: slerp}", "mix_mode: slerp needs"),
    ("defaults: {mix: [{prompt: a, weight: 0}, {prompt: b, weight: 0}], mix_mode: slerp}", "mix_mode: slerp needs"),
    # 50,000 variation seeds reduce to one value for the checks, so steps 10 x start_step 20 is still found
    (
        "defaults: {init_image: init.png, start_step: 20}\n"
        "sweep: {steps: [10, 50], variation_seed: {range: [0, 50001]}}",
        "start_step: 20 is past the last step (steps: 10)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_STEERING)
def test_bad_steering_value_exits_2_naming_the_field(files: Path, text: str, message: str):
    job = files / "bad.yaml"
    job.write_text(text)
    assert_dry_run_fails(job, message)


def test_fields_zipped_together_are_checked_row_by_row():
    ok = parse_job("zip: {prompt: ['', a dog], mix: [[{prompt: a puppy, weight: 1}], null]}")
    assert [bool(t.mix) for t in ok.tasks()] == [True, False]
    with pytest.raises(SpecError, match="mix: replaces prompt"):
        parse_job("zip: {prompt: [a dog, ''], mix: [[{prompt: a puppy, weight: 1}], null]}")


def test_dry_run_names_the_techniques(files: Path):
    job = files / "dry.yaml"
    job.write_text(
        "kind: perturb\ndefaults: {prompt: a dog, seed: 42, init_image: init.png, strength: 0.5, capture: x0}\n"
        "perturb: {seeds: [3], strengths: [0.1], mode: scale}"
    )
    result = CliRunner().invoke(main, ["render", str(job), "--dry-run", "--out", str(files / "out")])
    assert result.exit_code == 0, result.output
    assert "[variation 3 at scale 0.1, img2img init.png from step 10, capture x0]" in result.output


def test_checks_across_fields_hold_on_large_sweeps():
    spec = parse_job("sweep: {variation_strength: [0.25, 0.5], variation_seed: {range: [0, 50001]}}")
    assert spec.count() == 100_002


def test_perturb_with_a_random_seed_has_one_base_seed():
    text = "kind: perturb\ndefaults: {seed: random}\nperturb: {seeds: [1, 2], strengths: [0.1, 0.2]}"
    assert len({t.seed for t in parse_job(text).tasks(random_base=5)}) == 1


def test_guidance_loss_defaults_are_the_specs_defaults():
    # task.py holds literals (it imports nothing from fields.py); keep the two in step.
    loss = GuidanceLoss(name="color")
    assert (loss.scale, loss.every) == (DEFAULT_LOSS_SCALE, DEFAULT_LOSS_EVERY)
