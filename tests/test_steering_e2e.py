"""Every steering technique through Ray, and each image reproduced from its manifest row alone."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from farm.actor import BatchRenderer
from farm.cli import main
from farm.images import read_png_metadata
from farm.manifest import ok_task_ids, query, read_manifest
from farm.spec import Batch, RenderTask

pytestmark = pytest.mark.slow

# One task per technique (zipped, so each row of the zip is one task); the eighth one's init
# image is corrupt, so it must fail alone while the rest render.
STEER_JOB = """
name: steer
model: tiny
scheduler: euler
defaults:
  negative_prompt: blurry
  steps: 4
  width: 64
  height: 64
  embeddings: [style.safetensors]
zip:
  seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
  prompt: [a cute dog, a cute dog, a cute dog, '', a puppy, <tiny-style> dog, a cute dog, a cute dog, a dog, '', LONG]
  variation_seed: [null, 9, null, null, null, null, null, null, 9, null, null]
  variation_strength: [0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  perturb_scale: [0, 0, 0, 0, 0, 0, 0, 0, 0.2, 0, 0]
  init_image: [null, null, init.png, null, null, null, null, bad.png, null, null, null]
  strength: [null, null, 0.5, null, null, null, null, 0.5, null, null, null]
  mix: [null, null, null, &mix [{prompt: a dog, weight: 0.6}, {prompt: a skunk, weight: 0.4}], null, null, null, null,
        null, *mix, null]
  mix_mode: [sum, sum, sum, sum, sum, sum, sum, sum, sum, slerp, sum]
  token_mix: [null, null, null, null, {token: puppy, with: skunk}, null, null, null, null, null, null]
  guidance_loss: [null, null, null, null, null, null, {name: color, target: [null, null, 0.9], every: 1}, null,
                  null, null, null]
  capture: [null, null, null, null, null, null, [latents, x0], null, null, null, null]
  long_prompt: [truncate, truncate, truncate, truncate, truncate, truncate, truncate, truncate, truncate, truncate,
                chunk]
""".replace("LONG", " ".join(["a cute dog with a puppy and a skunk"] * 12))


def write_inputs(folder: Path, vector_size: int = 32) -> None:
    pixels = np.zeros((48, 80, 3), np.uint8)
    pixels[..., 1] = 200
    pixels[10:30, 20:50] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (folder / "init.png").write_bytes(buffer.getvalue())
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    vector = torch.randn(vector_size, generator=torch.Generator().manual_seed(0))
    save_file({"<tiny-style>": vector}, str(folder / "style.safetensors"))


@pytest.fixture(scope="module")
def steer_run(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("steer")
    write_inputs(folder)
    (folder / "steer.yaml").write_text(STEER_JOB)
    out = folder / "out"
    args = ["render", str(folder / "steer.yaml"), "--out", str(out), "--actors", "2", "--batch-size", "2"]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    return result, out / "steer"


def test_every_technique_renders_and_only_the_bad_input_fails(steer_run):
    result, root = steer_run
    assert result.exit_code == 1, result.output  # ran, but one task failed
    assert "rendered 10, skipped 0, failed 1 of 11" in result.output
    rows = query(str(root), "SELECT seed, status, error FROM manifest WHERE capture IS NULL ORDER BY seed")
    statuses = [(r["seed"], r["status"]) for r in rows.to_pylist()]
    assert statuses == [(s, "ok") for s in range(1, 8)] + [(8, "failed")] + [(s, "ok") for s in (9, 10, 11)]
    error = rows.to_pylist()[7]["error"]
    assert error.startswith("init_image: ") and "bad.png: not a readable image" in error


def test_rows_record_each_technique(steer_run):
    _, root = steer_run
    rows = {r["seed"]: r for r in read_manifest(str(root)).to_pylist() if r["capture"] is None}
    assert rows[2]["variation_seed"] == 9 and rows[2]["variation_strength"] == 0.5
    assert rows[3]["init_image"].endswith("init.png") and len(rows[3]["init_image_sha256"]) == 64
    assert (rows[3]["strength"], rows[3]["start_step"]) == (0.5, 2)
    assert '"a skunk"' in rows[4]["mix"] and rows[4]["mix_mode"] == "sum"
    assert '"skunk"' in rows[5]["token_mix"]
    assert "style.safetensors" in rows[6]["embeddings"] and '"sha256"' in rows[6]["embeddings"]
    assert '"color"' in rows[7]["guidance_loss"] and rows[7]["captures"] == "latents,x0"
    assert rows[1]["prompt_tokens"] == 3 and rows[1]["prompt_truncated"] is False
    assert rows[9]["perturb_scale"] == 0.2 and rows[10]["mix_mode"] == "slerp"
    assert rows[11]["long_prompt"] == "chunk" and rows[11]["prompt_tokens"] > 75 and not rows[11]["prompt_truncated"]


def test_captured_frames_are_rows_and_files(steer_run):
    _, root = steer_run
    frames = query(
        str(root), "SELECT capture, step_index, image_path, image_sha256 FROM manifest WHERE capture IS NOT NULL"
    ).to_pylist()
    kinds = sorted((f["capture"], f["step_index"]) for f in frames)
    assert kinds == [("latents", i) for i in range(5)] + [("x0", i) for i in range(4)]
    for frame in frames:
        data = (root / frame["image_path"]).read_bytes()
        meta = read_png_metadata(data)
        assert (meta["capture"], meta["step_index"]) == (frame["capture"], frame["step_index"])
    # a frame row is not the task's image: the task counts once, as done
    assert len(ok_task_ids(str(root))) == 10


def test_each_image_reproduces_from_its_manifest_rows(steer_run, tmp_path):
    """Re-render every recorded batch from nothing but its rows' task_json, in a fresh folder."""
    _, root = steer_run
    rows = [r for r in read_manifest(str(root)).to_pylist() if r["status"] == "ok"]
    batches: dict[str, list[dict]] = {}
    for row in rows:
        if row["capture"] is None:
            batches.setdefault(row["batch_id"], []).append(row)
    threads = torch.get_num_threads()
    try:
        renderer = BatchRenderer("again", str(tmp_path), "tiny", threads=1)  # what a CPU actor uses
        again = {}
        for batch_id, members in batches.items():
            members.sort(key=lambda r: r["batch_index"])
            tasks = tuple(RenderTask.from_json(r["task_json"]) for r in members)
            assert [t.task_id for t in tasks] == [r["task_id"] for r in members]
            for new in renderer.render(Batch(batch_id, tasks)):
                again[(new["task_id"], new.get("capture"), new.get("step_index"))] = new["image_sha256"]
    finally:
        torch.set_num_threads(threads)
    recorded = {(r["task_id"], r["capture"], r["step_index"]): r["image_sha256"] for r in rows}
    assert again == recorded


def test_an_embedding_of_the_wrong_size_exits_2_naming_the_field(ray_session, tmp_path):
    write_inputs(tmp_path, vector_size=768)
    (tmp_path / "job.yaml").write_text(
        "name: wrong\nmodel: tiny\ndefaults: {prompt: <tiny-style>, steps: 2, width: 64, height: 64, "
        "embeddings: [style.safetensors]}\n"
    )
    result = CliRunner().invoke(main, ["render", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "error: embeddings[0]: " in result.output
    assert "holds vectors of size 768; this model's text encoder needs 32" in result.output


def test_rerun_renders_only_the_failed_task_and_leaves_finished_images_alone(steer_run):
    """Runs last: the rerun adds rows. The bad task shared a batch with nothing else here, so
    the rerun also proves a partly failed batch is not re-rendered around its failure."""
    result, root = steer_run
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "images").glob("*.png")}
    args = ["render", str(root.parent.parent / "steer.yaml"), "--out", str(root.parent), "--no-progress"]
    again = CliRunner().invoke(main, [*args, "--actors", "2", "--batch-size", "2"])
    assert again.exit_code == 1, again.output
    assert "rendered 0, skipped 10, failed 1 of 11" in again.output
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "images").glob("*.png")}
    assert after == before


def test_a_batch_whose_task_failed_resumes_without_touching_the_others(tiny_path, tmp_path):
    """Three img2img tasks in one batch, the middle one's init image unreadable at render time."""
    write_inputs(tmp_path)
    from farm.spec import parse_job

    spec = parse_job(
        "name: part\nmodel: tiny\nscheduler: euler\n"
        "defaults: {prompt: a dog, steps: 2, width: 64, height: 64, init_image: init.png, strength: 0.5}\n"
        "sweep: {seed: [1, 2, 3]}",
        base_dir=tmp_path,
    )
    batch = Batch.of(spec.tasks())
    threads = torch.get_num_threads()
    try:
        renderer = BatchRenderer("part", str(tmp_path / "out"), "tiny", threads=1)
        good = (tmp_path / "init.png").read_bytes()
        (tmp_path / "init.png").write_bytes(b"gone")
        failing = renderer.render(Batch(batch.batch_id, batch.tasks[1:2]))
        assert failing[0]["status"] == "failed" and "changed since the job was read" in failing[0]["error"]
        (tmp_path / "init.png").write_bytes(good)
        first = renderer.render(batch, skip=frozenset({batch.tasks[1].task_id}))
        paths = {r["task_id"]: tmp_path / "out" / r["image_path"] for r in first}
        stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
        # the two rendered together record the batch they were rendered in: its own id and size
        assert [(r["batch_id"], r["batch_size"], r["batch_index"]) for r in first] == [
            (Batch.of([batch.tasks[0], batch.tasks[2]]).batch_id, 2, 0),
            (Batch.of([batch.tasks[0], batch.tasks[2]]).batch_id, 2, 1),
        ]
        resumed = renderer.render(batch, skip=frozenset(paths))
    finally:
        torch.set_num_threads(threads)
    assert [(r["task_id"], r["batch_size"]) for r in resumed] == [(batch.tasks[1].task_id, 1)]
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps
