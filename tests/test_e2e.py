"""End to end through Ray on the tiny model: images, manifest rows, determinism, resume, query."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main
from farm.driver import RenderOptions, run_job
from farm.images import read_png_metadata, sha256_bytes
from farm.manifest import query, read_manifest
from farm.spec import load_job

pytestmark = pytest.mark.slow


def shas(job_root: str) -> dict[str, str]:
    table = read_manifest(job_root, ["task_id", "image_sha256", "status"]).to_pylist()
    return {r["task_id"]: r["image_sha256"] for r in table if r["status"] == "ok"}


@pytest.fixture(scope="module")
def two_actor_run(ray_session, tmp_path_factory, small_job_module):
    out = tmp_path_factory.mktemp("two")
    summary = run_job(load_job(small_job_module), RenderOptions(out=str(out), actors=2, batch_size=4, progress=False))
    return summary, out / "small"


@pytest.fixture(scope="module")
def small_job_module(tmp_path_factory) -> Path:
    from conftest import SMALL_JOB

    path = tmp_path_factory.mktemp("job") / "small.yaml"
    path.write_text(SMALL_JOB.format(name="small"))
    return path


def test_grid_renders_one_png_and_one_ok_row_per_task(two_actor_run, small_job_module):
    summary, root = two_actor_run
    spec = load_job(small_job_module)
    tasks = {t.task_id: t for t in spec.tasks()}
    rows = read_manifest(str(root)).to_pylist()
    pngs = sorted((root / "images").glob("*.png"))
    assert summary.total == summary.rendered == len(tasks) == 12
    assert summary.failed == 0 and summary.actors == 2
    assert len(pngs) == len(rows) == len(tasks)
    assert {r["task_id"] for r in rows} == set(tasks)
    assert all(r["status"] == "ok" for r in rows)
    assert len({r["actor"] for r in rows}) == 2  # both actors rendered
    assert (root / "job.yaml").read_text() == small_job_module.read_text()
    stored = json.loads((root / "summary.json").read_text())
    assert stored["rendered"] == 12
    # where the start-up went: Ray, then the actors; the first image comes after both
    assert 0 <= stored["ray_start_s"] <= stored["startup_s"] < stored["first_image_s"] <= stored["elapsed_s"]


def test_each_png_carries_its_task_and_matches_its_row(two_actor_run):
    _, root = two_actor_run
    for row in read_manifest(str(root)).to_pylist():
        data = (root / row["image_path"]).read_bytes()
        assert sha256_bytes(data) == row["image_sha256"]
        meta = read_png_metadata(data)
        assert meta["task"] == json.loads(row["task_json"])
        assert meta["task_id"] == row["task_id"] == Path(row["image_path"]).stem
        assert (meta["batch_id"], meta["batch_size"], meta["batch_index"]) == (
            row["batch_id"],
            row["batch_size"],
            row["batch_index"],
        )
        # the row alone is a recipe: every task field is a column
        for field, value in meta["task"].items():
            assert row[field] == value, field
        assert row["model_hash"] and row["torch_version"] and row["diffusers_version"]


def test_batches_are_recorded_and_cut_by_size(two_actor_run):
    _, root = two_actor_run
    result = query(str(root), "SELECT batch_id, count(*) n, max(batch_size) s FROM manifest GROUP BY batch_id")
    sizes = sorted(r["n"] for r in result.to_pylist())
    assert sizes == [2, 2, 4, 4]  # 6 tasks per guidance value, cut into 4 + 2
    assert all(r["n"] == r["s"] for r in result.to_pylist())


def test_one_and_two_actors_give_identical_bytes(two_actor_run, small_job_module, tmp_path):
    _, root = two_actor_run
    run_job(load_job(small_job_module), RenderOptions(out=str(tmp_path), actors=1, batch_size=4, progress=False))
    one = shas(str(tmp_path / "small"))
    assert one == shas(str(root))
    assert len(set(one.values())) == len(one)  # and the images really differ from each other


def test_second_run_skips_every_task(two_actor_run, small_job_module):
    summary, root = two_actor_run
    again = run_job(
        load_job(small_job_module), RenderOptions(out=str(root.parent), actors=2, batch_size=4, progress=False)
    )
    assert (again.rendered, again.skipped, again.failed) == (0, 12, 0)
    assert len(read_manifest(str(root))) == 12


def test_resume_renders_only_missing_batches(two_actor_run, small_job_module, tmp_path):
    _, root = two_actor_run
    import shutil

    copy = tmp_path / "small"
    shutil.copytree(root, copy)
    parts = sorted((copy / "manifest").glob("part-*.parquet"))
    rows = read_manifest(str(copy)).to_pylist()
    # keep only the rows of one batch: simulate a crash after its rows landed
    keep = rows[0]["batch_id"]
    for part in parts:
        part.unlink()
    from farm.manifest import write_part

    write_part(str(copy), [r for r in rows if r["batch_id"] == keep])
    summary = run_job(load_job(small_job_module), RenderOptions(out=str(tmp_path), actors=2, batch_size=4))
    kept = sum(r["batch_id"] == keep for r in rows)
    assert summary.skipped == kept and summary.rendered == 12 - kept
    assert shas(str(copy)) == shas(str(root))


def test_query_cli_formats(two_actor_run):
    _, root = two_actor_run
    sql = "SELECT guidance, count(*) AS n FROM manifest GROUP BY guidance ORDER BY guidance"
    table = CliRunner().invoke(main, ["query", str(root), sql])
    assert table.exit_code == 0
    assert table.output.splitlines()[2].split() == ["5", "6"]
    csv = CliRunner().invoke(main, ["query", str(root), sql, "--format", "csv"])
    assert csv.output.splitlines() == ['"guidance","n"', "5,6", "7.5,6"]
    js = CliRunner().invoke(main, ["query", str(root), sql, "--format", "json"])
    assert [json.loads(line) for line in js.output.splitlines()] == [
        {"guidance": 5.0, "n": 6},
        {"guidance": 7.5, "n": 6},
    ]
    bad = CliRunner().invoke(main, ["query", str(root), "SELECT nope FROM manifest"])
    assert bad.exit_code == 2 and bad.output.startswith("error: SQL")


def test_a_model_that_fails_to_load_in_the_actor_is_one_clear_error(ray_session, tmp_path):
    # A model folder that resolves on the driver but whose UNet weights are corrupt: every
    # load fails inside the actor, which the driver reports as a clear one-line error.
    import shutil

    from farm.presets import ensure_tiny

    broken = tmp_path / "broken"
    shutil.copytree(ensure_tiny(), broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    job = tmp_path / "broken.yaml"
    job.write_text(f"model: {broken}\ndefaults: {{prompt: a cat, width: 64, height: 64, steps: 2}}\n")
    result = CliRunner().invoke(main, ["render", str(job), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "could not load" in result.output and "Traceback" not in result.output


def test_output_to_a_filesystem_uri(ray_session, small_job_module, tmp_path, two_actor_run):
    """Actors write through pyarrow.fs, so any URI it knows (file://, s3://, gs://) works as --out."""
    _, local_root = two_actor_run
    summary = run_job(
        load_job(small_job_module), RenderOptions(out=f"file://{tmp_path}", actors=2, batch_size=4, progress=False)
    )
    assert summary.job_root == f"file://{tmp_path}/small"
    assert len(list((tmp_path / "small" / "images").glob("*.png"))) == 12
    assert shas(summary.job_root) == shas(str(local_root))
    result = CliRunner().invoke(main, ["query", summary.job_root, "SELECT count(*) AS n FROM manifest"])
    assert result.exit_code == 0 and result.output.splitlines()[2].strip() == "12"
