"""Several rows of one task image (a double submit, a retry, a rerun of a deleted image): every
reader sees the latest, and `farm compact` drops the rest. Hand-made jobs, no Ray, no torch."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from farm import manifest
from farm.cli import main
from farm.images import encode_png, sha256_bytes
from farm.manifest import base_row, compact, ok_task_ids, query, read_manifest, runs, write_part
from farm.report import write_report
from farm.sheets import contact_sheet, xy_plot
from farm.spec import Batch, RenderTask

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
SEEDS = [1, 2, 3, 4]
SIZE = 64


def tasks() -> list[RenderTask]:
    return [RenderTask("tiny", "euler", "a cat", "", s, 2, 7.5, SIZE, SIZE) for s in SEEDS]


def rows_of(job: str, minute: int, shade: int, status: str = "ok", frames: bool = False) -> list[dict]:
    """One batch of every task, made at T0 + minute; each image a solid ``shade``, written to its
    file (so the latest write is the file on disk), its sha256 in the row."""
    batch = Batch.of(tasks())
    rows = []
    for index, task in enumerate(batch.tasks):
        row = base_row("dups", task, batch, index)
        row.update(status=status, created_at=T0 + timedelta(minutes=minute), seconds=0.5)
        if status == "ok":
            pixels = np.full((SIZE, SIZE, 3), shade + task.seed, np.uint8)
            data = encode_png(pixels, {"task": json.loads(task.canonical_json()), "task_id": task.task_id})
            path = Path(job) / row["image_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            row["image_sha256"] = sha256_bytes(data)
        else:
            row["error"] = "boom"
        rows.append(row)
        if frames:
            rows += [row | {"capture": "x0", "step_index": i, "image_path": f"frames/{i}.png"} for i in range(2)]
    return rows


@pytest.fixture
def job(tmp_path: Path) -> tuple[str, list[dict], list[dict]]:
    """A job whose four tasks each have two ok rows: a double submit, written a minute apart
    (the second render rewrote the files, so the second rows match them)."""
    root = str(tmp_path / "out" / "dups")
    first = rows_of(root, minute=0, shade=10)
    write_part(root, first)
    second = rows_of(root, minute=1, shade=100)
    write_part(root, second)
    return root, first, second


def shas(rows: list[dict]) -> dict[str, str]:
    return {r["task_id"]: r["image_sha256"] for r in rows}


def test_query_sees_one_row_per_task_image_the_latest(job):
    root, first, second = job
    assert shas(first) != shas(second)
    assert query(root, "SELECT count(*) AS n FROM manifest").to_pylist() == [{"n": 4}]
    assert query(root, "SELECT count(*) AS n FROM manifest_all").to_pylist() == [{"n": 8}]
    assert shas(query(root, "SELECT task_id, image_sha256 FROM manifest").to_pylist()) == shas(second)
    assert shas(read_manifest(root).to_pylist()) == shas(second) and read_manifest(root).num_rows == 4
    assert read_manifest(root, ["task_id"]).column_names == ["task_id"]
    assert read_manifest(root, superseded=True).num_rows == 8
    assert ok_task_ids(root) == manifest.done_task_ids(root) == set(shas(second))
    (counts,) = runs(str(Path(root).parent)).to_pylist()
    assert (counts["ok"], counts["failed"], counts["images"]) == (4, 0, 4)


def test_the_cli_query_counts_each_task_once(job):
    root, _, _ = job
    result = CliRunner().invoke(main, ["query", root, "SELECT count(*) AS n FROM manifest", "--format", "csv"])
    assert result.exit_code == 0 and result.output.splitlines() == ['"n"', "4"]


def test_a_later_failed_row_hides_an_earlier_ok_row(job):
    root, _, second = job
    failed = [r | {"status": "failed", "error": "later", "created_at": T0 + timedelta(minutes=2)} for r in second[:1]]
    write_part(root, failed)
    assert ok_task_ids(root) == set(shas(second[1:]))
    statuses = query(root, "SELECT status, count(*) AS n FROM manifest GROUP BY status ORDER BY status").to_pylist()
    assert statuses == [{"status": "failed", "n": 1}, {"status": "ok", "n": 3}]
    # and an earlier failed row is superseded by a later ok one (a retry): the task is done
    write_part(root, [second[0] | {"created_at": T0 + timedelta(minutes=3)}])
    assert ok_task_ids(root) == set(shas(second))


def test_a_tie_in_created_at_goes_to_the_later_part_file_before_and_after_compaction(tmp_path: Path):
    root = str(tmp_path / "dups")
    write_part(root, rows_of(root, minute=0, shade=10))
    later = rows_of(root, minute=0, shade=100)  # the same created_at, written second
    write_part(root, later)
    sql = "SELECT task_id, image_sha256 FROM manifest"
    assert query(root, sql).num_rows == read_manifest(root).num_rows == 4
    assert shas(query(root, sql).to_pylist()) == shas(later) == shas(read_manifest(root).to_pylist())
    compact(root)
    assert shas(query(root, sql).to_pylist()) == shas(later)


def test_compact_drops_the_superseded_rows_and_says_how_many(job):
    root, _, second = job
    before = query(root, "SELECT * FROM manifest ORDER BY task_id").to_pylist()
    message = compact(root)
    assert "merged 2 part files (4 rows)" in message and "dropped 4 superseded rows" in message
    (part,) = (Path(root) / "manifest").iterdir()
    assert shas(pq.read_table(part).to_pylist()) == shas(second) and pq.read_metadata(part).num_rows == 4
    assert query(root, "SELECT * FROM manifest ORDER BY task_id").to_pylist() == before
    assert "already compacted" in compact(root)


def test_compact_dedupes_a_single_part_that_holds_duplicates(tmp_path: Path):
    """An old compaction merged duplicates into one file: compacting it again drops them."""
    root = str(tmp_path / "dups")
    write_part(root, rows_of(root, minute=0, shade=10) + rows_of(root, minute=1, shade=100))
    assert "dropped 4 superseded rows" in compact(root)
    assert read_manifest(root, superseded=True).num_rows == 4


def test_frames_keep_one_row_per_step(tmp_path: Path):
    root = str(tmp_path / "dups")
    write_part(root, rows_of(root, minute=0, shade=10, frames=True))
    write_part(root, rows_of(root, minute=1, shade=100, frames=True))
    assert query(root, "SELECT count(*) AS n FROM manifest").to_pylist() == [{"n": 12}]
    steps = query(root, "SELECT capture, step_index, count(*) AS n FROM manifest GROUP BY ALL ORDER BY ALL")
    assert steps.to_pylist() == [
        {"capture": "x0", "step_index": 0, "n": 4},
        {"capture": "x0", "step_index": 1, "n": 4},
        {"capture": None, "step_index": None, "n": 4},
    ]


def test_sheets_and_the_gallery_show_each_task_once(job):
    root, _, second = job
    sheet, info = contact_sheet(root)
    assert info.images == 4 and sheet.size == (2 * SIZE, 2 * SIZE)
    plot, plotted = xy_plot(root, "seed", "guidance")
    assert (plotted.filled, plotted.overlaps) == (4, 0)
    report = write_report(root)
    assert report.images == 4
    page = Path(report.index).read_text()
    rows = json.loads(re.search(r'id="rows">(.*?)</script>', page, re.S).group(1))
    assert shas(rows) == shas(second)


def test_a_resume_renders_a_task_whose_image_is_gone(job):
    """done_task_ids (what a render skips) lists the images folder once, not one stat per task."""
    root, _, second = job
    gone = second[0]
    (Path(root) / gone["image_path"]).unlink()
    assert gone["task_id"] in ok_task_ids(root)
    assert manifest.done_task_ids(root) == set(shas(second)) - {gone["task_id"]}


def test_done_task_ids_lists_the_images_folder_once(job, monkeypatch):
    root, _, _ = job
    listings = []
    real = manifest.files_under

    def counted(filesystem, base, folder):
        listings.append(folder)
        return real(filesystem, base, folder)

    monkeypatch.setattr(manifest, "files_under", counted)
    assert len(manifest.done_task_ids(root)) == 4 and listings == ["images"]
