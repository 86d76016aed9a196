"""Job spec parsing, validation and sweep expansion (no Ray, no torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_dry_run_fails

from farm.cli import main
from farm.driver import cut_batches
from farm.spec import SpecError, parse_job

GRID = """
name: grid
model: tiny
defaults: {prompt: a cat, steps: 10, width: 64, height: 64}
sweep:
  seed: [1, 2, 3]
  guidance: {range: [5, 8, 1]}
  prompt: [a cat, a dog]
"""


def test_expansion_count_matches_product_and_count():
    spec = parse_job(GRID)
    tasks = list(spec.tasks())
    assert spec.count() == len(tasks) == 3 * 3 * 2


def test_batch_breaking_axes_come_outermost():
    tasks = list(parse_job(GRID).tasks())
    # guidance breaks a batch, so it is the outermost axis even though the spec lists seed first
    assert [t.guidance for t in tasks[:6]] == [5.0] * 6
    assert [t.guidance for t in tasks[6:12]] == [6.0] * 6
    # the other axes keep the spec's order: seed, then prompt innermost
    assert [(t.seed, t.prompt) for t in tasks[:4]] == [(1, "a cat"), (1, "a dog"), (2, "a cat"), (2, "a dog")]


def test_task_ids_stable_across_parses_and_distinct():
    first = [t.task_id for t in parse_job(GRID).tasks()]
    second = [t.task_id for t in parse_job(GRID).tasks()]
    assert first == second
    assert len(set(first)) == len(first)


def test_task_id_ignores_int_vs_float_spelling():
    a = parse_job("defaults: {guidance: 7, prompt: x}")
    b = parse_job("defaults: {guidance: 7.0, prompt: x}")
    assert next(a.tasks()).task_id == next(b.tasks()).task_id


def test_linspace_and_zip():
    spec = parse_job(
        """
defaults: {prompt: x}
sweep:
  guidance: {linspace: [1, 2, 5]}
zip:
  prompt: [a, b, c]
  seed: [10, 20, 30]
"""
    )
    tasks = list(spec.tasks())
    assert spec.count() == len(tasks) == 15
    assert sorted({t.guidance for t in tasks}) == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert {(t.prompt, t.seed) for t in tasks} == {("a", 10), ("b", 20), ("c", 30)}


def test_zip_groups_as_a_list_and_whole_floats_for_int_fields():
    spec = parse_job(
        """
defaults: {prompt: x}
sweep:
  width: {linspace: [64, 128, 2]}
zip:
  - {prompt: [a, b], seed: [1, 1]}
  - {steps: [5, 10], guidance: [3, 4]}
"""
    )
    tasks = list(spec.tasks())
    assert spec.count() == len(tasks) == 2 * 2 * 2
    assert {t.width for t in tasks} == {64, 128} and all(isinstance(t.width, int) for t in tasks)
    assert {(t.steps, t.guidance) for t in tasks} == {(5, 3.0), (10, 4.0)}
    assert {(t.prompt, t.seed) for t in tasks} == {("a", 1), ("b", 1)}  # a zipped column may repeat


def test_unusable_file_name_is_named_when_no_name_is_given(tmp_path: Path):
    job = tmp_path / "my job.yaml"
    job.write_text("defaults: {prompt: x}")
    result = CliRunner().invoke(main, ["render", str(job), "--dry-run"])
    assert result.exit_code == 2 and "'my job' cannot serve" in result.output


def test_random_seeds_are_concrete_and_fixed_by_base():
    spec = parse_job("defaults: {prompt: x}\nsweep:\n  seed: {random: 3}\n  prompt: [a, b]")
    run1 = [t.seed for t in spec.tasks(random_base=7)]
    assert all(isinstance(s, int) for s in run1)
    assert run1 == [t.seed for t in spec.tasks(random_base=7)]
    assert run1 != [t.seed for t in spec.tasks(random_base=8)]
    # a random slot in a sweep is one seed shared by the other axes
    assert run1[0] == run1[1] and len(set(run1)) == 3


def test_default_random_seed_differs_per_task():
    spec = parse_job("defaults: {prompt: x, seed: random}\nsweep:\n  prompt: [a, b, c]")
    assert len({t.seed for t in spec.tasks(random_base=1)}) == 3


def test_batches_are_cut_by_key_and_size_in_task_order():
    tasks = list(parse_job(GRID).tasks())
    batches = list(cut_batches(tasks, 4))
    assert [len(b.tasks) for b in batches] == [4, 2] * 3
    assert [t for b in batches for t in b.tasks] == tasks
    assert all(len({t.batch_key for t in b.tasks}) == 1 for b in batches)
    assert [b.batch_id for b in batches] == [b.batch_id for b in cut_batches(tasks, 4)]


BAD_SPECS = [
    ("bogus: 1", "bogus"),
    ("defaults: {colour: red}", "defaults.colour"),
    ("defaults: {steps: ten}", "defaults.steps"),
    ("defaults: {steps: 0}", "defaults.steps"),
    ("defaults: {width: 100}", "defaults.width"),
    ("sweep: {height: [64, 65]}", "sweep.height[1]"),
    ("sweep: {prompt: []}", "sweep.prompt"),
    ("defaults: {prompt: 3}", "defaults.prompt"),
    ("scheduler: fastest", "scheduler"),
    ("model: no-such-model", "model"),
    ("sweep: {model: [tiny, ./missing.safetensors]}", "sweep.model[1]"),
    ("sweep: {seed: {range: [5, 1]}}", "sweep.seed.range"),
    ("sweep: {seed: -1}", "sweep.seed"),
    ("sweep: {seed: [-1]}", "sweep.seed[0]"),
    ("sweep: {seed: [1, 2, 1]}", "sweep.seed[2]"),
    ("sweep: {guidance: [7, 7.0]}", "sweep.guidance[1]"),
    ("zip: {prompt: [a, a], seed: [1, 1]}", "zip[1]"),
    ("sweep: {guidance: {range: [0, .inf]}}", "sweep.guidance.range"),
    ("sweep: {seed: {range: [0, 4294967295]}}", "sweep.seed.range"),
    ("sweep: 0", "sweep"),
    ("zip: 5", "zip"),
    ("model: " + "x" * 5000, "model"),
    ("zip: {prompt: [a, b], seed: [1]}", "zip"),
    ("name: ../escape", "name"),
    ("defaults: [1, 2]", "defaults"),
    ("sweep: {guidance: {range: [1, 2, 0]}}", "sweep.guidance.range"),
]


@pytest.mark.parametrize(("text", "field"), BAD_SPECS)
def test_bad_spec_exits_2_naming_the_field(tmp_path: Path, text: str, field: str):
    job = tmp_path / "bad.yaml"
    job.write_text(text)
    assert_dry_run_fails(job, field)


def test_bad_yaml_and_bad_bytes(tmp_path: Path):
    for name, data in [("a.yaml", b"sweep: [unclosed"), ("b.yaml", b"name: \xff\xfe")]:
        job = tmp_path / name
        job.write_bytes(data)
        result = CliRunner().invoke(main, ["render", str(job)])
        assert result.exit_code == 2
        assert result.output.startswith("error: ") and "Traceback" not in result.output


def test_bad_spec_in_a_real_process_prints_no_traceback(tmp_path: Path):
    job = tmp_path / "bad.yaml"
    job.write_text("defaults: {steps: -3}")
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "render", str(job)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: defaults.steps: expected a whole number of steps from 1 to 1000, got -3"
    ]


def test_dry_run_prints_count_and_first_tasks_without_ray(tmp_path: Path):
    job = tmp_path / "grid.yaml"
    job.write_text(GRID)
    result = CliRunner().invoke(main, ["render", str(job), "--dry-run", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "grid: 18 tasks"
    assert "... and 8 more" in result.output
    assert not (tmp_path / "out").exists()


def test_spec_raises_spec_error_type():
    with pytest.raises(SpecError, match="sweep.steps"):
        parse_job("sweep: {steps: 3}")


def test_spec_package_imports_one_way():
    """task imports no other spec module; fields only task; files, family and animation task and
    fields; job all of them (tests/test_layout.py checks privates, cycles and sizes for the whole package)."""
    import farm.spec

    allowed = {
        "task": set(),
        "fields": {"task"},
        "animation": {"task", "fields"},
        "files": {"task", "fields"},
        "family": {"task", "fields"},
        "job": {"task", "fields", "animation", "files", "family"},
        "__init__": {"task", "fields", "animation", "job"},
    }
    folder = Path(farm.spec.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} == set(allowed)
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("farm.spec"):
                assert node.module.removeprefix("farm.spec.") in allowed[path.stem], f"{path.name}: {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("farm.spec") for a in node.names), path.name
