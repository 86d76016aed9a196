"""``farm reproduce``: render a recorded image again and compare (no Ray: the job is built with
``BatchRenderer`` and ``manifest.write_part``, as the driver would)."""

from __future__ import annotations

import io
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farm import manifest
from farm.actor import BatchRenderer
from farm.images import encode_png, read_png_metadata, sha256_bytes
from farm.layout import MANIFEST_DIR
from farm.reproduce import Comparison, ReproduceError, reproduce_image, reproduce_task
from farm.spec import Batch, parse_job

# Four tasks: a batch of three (the second with a variation seed) and a prompt mix alone that
# also captures its latents at every step.
JOB = """
name: repro
model: tiny
scheduler: euler
defaults: {negative_prompt: blurry, steps: 3, width: 64, height: 64}
zip:
  seed: [1, 2, 3, 4]
  prompt: [a cute dog, a cute dog, a red car, '']
  variation_seed: [null, 9, null, null]
  variation_strength: [0, 0.5, 0, 0]
  mix: [null, null, null, [{prompt: a dog, weight: 0.6}, {prompt: a skunk, weight: 0.4}]]
  capture: [null, null, null, [latents]]
"""


@pytest.fixture(scope="module")
def job(tiny_path, tmp_path_factory) -> tuple[Path, list]:
    """The job folder (images + manifest) and its tasks; plus a task that failed (missing init image)."""
    folder = tmp_path_factory.mktemp("reproduce")
    tasks = list(parse_job(JOB).tasks())
    bad = parse_job(
        "name: repro\nmodel: tiny\ndefaults: {prompt: a dog, steps: 3, width: 64, height: 64, "
        "init_image: init.png, strength: 0.5}",
        base_dir=_with_init(folder),
    )
    bad_task = next(bad.tasks())
    (folder / "init.png").unlink()  # gone by render time: the task fails
    root = folder / "out" / "repro"
    threads = torch.get_num_threads()
    try:
        renderer = BatchRenderer("repro", str(root), "tiny", threads=1)
        for batch in (Batch.of(tasks[:3]), Batch.of(tasks[3:]), Batch.of([bad_task])):
            manifest.write_part(str(root), renderer.render(batch))
    finally:
        torch.set_num_threads(threads)
    return root, [*tasks, bad_task]


def _with_init(folder: Path) -> Path:
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "init.png")
    return folder


def _copy(job, tmp_path: Path) -> Path:
    root, _ = job
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _image(root: Path, task) -> Path:
    return root / "images" / f"{task.task_id}.png"


def test_the_job_is_laid_out_as_the_tests_assume(job):
    root, tasks = job
    rows = {r["task_id"]: r for r in manifest.read_manifest(str(root)).to_pylist()}
    assert [rows[t.task_id]["batch_size"] for t in tasks] == [3, 3, 3, 1, 1]
    assert [rows[t.task_id]["status"] for t in tasks] == ["ok", "ok", "ok", "ok", "failed"]
    assert tasks[1].variation_seed == 9 and tasks[3].mix


def test_an_untouched_image_is_identical(job, tmp_path):
    root, tasks = job
    result = reproduce_task(str(root), tasks[0].task_id, str(tmp_path / "diff"))
    assert isinstance(result, Comparison)
    assert result.identical
    assert result.new_sha256 == result.recorded_sha256 == sha256_bytes(_image(root, tasks[0]).read_bytes())
    assert (result.max_difference, result.mean_difference, result.diff_path) == (0, 0.0, None)
    assert result.warnings == ()
    assert not (tmp_path / "diff").exists()
    assert "identical" in result.summary()


def test_a_task_is_rendered_in_its_recorded_batch(job, tmp_path):
    """The last of a batch of three: rendered again with its two batch mates, identical bytes."""
    root, tasks = job
    result = reproduce_task(str(root), tasks[2].task_id, str(tmp_path))
    assert (result.batch_size, result.recorded_batch_size, result.rendered_alone) == (3, 3, False)
    assert result.identical, result


@pytest.mark.parametrize("index", [1, 3], ids=["variation_seed", "prompt_mix"])
def test_a_technique_task_reproduces_identically(job, tmp_path, index):
    root, tasks = job
    result = reproduce_task(str(root), tasks[index].task_id, str(tmp_path))
    assert result.identical, result
    assert result.batch_size == (3 if index == 1 else 1)


def test_an_altered_image_reports_the_change_and_writes_a_diff_image(job, tmp_path):
    root = _copy(job, tmp_path)
    task = job[1][0]
    path = _image(root, task)
    data = path.read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    y, x, c = 5, 7, 1
    pixels[y, x, c] = pixels[y, x, c] + 40 if pixels[y, x, c] < 200 else pixels[y, x, c] - 40
    path.write_bytes(encode_png(pixels, read_png_metadata(data)))  # same metadata, one channel moved by 40

    result = reproduce_task(str(root), task.task_id, str(tmp_path / "diff"))
    assert not result.identical
    assert result.max_difference == 40
    assert result.mean_difference == pytest.approx(40 / (64 * 64 * 3))
    assert result.new_sha256 == result.recorded_sha256 != result.file_sha256
    assert any("changed since it was recorded" in w for w in result.warnings)
    assert result.diff_path == str(tmp_path / "diff" / f"{task.task_id}.diff.png")
    diff = np.asarray(Image.open(result.diff_path))
    # stretched so the largest difference is white: 255 at the changed channel, 0 elsewhere
    assert diff[y, x, c] == 255 and int(diff.sum()) == 255
    assert sha256_bytes(Path(result.reproduced_path).read_bytes()) == result.recorded_sha256
    assert "max pixel difference 40/255" in result.summary()


def test_other_bytes_with_the_same_pixels_differ_with_a_pixel_difference_of_0(job, tmp_path):
    root = _copy(job, tmp_path)
    task = job[1][0]
    path = _image(root, task)
    image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)  # same pixels, no metadata, other bytes
    path.write_bytes(buffer.getvalue())
    result = reproduce_task(str(root), task.task_id, str(tmp_path / "diff"))
    assert not result.identical
    assert (result.max_difference, result.diff_path) == (0, None)
    assert "pixels equal" in result.summary()


@pytest.mark.parametrize("index", [0, 1, 2])
def test_from_the_png_alone_an_image_of_a_batch_is_rendered_alone_within_the_tolerance(job, tmp_path, index):
    root, tasks = job
    result = reproduce_image(str(_image(root, tasks[index])), str(tmp_path))
    assert (result.rendered_alone, result.batch_size, result.recorded_batch_size) == (True, 1, 3)
    assert result.task_id == tasks[index].task_id
    assert result.max_difference <= 2  # docs/reproducibility.md: measured at most 1
    # the new pixels are encoded with the recorded placement, so equal pixels give equal bytes
    assert result.identical == (result.max_difference == 0)
    assert (result.diff_path is None) == result.identical


def test_from_the_png_alone_an_image_recorded_alone_is_identical(job, tmp_path):
    root, tasks = job
    result = reproduce_image(str(_image(root, tasks[3])), str(tmp_path))
    assert (result.rendered_alone, result.batch_size, result.recorded_batch_size) == (True, 1, 1)
    assert result.identical, result
    assert result.new_sha256 == sha256_bytes(_image(root, tasks[3]).read_bytes())


def test_from_the_png_alone_a_captured_frame_is_compared_with_the_same_frame(job, tmp_path):
    root, tasks = job
    frame = root / "frames" / tasks[3].task_id / "latents-0002.png"
    result = reproduce_image(str(frame), str(tmp_path))
    assert result.identical, result
    assert result.new_sha256 == sha256_bytes(frame.read_bytes())
    assert result.new_sha256 != sha256_bytes(_image(root, tasks[3]).read_bytes())


def test_from_the_png_alone_an_altered_image_differs(job, tmp_path):
    root, tasks = job
    data = _image(root, tasks[3]).read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    changed = tmp_path / "changed.png"
    changed.write_bytes(encode_png(pixels, read_png_metadata(data)))
    result = reproduce_image(str(changed), str(tmp_path / "diff"))
    assert not result.identical
    expected = int(np.abs(255 - 2 * np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0].astype(int)).max())
    assert result.max_difference == expected > 0
    assert Path(result.diff_path).is_file()


def test_a_changed_model_hash_is_warned_about(job, tmp_path):
    root = _copy(job, tmp_path)
    rows = manifest.read_manifest(str(root)).to_pylist()
    shutil.rmtree(root / MANIFEST_DIR)
    manifest.write_part(str(root), [r | {"model_hash": "0" * 64} for r in rows])
    result = reproduce_task(str(root), job[1][3].task_id, str(tmp_path / "diff"))
    assert any("is not the model that rendered the image" in w for w in result.warnings), result.warnings


def test_an_unknown_task_id_is_a_clear_error(job, tmp_path):
    root, _ = job
    with pytest.raises(ReproduceError, match="task 'nope' is not in the manifest of "):
        reproduce_task(str(root), "nope", str(tmp_path))


def test_a_failed_task_is_a_clear_error(job, tmp_path):
    root, tasks = job
    with pytest.raises(ReproduceError, match=r"has no image to compare \(its row is failed: init_image: "):
        reproduce_task(str(root), tasks[4].task_id, str(tmp_path))


def test_the_latest_row_of_a_task_is_the_one_compared(job, tmp_path):
    """A later row supersedes the task's ok row (manifest.LATEST): a later failed row (its image
    found altered) leaves nothing to compare; a later ok row is the record compared with."""
    root = _copy(job, tmp_path)
    _, tasks = job
    rows = manifest.read_manifest(str(root)).to_pylist()
    (row,) = [r for r in rows if r["task_id"] == tasks[0].task_id and not r["capture"]]
    later = row["created_at"] + timedelta(seconds=1)
    manifest.write_part(str(root), [row | {"image_sha256": "ab" * 32, "created_at": later}])
    result = reproduce_task(str(root), tasks[0].task_id, str(tmp_path / "diff"))
    assert result.recorded_sha256 == "ab" * 32 and not result.identical
    failed = row | {"status": "failed", "error": "image altered", "image_sha256": None}
    manifest.write_part(str(root), [failed | {"created_at": later + timedelta(seconds=1)}])
    with pytest.raises(ReproduceError, match=r"has no image to compare \(its row is failed: image altered\)"):
        reproduce_task(str(root), tasks[0].task_id, str(tmp_path / "diff"))


def test_a_mate_rendered_again_later_still_reproduces_in_the_recorded_batch(job, tmp_path):
    """A batch mate re-rendered alone later (a resume after its image went missing) has a newer
    row in another batch; the task's own recorded batch of three is still what renders it again."""
    root = _copy(job, tmp_path)
    _, tasks = job
    threads = torch.get_num_threads()
    try:
        renderer = BatchRenderer("repro", str(root), "tiny", threads=1)
        manifest.write_part(str(root), renderer.render(Batch.of([tasks[1]])))
    finally:
        torch.set_num_threads(threads)
    latest = {r["task_id"]: r for r in manifest.read_manifest(str(root)).to_pylist() if not r["capture"]}
    assert latest[tasks[1].task_id]["batch_size"] == 1  # the mate's latest row is in a batch of its own
    result = reproduce_task(str(root), tasks[2].task_id, str(tmp_path / "diff"))
    assert (result.batch_size, result.recorded_batch_size, result.warnings) == (3, 3, ())
    assert result.identical, result


def test_a_task_id_is_quoted_in_sql(job, tmp_path):
    root, _ = job
    with pytest.raises(ReproduceError, match="is not in the manifest"):
        reproduce_task(str(root), "x' OR '1'='1", str(tmp_path / "diff"))


def test_a_folder_without_a_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ReproduceError, match="no manifest here"):
        reproduce_task(str(tmp_path), "abc", str(tmp_path / "diff"))


def test_a_png_without_farm_metadata_is_a_clear_error(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ReproduceError, match="PNG has no farm metadata chunk"):
        reproduce_image(str(plain), str(tmp_path))


def test_a_file_that_is_no_png_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(ReproduceError, match="not a readable PNG"):
        reproduce_image(str(junk), str(tmp_path))


def test_the_command_exits_0_when_identical_1_when_altered_2_for_bad_input(job, tmp_path):
    from click.testing import CliRunner

    from farm.cli import main

    root, tasks = job
    runner = CliRunner()
    same = runner.invoke(main, ["reproduce", str(root), tasks[0].task_id, "--diff-dir", str(tmp_path)])
    assert same.exit_code == 0 and f"{tasks[0].task_id}: identical" in same.output, same.output
    copy = _copy(job, tmp_path)
    image = _image(copy, tasks[0])
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0, 0] = (int(pixels[0, 0, 0]) + 40) % 256
    Image.fromarray(pixels).save(image)
    altered = runner.invoke(main, ["reproduce", str(copy), tasks[0].task_id, "--diff-dir", str(tmp_path)])
    assert altered.exit_code == 1 and "max pixel difference 40/255" in altered.output, altered.output
    within = ["reproduce", str(copy), tasks[0].task_id, "--diff-dir", str(tmp_path), "--tolerance", "40"]
    assert runner.invoke(main, within).exit_code == 0
    missing = runner.invoke(main, ["reproduce", str(root)])
    assert missing.exit_code == 2 and missing.output.startswith("error: ") and "give a TASK_ID" in missing.output
