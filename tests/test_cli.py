"""The click front: one error path (FarmError -> one line, exit 2), defaults shared with the driver,
and options that reach the function they name (no Ray here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm import layout
from farm.cli import main
from farm.driver import RenderOptions
from farm.errors import FarmError
from farm.manifest import ManifestError
from farm.spec import SpecError, load_job

RANDOM_JOB = """
name: seeds
model: tiny
scheduler: euler
defaults: {prompt: a cat, steps: 2, guidance: 7.5, width: 64, height: 64, seed: random}
sweep: {seed: {random: 4}}
"""


def shown_seeds(output: str) -> list[int]:
    return [int(s) for s in re.findall(r"seed=(\d+)", output)]


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_dry_run_draws_the_seeds_the_run_recorded(tmp_path: Path, uri: bool):
    """--dry-run reads run.json through the output's own file system, so a URI root (s3://, file://)
    shows the seeds the run will draw, as a local path always did."""
    job = tmp_path / "seeds.yaml"
    job.write_text(RANDOM_JOB)
    out = tmp_path / "out"
    root = layout.job_root(str(out), "seeds")
    layout.write_json(root, layout.RUN_FILE, {"random_base": 1234})
    expected = [t.seed for t in load_job(job).tasks(1234)]
    target = out.as_uri() if uri else str(out)
    assert target.startswith("file://") == uri
    result = CliRunner().invoke(main, ["render", str(job), "--dry-run", "--out", target])
    assert result.exit_code == 0, result.output
    assert shown_seeds(result.output) == expected


def test_render_help_shows_the_drivers_defaults():
    defaults = RenderOptions()
    shown = " ".join(CliRunner().invoke(main, ["render", "--help"]).output.split())
    assert f"Tasks per UNet batch. [default: {defaults.batch_size};" in shown
    assert f"this much work. [default: {defaults.flush_seconds};" in shown


@pytest.mark.parametrize("error", [SpecError, ManifestError, FarmError])
def test_every_farm_error_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, error: type[FarmError]):
    import farm.manifest

    def broken(*args, **kwargs):
        raise error("somewhere: what went wrong")

    monkeypatch.setattr(farm.manifest, "runs", broken)
    result = CliRunner().invoke(main, ["runs", "anywhere"])
    assert result.exit_code == 2
    assert result.output == "error: somewhere: what went wrong\n"


def test_an_io_error_names_the_place(tmp_path: Path):
    (tmp_path / "file").write_text("not a folder")
    result = CliRunner().invoke(main, ["query", str(tmp_path / "file" / "job"), "SELECT 1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'file' / 'job'}"), result.output


def test_model_config_goes_with_a_png_not_a_job_folder(tmp_path: Path):
    result = CliRunner().invoke(main, ["reproduce", str(tmp_path), "0" * 20, "--model-config", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: --model-config goes with a PNG"), result.output


def test_every_command_has_help():
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help and "Usage:" in result.output, name
