"""The example jobs in jobs/: each parses, and the docs page of its technique shows it as it is on disk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
# Each job, the docs page and the section (its technique's) that shows it. demo is shown in README.md
# and docs/job-specs.md with comments of their own, and shiba needs a real checkpoint.
DOCUMENTED_JOBS = {
    "variations": ("steering.md", "Variations and perturbations"),
    "perturb": ("steering.md", "Variations and perturbations"),
    "img2img": ("steering.md", "img2img"),
    "mix": ("steering.md", "Prompt mixing"),
    "embeddings": ("steering.md", "Textual inversion"),
    "blue": ("steering.md", "Guidance losses"),
    "trajectory": ("steering.md", "Step capture"),
    "animate": ("animation.md", "Animate"),
    "walk": ("animation.md", "Walk"),
    "animate-flow": ("animation.md", "Optical flow"),
    "zoom": ("animation.md", "2D motion"),
    "controlnet": ("animation.md", "ControlNet"),
    "sdxl": ("models.md", "SDXL"),
    "lora": ("models.md", "LoRA"),
}
UNDOCUMENTED_JOBS = {"demo", "shiba"}


def body(path: Path) -> str:
    """The job without its leading comment block (the docs page explains it in prose)."""
    lines = path.read_text().splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip()


@pytest.mark.parametrize("job", [p for p in JOBS if p.stem != "shiba"], ids=lambda p: p.stem)
def test_example_job_dry_runs(job: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["render", str(job), "--dry-run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{job.stem}: ")


def section(page: str, heading: str) -> str:
    """The text of one `## heading` section of a docs page, up to the next heading of its level or above."""
    text = (ROOT / "docs" / page).read_text()
    match = re.search(rf"^## {re.escape(heading)}\n.*?(?=^##? |\Z)", text, re.M | re.S)
    assert match, f"docs/{page} has no '## {heading}' section"
    return match.group(0)


def test_every_job_has_its_place():
    assert {p.stem for p in JOBS} == set(DOCUMENTED_JOBS) | UNDOCUMENTED_JOBS


@pytest.mark.parametrize("name, place", DOCUMENTED_JOBS.items(), ids=list(DOCUMENTED_JOBS))
def test_docs_show_the_job_as_it_is(name: str, place: tuple[str, str]):
    assert body(ROOT / "jobs" / f"{name}.yaml") in section(*place)


@pytest.mark.parametrize("page", ["README.md", "docs/job-specs.md"])
def test_the_demo_job_shown_is_the_one_on_disk(page: str):
    """README.md and docs/job-specs.md show jobs/demo.yaml with comments of their own: the same YAML data."""
    import yaml

    shown = re.search(r"^```yaml\n(name: demo\b.*?)^```", (ROOT / page).read_text(), re.M | re.S)
    assert shown, f"{page} shows no demo job"
    assert yaml.safe_load(shown.group(1)) == yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
