"""Shared fixtures: one farm cache, the tiny models (SD 1.x and SDXL) and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMALL_JOB = """
name: {name}
model: tiny
scheduler: euler
defaults:
  negative_prompt: blurry
  steps: 4
  width: 64
  height: 64
sweep:
  guidance: [5, 7.5]
  prompt: [a cute shiba inu, an alien riding a giant flying beetle in space]
  seed: [1, 2, 3]
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (and so report) gpu-marked tests where CUDA is missing."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def farm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh farm cache for the session, also seen by Ray workers and subprocesses."""
    home = tmp_path_factory.mktemp("farm_home")
    previous = os.environ.get("FARM_HOME")
    os.environ["FARM_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("FARM_HOME", None)
    else:
        os.environ["FARM_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_path(farm_home: Path) -> Path:
    from farm.presets import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_components(tiny_path: Path):
    from farm.models import load_components, resolve_model

    return load_components(resolve_model("tiny"), "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_xl_path(farm_home: Path) -> Path:
    from farm.presets import ensure_preset

    return ensure_preset("tiny-xl")


@pytest.fixture(scope="session")
def tiny_xl_components(tiny_xl_path: Path):
    from farm.models import load_components, resolve_model

    return load_components(resolve_model("tiny-xl"), "cpu", "float32")


@pytest.fixture(scope="session")
def ray_session(tiny_path: Path):
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    # address="local": a new Ray even if another is running here (never join a stray one)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def small_job(tmp_path: Path) -> Path:
    """A 12-task grid (2 guidance x 2 prompts x 3 seeds) at 64x64, 4 steps."""
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_JOB.format(name="small"))
    return path


def assert_dry_run_fails(job: Path, message: str) -> None:
    """``farm render JOB --dry-run`` exits 2 with one line starting with ``error: <message>``."""
    from click.testing import CliRunner

    from farm.cli import main

    result = CliRunner().invoke(main, ["render", str(job), "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
