"""farm query (formats, -o), farm runs and farm compact, over hand-made manifests (no Ray, no torch)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from farm import manifest
from farm.cli import main
from farm.manifest import SCHEMA, base_row, compact, ok_task_ids, query, read_manifest, runs, write_part
from farm.spec import Batch, RenderTask

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

# Queries whose answers must not change when a job is compacted.
QUERIES = [
    "SELECT count(*) AS n FROM manifest",
    "SELECT status, count(*) AS n FROM manifest GROUP BY status ORDER BY status",
    "SELECT guidance, count(*) AS n, sum(seed) AS s FROM manifest WHERE capture IS NULL GROUP BY guidance ORDER BY 1",
    "SELECT capture, count(*) AS n FROM manifest GROUP BY capture ORDER BY capture NULLS FIRST",
    "SELECT count(DISTINCT task_id) AS tasks, min(created_at) AS a, max(created_at) AS b FROM manifest",
    "SELECT * FROM manifest ORDER BY task_id, capture NULLS FIRST, step_index, status, created_at",
]


def rows_for(job: str, seeds: list[int], guidance: float, minute: int, status: str = "ok") -> list[dict]:
    """Result rows of one batch, shaped as the actor makes them; created_at is fixed per batch."""
    tasks = [RenderTask("tiny", "euler", f"a cat {s}", "", s, 2, guidance, 64, 64) for s in seeds]
    batch = Batch.of(tasks)
    out = []
    for index, task in enumerate(tasks):
        row = base_row(job, task, batch, index)
        row.update(status=status, created_at=T0 + timedelta(minutes=minute), seconds=0.5, image_sha256="ab" * 32)
        if status == "failed":
            row.update(error="boom", image_sha256=None)
        out.append(row)
    return out


def frame_rows(image_rows: list[dict], steps: int = 2) -> list[dict]:
    """Captured step frames of the given tasks (capture set): one row per step."""
    return [
        {**r, "capture": "latents", "step_index": i, "image_path": f"frames/{r['task_id']}/latents-{i:04d}.png"}
        for r in image_rows
        for i in range(steps)
    ]


def make_job(root: Path, name: str = "job") -> str:
    """A job of four part files: two batches, a failed batch, its retry (of two of its three
    tasks: their failed rows are superseded, seed 9 stays failed), step frames. 13 rows, of
    which the manifest shows 11: 8 ok images, 1 failed, 2 frames."""
    job = str(root / name)
    first = rows_for(name, [1, 2, 3], 5.0, minute=0)
    write_part(job, first + frame_rows(first[:1]))
    write_part(job, rows_for(name, [4, 5, 9], 7.5, minute=1, status="failed"))
    write_part(job, rows_for(name, [6, 7, 8], 7.5, minute=1))  # same created_at as the failed part
    write_part(job, rows_for(name, [4, 5], 7.5, minute=2))  # the resume's retry
    return job


def parts(job: str) -> list[str]:
    return sorted(p.name for p in (Path(job) / "manifest").iterdir())


def answers(job: str) -> list[list[dict]]:
    return [query(job, sql).to_pylist() for sql in QUERIES]


# ---------------------------------------------------------------------------------------
# compact


def test_compact_merges_parts_and_every_query_answers_the_same(tmp_path: Path):
    job = make_job(tmp_path)
    before, done_before = answers(job), ok_task_ids(job)
    assert len(parts(job)) == 4 and before[0] == [{"n": 11}]
    assert query(job, "SELECT count(*) AS n FROM manifest_all").to_pylist() == [{"n": 13}]
    message = compact(job)
    assert "merged 4 part files (11 rows)" in message and "dropped 2 superseded rows" in message
    after = parts(job)
    assert len(after) == 1 and after[0].startswith("part-") and after[0].endswith(".parquet")
    assert answers(job) == before
    assert ok_task_ids(job) == done_before and len(done_before) == 8
    assert query(job, "SELECT count(*) AS n FROM manifest_all").to_pylist() == [{"n": 11}]


def test_compacted_file_keeps_the_schema_and_a_deterministic_order(tmp_path: Path):
    job = make_job(tmp_path / "a")
    copy = tmp_path / "b" / "job"
    shutil.copytree(job, copy)
    compact(job)
    compact(str(copy))
    (file,) = (Path(job) / "manifest").iterdir()
    assert pq.read_schema(file).equals(SCHEMA)
    rows = pq.read_table(file).to_pylist()
    keys = [(r["created_at"], r["task_id"]) for r in rows]
    assert keys == sorted(keys)
    # equal created_at and task_id (a task's image and its frames): image row last, frames by step
    firsts = [(r["capture"], r["step_index"]) for r in rows if r["task_id"] == rows[0]["task_id"]]
    assert firsts in ([("latents", 0), ("latents", 1), (None, None)], [(None, None)])
    (other,) = (copy / "manifest").iterdir()
    assert pq.read_table(other).to_pylist() == rows


def test_compacting_a_compacted_job_is_a_no_op(tmp_path: Path):
    job = make_job(tmp_path)
    compact(job)
    (file,) = (Path(job) / "manifest").iterdir()
    data = file.read_bytes()
    assert "already compacted" in compact(job)
    assert parts(job) == [file.name] and file.read_bytes() == data


def test_compact_a_job_of_zero_or_one_part(tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "manifest").mkdir(parents=True)
    assert "nothing to compact" in compact(str(empty))
    assert query(str(empty), QUERIES[0]).to_pylist() == [{"n": 0}]
    one = str(tmp_path / "one")
    path = write_part(one, rows_for("one", [1, 2], 5.0, minute=0))
    data = Path(path).read_bytes()
    before = answers(one)
    assert "already compacted" in compact(one)
    assert parts(one) == [Path(path).name] and Path(path).read_bytes() == data
    assert answers(one) == before


def test_every_query_is_right_at_every_step_of_a_compaction(tmp_path: Path, monkeypatch):
    """Stop a compaction after each step (as a crash would) and query the folder there."""
    job = make_job(tmp_path)
    before, done = answers(job), ok_task_ids(job)
    old = parts(job)
    real_promote = manifest._promote
    monkeypatch.setattr(manifest, "_promote", lambda *args: None)
    compact(job)  # step 1 only: the merged file is committed, the old parts are all still there
    monkeypatch.setattr(manifest, "_promote", real_promote)
    folder = Path(job) / "manifest"
    (pending,) = [p for p in folder.iterdir() if p.name.startswith("_compact-")]
    assert set(parts(job)) == {*old, pending.name}
    assert answers(job) == before and ok_task_ids(job) == done
    for name in old[:2]:  # step 2, half done
        (folder / name).unlink()
    assert answers(job) == before and ok_task_ids(job) == done
    for name in old[2:]:  # step 2 done
        (folder / name).unlink()
    assert answers(job) == before
    # step 3 on an object store: the rename is a copy, then a delete; both names exist
    promoted = folder / ("part-" + pending.name.removeprefix("_compact-"))
    shutil.copyfile(pending, promoted)
    assert answers(job) == before and ok_task_ids(job) == done
    # the next compaction finishes the interrupted one
    assert "finished 1 interrupted compaction" in compact(job)
    assert parts(job) == [promoted.name]
    assert answers(job) == before


def test_an_interrupted_compaction_is_finished_by_the_next(tmp_path: Path, monkeypatch):
    job = make_job(tmp_path)
    before = answers(job)
    monkeypatch.setattr(manifest, "_promote", lambda *args: None)
    compact(job)
    monkeypatch.undo()
    assert "finished 1 interrupted compaction" in compact(job)
    assert len(parts(job)) == 1 and parts(job)[0].startswith("part-")
    assert answers(job) == before


def test_a_part_written_during_a_compaction_stays_visible(tmp_path: Path, monkeypatch):
    job = make_job(tmp_path)
    monkeypatch.setattr(manifest, "_promote", lambda *args: None)
    compact(job)
    monkeypatch.undo()
    late = rows_for("job", [9, 10], 5.0, minute=3)
    write_part(job, late)  # a render adds a part after the merge committed
    assert query(job, QUERIES[0]).to_pylist() == [{"n": 13}]
    compact(job)  # finishes the first (the late part is not in its list), then merges both
    assert len(parts(job)) == 1
    assert query(job, QUERIES[0]).to_pylist() == [{"n": 13}]
    assert {r["task_id"] for r in late} <= ok_task_ids(job)


def test_a_read_that_races_a_compaction_lists_again(tmp_path: Path, monkeypatch):
    """The folder is listed, then a compaction deletes the listed parts before the scan."""
    job = make_job(tmp_path)
    expected = sorted(json.dumps(r, default=str, sort_keys=True) for r in read_manifest(job).to_pylist())
    real = manifest._dataset_of
    raced = []

    def compact_first(filesystem, files):
        if not raced:
            raced.append(True)
            compact(job)
        return real(filesystem, files)

    monkeypatch.setattr(manifest, "_dataset_of", compact_first)
    got = sorted(json.dumps(r, default=str, sort_keys=True) for r in read_manifest(job).to_pylist())
    assert raced and got == expected


def test_hidden_leftover_of_a_crashed_merge_is_ignored(tmp_path: Path):
    job = make_job(tmp_path)
    before = answers(job)
    (Path(job) / "manifest" / "._compact-1-deadbeef.parquet.0123abcd.tmp").write_bytes(b"PAR1 half")
    assert answers(job) == before
    compact(job)
    assert answers(job) == before


# ---------------------------------------------------------------------------------------
# farm query


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_query_writes_parquet_to_a_file(tmp_path: Path):
    job = make_job(tmp_path)
    sql = "SELECT task_id, seed, guidance, created_at FROM manifest WHERE capture IS NULL ORDER BY seed, status"
    target = tmp_path / "result" / "r.parquet"
    result = invoke("query", job, sql, "--format", "parquet", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote 9 rows to {target}"
    assert pq.read_table(target).equals(query(job, sql))


def test_query_parquet_without_output_is_one_line_error(tmp_path: Path):
    job = make_job(tmp_path)
    result = invoke("query", job, "SELECT 1", "--format", "parquet")
    assert result.exit_code == 2
    assert result.output.startswith("error: --format parquet") and "-o" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_text_formats_go_to_a_file_with_o(tmp_path: Path, fmt: str):
    job = make_job(tmp_path)
    sql = "SELECT status, count(*) AS n FROM manifest GROUP BY status ORDER BY status"
    target = tmp_path / f"r.{fmt}"
    result = invoke("query", job, sql, "--format", fmt, "--output", str(target))
    assert result.exit_code == 0 and "wrote 2 rows" in result.output
    printed = invoke("query", job, sql, "--format", fmt)
    assert target.read_text() == printed.output


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: p, "not a job folder"),  # the output root, not OUT/<job>
        (lambda p: p / "job" / "manifest" / next((p / "job" / "manifest").iterdir()).name, "not a job folder"),
    ],
)
def test_query_refuses_what_is_not_a_job_folder(tmp_path: Path, make, expected):
    make_job(tmp_path)
    result = invoke("query", str(make(tmp_path)), "SELECT 1")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and expected in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_query_bad_sql_is_one_line(tmp_path: Path):
    job = make_job(tmp_path)
    result = invoke("query", job, "SELECT nope FROM manifest")
    assert result.exit_code == 2 and result.output.startswith("error: SQL")
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# farm runs


def make_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    make_job(out, "zeta")
    alpha = str(out / "alpha")
    write_part(alpha, rows_for("alpha", [1], 5.0, minute=5))
    (out / "started").mkdir()
    (out / "started" / "job.yaml").write_text("model: tiny\n")  # a render began: no rows yet
    (out / "not-a-job").mkdir()
    (out / "notes.txt").write_text("hi")
    return out


def test_runs_lists_jobs_with_counts(tmp_path: Path):
    out = make_out(tmp_path)
    table = runs(str(out))
    rows = table.to_pylist()
    assert [r["job"] for r in rows] == ["alpha", "started", "zeta"]
    by = {r["job"]: r for r in rows}
    assert {k: by["zeta"][k] for k in ("ok", "failed", "images", "frames")} == {
        "ok": 8,
        "failed": 1,
        "images": 8,
        "frames": 2,
    }
    assert by["zeta"]["first_created"] == T0 and by["zeta"]["last_created"] == T0 + timedelta(minutes=2)
    assert (by["alpha"]["ok"], by["alpha"]["images"], by["alpha"]["frames"]) == (1, 1, 0)
    assert by["started"] == {
        "job": "started",
        "ok": 0,
        "failed": 0,
        "images": 0,
        "frames": 0,
        "first_created": None,
        "last_created": None,
    }


def test_runs_reads_a_filesystem_uri_and_survives_compaction(tmp_path: Path):
    out = make_out(tmp_path)
    before = runs(str(out))
    assert runs(f"file://{out}").equals(before)
    compact(str(out / "zeta"))
    assert runs(str(out)).equals(before)


def test_runs_cli_formats_and_errors(tmp_path: Path):
    out = make_out(tmp_path)
    table = invoke("runs", str(out))
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split() == ["job", "ok", "failed", "images", "frames", "first_created", "last_created"]
    assert [line.split()[0] for line in lines[2:5]] == ["alpha", "started", "zeta"] and lines[-1] == "(3 rows)"
    js = invoke("runs", str(out), "--format", "json")
    assert [json.loads(line)["job"] for line in js.output.splitlines()] == ["alpha", "started", "zeta"]
    csv = invoke("runs", str(out), "--format", "csv")
    assert csv.output.splitlines()[0] == '"job","ok","failed","images","frames","first_created","last_created"'
    missing = invoke("runs", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and missing.output.strip() == f"error: {tmp_path / 'nope'}: no such folder"
    a_file = invoke("runs", str(out / "notes.txt"))
    assert a_file.exit_code == 2 and "not a folder" in a_file.output


# ---------------------------------------------------------------------------------------
# farm compact (CLI)


def test_compact_cli(tmp_path: Path):
    job = make_job(tmp_path)
    first = invoke("compact", job)
    assert first.exit_code == 0 and "merged 4 part files" in first.output
    again = invoke("compact", job)
    assert again.exit_code == 0 and "already compacted" in again.output
    missing = invoke("compact", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "no such folder" in missing.output
    not_job = invoke("compact", str(tmp_path))
    assert not_job.exit_code == 2 and "not a job folder" in not_job.output
    assert len(not_job.output.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["query", "runs", "compact"])
def test_help_texts(command: str):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example: farm " + command in result.output
