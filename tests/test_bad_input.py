"""Bad input through the real ``farm render`` (not --dry-run): a corpus of malformed job files.

Each case must exit 2 with one short line ``error: <field>: <what is expected>``, print no
traceback, start no Ray, and write nothing: not outside the output folder (every file under
the test's folder and the farm cache keeps its name and mtime) and, since the job is refused
before the output folder is prepared, not inside it either.

A case is ``(name, file bytes, expected start of the message after "error: ")``. In both the
bytes and the message, ``{files}`` is a folder of fixture files and ``{job}`` the job file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_animation import write_clip
from test_input_limits import bomb_png

import farm.driver
from farm.cli import main

# A message names the problem in a few words; it may quote a value, but never a whole expansion.
MAX_LINE = 1000
# Every case is refused in milliseconds; this only stops a case that would run forever.
DEADLINE_S = 30.0


def bomb(levels: int = 9) -> bytes:
    """A "billion laughs" flow list: each level is nine aliases of the one before (9**levels strings expanded)."""
    parts = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("[" + ", ".join(parts) + "]").encode()


def bomb_keys(levels: int = 9) -> bytes:
    """The classic form: one top-level key per level."""
    lines = ["lol0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"lol{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines).encode()


# A valid 13000x13000 PNG of 20 KB: over the input pixel limit, refused from its header.
BIG_PNG = bomb_png(13000, 13000)
NAME_MSG = "name: expected letters, digits, '_', '-' or '.' (it names the output folder)"
NOT_A_MAPPING = "{job}: expected a mapping of fields"
# 1e16 tasks from four small axes: refused from the count, never expanded.
HUGE_SWEEP = (
    b"defaults: {steps: 4, width: 64, height: 64}\n"
    b"sweep:\n"
    b"  seed: {range: [0, 10000]}\n"
    b"  variation_seed: {range: [0, 10000]}\n"
    b"  guidance: {linspace: [0, 100, 10000]}\n"
    b"  variation_strength: {linspace: [0, 1, 10000]}\n"
)

CASES = [
    # --- not a job at all: bytes, YAML syntax, document shape
    ("empty_file", b"", NOT_A_MAPPING),
    ("only_a_comment", b"# nothing here\n", NOT_A_MAPPING),
    ("yaml_list", b"- name: a\n- model: tiny\n", NOT_A_MAPPING),
    ("yaml_scalar", b"42\n", NOT_A_MAPPING),
    ("yaml_text", b"render me a cat\n", NOT_A_MAPPING),
    ("latin1_bytes", b"name: caf\xe9\n", "{job}: not UTF-8 text (bad byte at offset 9)"),
    ("utf16_with_bom", "name: a\n".encode("utf-16"), "{job}: not UTF-8 text (bad byte at offset 0)"),
    ("unclosed_bracket", b"sweep: [unclosed\n", "{job}: invalid YAML"),
    ("tab_indent", b"defaults:\n\tsteps: 3\n", "{job}: invalid YAML at line 2"),
    ("two_documents", b"name: a\n---\nname: b\n", "{job}: invalid YAML at line 2"),
    ("python_tag", b"name: !!python/object/apply:os.system [echo hi]\n", "{job}: invalid YAML at line 1"),
    ("unhashable_key", b"{[1]: 2}\n", "{job}: invalid YAML at line 1"),
    (
        "nul_byte",
        b"name: a\x00b\n",
        "{job}: invalid YAML",
    ),
    # --- unknown keys, at every level that has a fixed set of keys
    ("unknown_top_level", b"colour: red\n", "colour: unknown field"),
    ("typo_top_level", b"sweeps: {seed: [1, 2]}\n", "sweeps: unknown field"),
    ("unknown_in_defaults", b"defaults: {colour: red}\n", "defaults.colour: unknown task field"),
    ("unknown_in_sweep", b"sweep: {colour: [red, blue]}\n", "sweep.colour: unknown task field"),
    ("unknown_in_zip", b"zip: {colour: [red, blue], seed: [1, 2]}\n", "zip.colour: unknown task field"),
    ("unknown_in_perturb", b"kind: perturb\nperturb: {seeds: [1], strengths: [0.1], wobble: 1}\n", "perturb.wobble"),
    ("unknown_in_mix", b"defaults: {mix: [{prompt: a, weight: 1, colour: red}]}\n", "defaults.mix[0].colour"),
    (
        "unknown_in_guidance_loss",
        b"defaults: {guidance_loss: {name: color, target: [0, 0, 1], colour: red}}\n",
        "defaults.guidance_loss.colour: unknown field",
    ),
    ("derived_field", b"defaults: {init_image_sha256: abc}\n", "defaults.init_image_sha256: computed from the file"),
    # --- wrong types: every top-level field
    ("name_int", b"name: 42\n", NAME_MSG),
    ("name_list", b"name: [a]\n", NAME_MSG),
    ("description_list", b"description: [a, b]\n", "description: expected text"),
    ("kind_int", b"kind: 3\n", "kind: unknown kind 3"),
    ("model_int", b"model: 42\n", "model: unknown model 42"),
    ("model_config_int", b"model_config: 7\n", "model_config: expected a path"),
    ("scheduler_list", b"scheduler: [ddim]\n", "scheduler: unknown scheduler ['ddim']"),
    ("defaults_list", b"defaults: [1, 2]\n", "defaults: expected a mapping"),
    ("sweep_list", b"sweep: [seed, 1]\n", "sweep: expected a mapping"),
    ("zip_int", b"zip: 5\n", "zip: expected a mapping"),
    ("perturb_list", b"kind: perturb\nperturb: [1, 2]\n", "perturb: expected a mapping"),
    # --- wrong types: task fields
    ("prompt_int", b"defaults: {prompt: 3}\n", "defaults.prompt: expected text, got int"),
    ("steps_word", b"defaults: {steps: ten}\n", "defaults.steps: expected a whole number"),
    ("seed_bool", b"defaults: {seed: true}\n", "defaults.seed: expected a whole number"),
    ("width_fraction", b"defaults: {width: 64.5}\n", "defaults.width: expected a multiple of 8"),
    ("guidance_word", b"defaults: {guidance: high}\n", "defaults.guidance: expected a number"),
    ("sweep_axis_scalar", b"sweep: {seed: 5}\n", "sweep.seed: expected a list"),
    ("embeddings_not_a_list", b"defaults: {embeddings: style.pt}\n", "defaults.embeddings: expected a list"),
    ("capture_int", b"defaults: {capture: 7}\n", "defaults.capture: expected a list"),
    ("token_mix_word", b"defaults: {token_mix: dog}\n", "defaults.token_mix: expected a list"),
    ("mix_weight_word", b"defaults: {mix: [{prompt: a, weight: heavy}]}\n", "defaults.mix[0].weight"),
    # --- negative, zero and huge values
    ("steps_zero", b"defaults: {steps: 0}\n", "defaults.steps: expected a whole number"),
    ("steps_million", b"defaults: {steps: 1000000}\n", "defaults.steps: expected a whole number"),
    ("steps_400_digits", b"defaults: {steps: " + b"9" * 400 + b"}\n", "defaults.steps: expected a whole number"),
    ("width_100000", b"defaults: {width: 100000}\n", "defaults.width: expected a multiple of 8"),
    ("height_negative", b"defaults: {height: -64}\n", "defaults.height: expected a multiple of 8"),
    ("seed_negative", b"defaults: {seed: -1}\n", "defaults.seed: expected a whole number"),
    ("seed_2_pow_40", b"defaults: {seed: 1099511627776}\n", "defaults.seed: expected a whole number"),
    ("guidance_inf", b"defaults: {guidance: 1.0e+309}\n", "defaults.guidance: expected a number from 0 to 100"),
    ("guidance_nan", b"defaults: {guidance: .nan}\n", "defaults.guidance: expected a number from 0 to 100"),
    ("guidance_negative", b"defaults: {guidance: -1}\n", "defaults.guidance: expected a number from 0 to 100"),
    ("range_to_inf", b"sweep: {seed: {range: [0, 1.0e+309]}}\n", "sweep.seed.range: expected [start, stop]"),
    ("range_4_billion", b"sweep: {seed: {range: [0, 4294967295]}}\n", "sweep.seed.range: 4294967295 values"),
    ("random_zero_seeds", b"sweep: {seed: {random: 0}}\n", "sweep.seed.random: expected a whole number"),
    ("linspace_fraction", b"sweep: {guidance: {linspace: [1, 2, 2.5]}}\n", "sweep.guidance.linspace"),
    ("range_step_zero", b"sweep: {guidance: {range: [1, 2, 0]}}\n", "sweep.guidance.range: step must not be 0"),
    (
        "loss_scale_huge",
        b"defaults: {guidance_loss: {name: color, target: [0, 0, 1], scale: 10000000}}\n",
        "defaults.guidance_loss.scale",
    ),
    ("perturb_strength_2", b"kind: perturb\nperturb: {seeds: [1], strengths: [2]}\n", "perturb.strengths[0]"),
    (
        "sweep_product_1e16",
        HUGE_SWEEP,
        "sweep: 1e+16 tasks; at most 100,000,000 in one job",
    ),
    (
        "steps_5000_digits",
        b"defaults: {steps: " + b"9" * 5000 + b"}\n",
        "{job}: invalid YAML",
    ),
    # --- missing or unusable files
    (
        "model_missing_file",
        b"model: {files}/missing.safetensors\n",
        "model: unknown model '{files}/missing.safetensors'",
    ),
    ("model_text_file", b"model: {files}/notes.txt\n", "model '{files}/notes.txt': expected a .safetensors file"),
    ("model_pickle", b"model: {files}/model.ckpt\n", "model '{files}/model.ckpt': .ckpt checkpoints are pickle files"),
    (
        "model_not_a_pipeline",
        b"model: {files}/empty_dir\n",
        "model '{files}/empty_dir': folder has no model_index.json",
    ),
    ("model_hub_not_cached", b"model: nobody-here/no-such-model\n", "model 'nobody-here/no-such-model' is not in"),
    (
        "model_sd3_folder",
        b"model: {files}/sd3\n",
        "model '{files}/sd3': pipeline StableDiffusion3Pipeline is not one farm renders",
    ),
    ("init_image_missing", b"defaults: {init_image: missing.png}\n", "defaults.init_image: no such file: missing.png"),
    (
        "init_image_over_pixel_limit",
        b"defaults: {init_image: {files}/big.png}\n",
        "defaults.init_image: {files}/big.png: 13000x13000 pixels is over farm's limit",
    ),
    ("init_image_a_folder", b"defaults: {init_image: {files}/empty_dir}\n", "defaults.init_image: no such file"),
    ("init_image_swept", b"sweep: {init_image: [{files}/init.png, gone.png]}\n", "sweep.init_image[1]: no such file"),
    ("embedding_missing", b"defaults: {embeddings: [missing.pt]}\n", "defaults.embeddings[0]: no such file"),
    # --- YAML anchor bombs: refused from the first element, never expanded
    ("bomb_in_description", b"description: " + bomb(), "description: expected text"),
    ("bomb_in_sweep_prompt", b"sweep: {prompt: " + bomb() + b"}", "sweep.prompt[0]: expected text, got a list"),
    ("bomb_in_defaults_mix", b"defaults: {mix: " + bomb() + b"}", "defaults.mix[0]: expected a mapping"),
    ("bomb_in_zip", b"zip: {prompt: " + bomb() + b", seed: *a8}", "zip.prompt[0]: expected text"),
    ("bomb_anchor_reused", b"zip: {prompt: " + bomb() + b", seed: " + bomb() + b"}", "{job}: invalid YAML at line 1"),
    ("bomb_as_top_level_keys", bomb_keys(), "lol0: unknown field"),
    # Where a message quotes the value it shows a bounded repr, never the expansion.
    (
        "bomb_in_defaults_seed",
        b"defaults: {seed: " + bomb() + b"}",
        "defaults.seed: expected a whole number",
    ),
    (
        "bomb_as_kind",
        b"kind: " + bomb(),
        "kind: unknown kind",
    ),
    (
        "deep_nesting",
        b"description: " + b"[" * 1000 + b"]" * 1000,
        "{job}: invalid YAML",
    ),
    # --- names that would put the output folder elsewhere, or that no file system should hold
    ("name_dotdot_escape", b"name: ../escape\n", NAME_MSG),
    ("name_absolute", b"name: /abs\n", NAME_MSG),
    ("name_dotdot", b"name: ..\n", NAME_MSG),
    ("name_dot", b"name: .\n", NAME_MSG),
    ("name_with_slash", b"name: a/b\n", NAME_MSG),
    ("name_backslash", b"name: 'a\\b'\n", NAME_MSG),
    ("name_hidden", b"name: .hidden\n", NAME_MSG),
    ("name_empty", b"name: ''\n", NAME_MSG),
    ("name_null", b"name: ~\n", NAME_MSG),
    ("name_control_char", b'name: "a\\x01b"\n', NAME_MSG),
    ("name_space", b"name: my job\n", NAME_MSG),
    ("name_200_chars", b"name: " + b"a" * 200 + b"\n", NAME_MSG),
    (
        "name_trailing_newline",
        b'name: "abc\\n"\n',
        NAME_MSG,
    ),
    # --- sweeps and zips
    ("zip_unequal", b"zip: {prompt: [a, b], seed: [1]}\n", "zip: zipped fields need the same number of values"),
    ("zip_empty_group", b"zip: [{}]\n", "zip[0]: expected a mapping"),
    ("swept_twice", b"sweep: {seed: [1]}\nzip: {seed: [2], prompt: [a]}\n", "sweep.seed: swept twice"),
    ("sweep_repeat", b"sweep: {seed: [1, 2, 1]}\n", "sweep.seed[2]: repeats [0]"),
    ("range_backwards", b"sweep: {seed: {range: [5, 1]}}\n", "sweep.seed.range: [5, 1, 1] gives no values"),
    # --- kinds and perturbation
    ("kind_unknown", b"kind: movie\n", "kind: unknown kind 'movie'"),
    ("perturb_without_kind", b"perturb: {seeds: [1], strengths: [0.1]}\n", "perturb: only for kind: perturb"),
    # --- animation: a valid clip with a bad field decodes nothing (the farm cache is snapshotted too)
    (
        "animate_bad_schedule",
        b"kind: animate\nanimate: {source: {files}/clip.mp4, schedules: {strength: '0:(0.5), 3:(x)'}}\n",
        "animate.schedules.strength: schedule '0:(0.5), 3:(x)'",
    ),
    ("animate_no_source", b"kind: animate\nanimate: {mode: chained}\n", "animate.source: missing"),
    ("animate_missing_clip", b"kind: animate\nanimate: {source: {files}/nope.mp4}\n", "animate.source: no such file"),
    (
        "animate_text_file",
        b"kind: animate\nanimate: {source: {files}/notes.txt}\n",
        "animate.source: {files}/notes.txt",
    ),
    (
        "animate_broken_clip",
        b"kind: animate\nanimate: {source: {files}/broken.mp4}\n",
        "animate.source: {files}/broken",
    ),
    ("animate_empty_folder", b"kind: animate\nanimate: {source: {files}/empty_dir}\n", "animate.source: {files}/empty"),
    (
        "animate_range",
        b"kind: animate\nanimate: {source: {files}/clip.mp4, start: 3, end: 2}\n",
        "animate: frames 3 to 2",
    ),
    (
        "animate_colour_unchained",
        b"kind: animate\nanimate: {source: {files}/clip.mp4, color_coherence: true}\n",
        "animate.color_coherence: only for mode: chained",
    ),
    (
        "animate_huge_seed",
        b"kind: animate\nanimate: {source: {files}/clip.mp4, seed: '0:(1), 3:(1e20)'}\n",
        "animate.seed (frame 1)",
    ),
    (
        "animate_prompts_list",
        b"kind: animate\nanimate: {source: {files}/clip.mp4, prompts: [a, b]}\n",
        "animate.prompts",
    ),
    ("walk_one_prompt", b"kind: walk\nwalk: {prompts: [a]}\n", "walk.prompts: a walk needs two different stops"),
    ("walk_without_kind", b"walk: {prompts: [a, b]}\n", "walk: only for kind: walk"),
    ("walk_frames_text", b"kind: walk\nwalk: {prompts: [a, b], frames: many}\n", "walk.frames"),
    ("perturb_no_strengths", b"kind: perturb\nperturb: {seeds: [1]}\n", "perturb: needs seeds"),
    ("perturb_mode", b"kind: perturb\nperturb: {seeds: [1], strengths: [0.1], mode: wobble}\n", "perturb.mode"),
    (
        "perturb_sweeps_seed",
        b"kind: perturb\nsweep: {seed: [1, 2]}\nperturb: {seeds: [1], strengths: [0.1]}\n",
        "sweep.seed: a perturb job has one base seed",
    ),
    # --- fields that contradict each other
    ("mix_with_prompt", b"defaults: {prompt: a, mix: [{prompt: b, weight: 1}]}\n", "mix: replaces prompt"),
    (
        "token_mix_with_mix",
        b"defaults: {mix: [{prompt: a, weight: 1}], token_mix: {token: a, with: b}}\n",
        "token_mix: applies to prompt",
    ),
    (
        "start_step_past_steps",
        b"defaults: {init_image: {files}/init.png, start_step: 30, steps: 20}\n",
        "start_step: 30 is past the last step (steps: 20)",
    ),
    ("strength_without_init_image", b"defaults: {strength: 0.5}\n", "strength: needs an init_image"),
    ("variation_without_seed", b"defaults: {variation_strength: 0.5}\n", "variation_strength: needs a variation_seed"),
    ("slerp_one_prompt", b"defaults: {mix: [{prompt: a, weight: 1}], mix_mode: slerp}\n", "mix_mode: slerp blends"),
    ("model_twice", b"model: tiny\ndefaults: {model: tiny}\n", "defaults.model: also given at the top level"),
]


def params():
    for case in CASES:
        yield pytest.param(*case, DEADLINE_S, id=case[0])


class RayStarted(Exception):
    """Raised by the guard in place of ``start_ray``: bad input must be refused before Ray."""


class DeadlineExceeded(Exception):
    """Raised by SIGALRM when a case runs far longer than a refusal can take."""


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    files = tmp_path / "files"
    (files / "empty_dir").mkdir(parents=True)
    (files / "init.png").write_bytes(b"an image")
    (files / "big.png").write_bytes(BIG_PNG)
    (files / "sd3").mkdir()
    (files / "sd3" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    (files / "notes.txt").write_text("not a model")
    (files / "model.ckpt").write_bytes(b"a pickle")
    (files / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing")
    write_clip(files / "clip.mp4", frames=4)
    (tmp_path / "jobs").mkdir()
    # Relative writes would land here, where the snapshot sees them.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    def refuse_ray(address):
        raise RayStarted(f"start_ray({address!r}) called")

    monkeypatch.setattr(farm.driver, "start_ray", refuse_ray)
    return {"root": tmp_path, "files": files, "jobs": tmp_path / "jobs", "out": tmp_path / "out"}


def write_job(folders: dict[str, Path], data: bytes) -> Path:
    job = folders["jobs"] / "job.yaml"
    job.write_bytes(data.replace(b"{files}", str(folders["files"]).encode()))
    return job


def snapshot(roots: list[Path], skip: Path) -> dict[str, int]:
    """Every path under ``roots`` but ``skip``, with its mtime."""
    return {
        str(path): path.lstat().st_mtime_ns
        for root in roots
        for path in root.rglob("*")
        if path != skip and skip not in path.parents
    }


def invoke_with_deadline(args: list[str], seconds: float):
    def expire(signum, frame):
        raise DeadlineExceeded(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return CliRunner().invoke(main, args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("name", "data", "expected", "deadline"), params())
def test_bad_job_exits_2_with_one_line_and_writes_nothing(
    folders: dict[str, Path], farm_home: Path, name: str, data: bytes, expected: str, deadline: float
):
    job, out = write_job(folders, data), folders["out"]
    roots = [folders["root"], farm_home]
    before = snapshot(roots, out)

    result = invoke_with_deadline(["render", str(job), "--out", str(out)], deadline)

    detail = f"{result.output[:2000]!r} exception={result.exception!r}"
    assert result.exit_code == 2, detail
    assert "Traceback" not in result.output, detail
    lines = result.output.splitlines()
    assert len(lines) == 1, detail
    message = expected.replace("{job}", str(job)).replace("{files}", str(folders["files"]))
    assert lines[0].startswith(f"error: {message}"), detail
    assert len(lines[0]) <= MAX_LINE, f"{len(lines[0])} characters: {lines[0][:300]!r}..."
    assert snapshot(roots, out) == before, "files changed outside the output folder"
    assert not out.exists(), f"bad input wrote into the output folder: {sorted(map(str, out.rglob('*')))}"


def test_corpus_is_large_and_names_are_unique():
    names = [case[0] for case in CASES]
    assert len(names) >= 35
    assert len(set(names)) == len(names)


def test_missing_job_file_exits_2(folders: dict[str, Path]):
    job = folders["jobs"] / "nope.yaml"
    result = CliRunner().invoke(main, ["render", str(job), "--out", str(folders["out"])])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: {job}: cannot read job file (No such file or directory)"]
    assert not folders["out"].exists()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"name: caf\xe9\n", "{job}: not UTF-8 text (bad byte at offset 9)"),
        (b"description: " + bomb(), "description: expected text"),
        (b"name: ../escape\n", NAME_MSG),
    ],
    ids=["latin1_bytes", "bomb_in_description", "name_dotdot_escape"],
)
def test_bad_job_in_a_real_process_prints_one_line_and_no_traceback(
    folders: dict[str, Path], data: bytes, expected: str
):
    job, out = write_job(folders, data), folders["out"]
    # the `farm` console script is farm.cli:main; `python -m farm.cli` runs the same function
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "render", str(job), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {expected.replace('{job}', str(job))}"]
    assert not out.exists()
