"""The example jobs in jobs/: each parses, and the README shows each one as it is on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
# Shown in the README section of their technique (or Animation); demo and shiba have sections of their own.
STEERING_JOBS = ("variations", "perturb", "img2img", "mix", "embeddings", "blue", "trajectory", "animate", "walk")


def body(path: Path) -> str:
    """The job without its leading comment block (the README explains it in prose)."""
    lines = path.read_text().splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip()


@pytest.mark.parametrize("job", [p for p in JOBS if p.stem != "shiba"], ids=lambda p: p.stem)
def test_example_job_dry_runs(job: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["render", str(job), "--dry-run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{job.stem}: ")


@pytest.mark.parametrize("name", STEERING_JOBS)
def test_readme_shows_the_job_as_it_is(name: str):
    assert body(ROOT / "jobs" / f"{name}.yaml") in (ROOT / "README.md").read_text()
