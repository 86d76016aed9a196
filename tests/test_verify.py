"""`farm verify` (missing or altered files, --repair, --quarantine), a corrupt part file met by
every reader, and a rerun that renders deleted images again.

Fast tests build the job by hand (rows from base_row, PNGs from encode_png); the two slow ones
render through Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from farm import manifest
from farm.cli import main
from farm.images import encode_png, sha256_bytes
from farm.manifest import ManifestError, base_row, query, read_manifest, write_part
from farm.spec import Batch, RenderTask, parse_job

JOB = """
name: check
model: tiny
scheduler: euler
defaults: {steps: 2, width: 64, height: 64}
sweep: {seed: [1, 2, 3, 4, 5, 6]}
"""
GARBAGE = b"this is not parquet at all"


def write_png(root: Path, relpath: str, task: RenderTask, shade: int) -> str:
    data = encode_png(np.full((64, 64, 3), shade, np.uint8), {"task": json.loads(task.canonical_json())})
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_bytes(data)
    return sha256_bytes(data)


def make_job(tmp_path: Path) -> tuple[Path, list[dict]]:
    """OUT/check: six tasks in two batches of three (a part file each), each image on disk as its
    row says; the first task also captured one x0 frame. Its job.yaml is JOB."""
    root = tmp_path / "out" / "check"
    tasks = list(parse_job(JOB).tasks())
    rows: list[dict] = []
    for batch in (Batch.of(tasks[:3]), Batch.of(tasks[3:])):
        part = []
        for index, task in enumerate(batch.tasks):
            row = base_row("check", task, batch, index) | {"status": "ok", "seconds": 0.1, "dtype": "float32"}
            row["image_sha256"] = write_png(root, row["image_path"], task, 10 * task.seed)
            part.append(row)
            if task is tasks[0]:
                frame = row | {"capture": "x0", "step_index": 0, "image_path": f"frames/{task.task_id}/x0-0000.png"}
                frame["image_sha256"] = write_png(root, frame["image_path"], task, 7)
                part.append(frame)
        write_part(str(root), part)
        rows += part
    (root / "job.yaml").write_text(JOB)
    return root, [r for r in rows if r.get("capture") is None]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.output
    assert result.stderr.startswith("error: ") and all(p in result.stderr for p in parts), result.stderr


# ---------------------------------------------------------------------------------------
# farm verify


def test_verify_passes_a_job_whose_files_match(tmp_path: Path):
    root, _ = make_job(tmp_path)
    result = invoke("verify", str(root))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{root}: 7 files checked, all as their rows say"]


def test_verify_names_each_missing_or_altered_file_and_exits_1(tmp_path: Path):
    root, rows = make_job(tmp_path)
    for row in rows[1:3]:
        (root / row["image_path"]).unlink()
    (root / rows[3]["image_path"]).write_bytes(b"not the image its row records")
    frame = next((root / "frames").rglob("*.png"))
    frame.unlink()
    result = invoke("verify", str(root))
    assert result.exit_code == 1, result.output
    *lines, summary = result.stdout.splitlines()
    altered = sha256_bytes(b"not the image its row records")
    assert sorted(lines) == sorted(
        [
            f"missing: {rows[1]['image_path']}",
            f"missing: {rows[2]['image_path']}",
            f"missing: {frame.relative_to(root).as_posix()}",
            f"altered: {rows[3]['image_path']} (sha256 {altered[:12]}, its row says {rows[3]['image_sha256'][:12]})",
        ]
    )
    assert summary.startswith(f"{root}: 7 files checked: 3 missing, 1 altered; `farm verify --repair {root}`")


def test_verify_refuses_a_folder_that_is_not_a_job(tmp_path: Path):
    one_line_error(invoke("verify", str(tmp_path / "nope")), "no such folder")


def test_repair_marks_altered_tasks_failed_then_renders_the_folders_job(tmp_path: Path, monkeypatch):
    """--repair without Ray: run_job stands in, rendering what a render would (the tasks not done)."""
    from farm import driver
    from farm.sink import Summary
    from farm.verify import ALTERED, FRAME_BAD

    root, rows = make_job(tmp_path)
    (root / rows[1]["image_path"]).unlink()
    (root / rows[4]["image_path"]).write_bytes(b"altered")
    next((root / "frames").rglob("*.png")).unlink()  # rows[0]'s frame: its image is fine
    calls = []

    def fake_run_job(spec, options, notify=None, lock=None):
        assert lock is not None and lock.held  # verify's, taken before its check: the render runs under it
        lock.check()
        latest = {r["task_id"]: r for r in read_manifest(str(root)).to_pylist() if r["capture"] is None}
        calls.append((spec.name, options.out, options.batch_size, dict(latest), options.dtype))
        done = manifest.done_task_ids(str(root))
        redo = [t for t in spec.tasks() if t.task_id not in done]
        new = []
        for task in redo:  # what the actor writes: the image (and frames), then the rows
            row = base_row("check", task, Batch.of([task]), 0) | {"status": "ok"}
            row["image_sha256"] = write_png(root, row["image_path"], task, 10 * task.seed)
            new.append(row)
            if task.task_id == rows[0]["task_id"]:
                path = f"frames/{task.task_id}/x0-0000.png"
                new.append(row | {"capture": "x0", "step_index": 0, "image_path": path})
                new[-1]["image_sha256"] = write_png(root, path, task, 7)
        write_part(str(root), new)
        return Summary(job_root=str(root), total=6, rendered=len(redo), skipped=6 - len(redo))

    monkeypatch.setattr(driver, "run_job", fake_run_job)
    result = invoke("verify", str(root), "--repair")
    assert result.exit_code == 0, result.output
    ((name, out, batch_size, latest, dtype),) = calls
    assert (name, out, batch_size) == ("check", str(root.parent), 3)  # the largest batch recorded
    assert dtype == "float32"  # as the job rendered, not auto (float16 on a GPU)
    altered = latest[rows[4]["task_id"]]
    assert (altered["status"], altered["error"], altered["image_sha256"]) == ("failed", ALTERED, None)
    assert altered["task_json"] == rows[4]["task_json"] and altered["batch_id"] == rows[4]["batch_id"]  # a recipe
    assert (latest[rows[0]["task_id"]]["status"], latest[rows[0]["task_id"]]["error"]) == ("failed", FRAME_BAD)
    assert latest[rows[1]["task_id"]]["status"] == "ok"  # a missing image needs no failed row
    lines = result.stdout.splitlines()
    assert "repair: rendered 3, skipped 3, failed 0 of 6" in lines
    assert lines[-1] == f"{root}: 7 files checked, all as their rows say"
    assert invoke("verify", str(root)).exit_code == 0


def write_live_lock(root: Path, pid: int) -> None:
    """The lock of a render under way on this host (as tests/test_lock.py's write_lock)."""
    now = time.time()
    record = {"host": socket.gethostname(), "pid": pid, "started": now - 60, "command": "farm render check.yaml"}
    record |= {"token": f"other-{pid}", "refreshed": now, "refresh_seconds": 15.0}
    (root / "lock.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("interrupt", "code", "how"), [("KeyboardInterrupt", 130, "interrupted"), ("Terminated", 143, "terminated")]
)
def test_repair_interrupted_says_how_to_resume_like_a_render(tmp_path: Path, monkeypatch, interrupt, code, how):
    """Ctrl-C or SIGTERM during --repair's render: one line, the shell's exit code, the lock released."""
    from farm import driver, errors

    root, rows = make_job(tmp_path)
    (root / rows[1]["image_path"]).unlink()

    def interrupted_run_job(spec, options, notify=None, lock=None):
        raise getattr(errors, interrupt, KeyboardInterrupt)()

    monkeypatch.setattr(driver, "run_job", interrupted_run_job)
    result = invoke("verify", str(root), "--repair")
    assert result.exit_code == code, result.output
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"{how}: finished batches are saved; run the same command again to resume"
    )
    assert "Traceback" not in result.output
    assert not (root / "lock.json").exists()


def test_repair_of_a_folder_a_render_holds_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch):
    """The render may have just rendered the image again, its rows not yet written: verify must
    neither judge it nor mark it failed while that render holds the folder."""
    from farm import driver

    root, rows = make_job(tmp_path)
    (root / rows[4]["image_path"]).write_bytes(b"altered")  # or re-rendered, its row still buffered
    write_live_lock(root, os.getpid())  # a live run: this very process
    lock = (root / "lock.json").read_text()
    parts = sorted((root / "manifest").iterdir())
    monkeypatch.setattr(driver, "run_job", lambda *a, **k: pytest.fail("rendered without the lock"))
    result = invoke("verify", str(root), "--repair")
    expected = f"error: {root} is being rendered by pid {os.getpid()} on host {socket.gethostname()} since "
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.startswith(expected), result.output
    assert result.stderr.rstrip().endswith("(farm verify --repair --wait waits for it)"), result.stderr
    assert sorted((root / "manifest").iterdir()) == parts  # no failed row was written
    assert (root / "lock.json").read_text() == lock  # and the holder's lock left alone


def test_repair_wait_waits_for_the_render_then_repairs(tmp_path: Path, monkeypatch):
    from farm import driver, lock
    from farm.sink import Summary

    monkeypatch.setattr(lock, "POLL_SECONDS", 0.05)
    root, rows = make_job(tmp_path)
    (root / rows[1]["image_path"]).unlink()
    held = []

    def fake_run_job(spec, options, notify=None, lock=None):
        held.append(json.loads((root / "lock.json").read_text())["pid"])
        task = next(t for t in spec.tasks() if t.task_id == rows[1]["task_id"])
        write_png(root, rows[1]["image_path"], task, 10 * task.seed)  # the bytes its row records
        return Summary(job_root=str(root), total=6, rendered=1, skipped=5)

    monkeypatch.setattr(driver, "run_job", fake_run_job)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_live_lock(root, holder.pid)
        threading.Timer(0.5, lambda: (root / "lock.json").unlink()).start()  # the render ends
        result = invoke("verify", str(root), "--repair", "--wait")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"waiting: {root} is being rendered by pid {holder.pid} "), result.stderr
    assert held == [os.getpid()]  # the render ran under verify's lock
    assert not (root / "lock.json").exists()  # released after


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda root: (root / "job.yaml").unlink(), "no job.yaml to render from"),
        (lambda root: (root / "job.yaml").write_text(JOB.replace("name: check", "name: other")), "names the job"),
        (lambda root: (root / "job.yaml").write_text(JOB.replace("steps: 2", "steps: 3")), "are not tasks of"),
    ],
    ids=["no-job-yaml", "renamed", "changed-spec"],
)
def test_repair_refuses_what_it_cannot_render_safely(tmp_path: Path, spoil, message):
    root, rows = make_job(tmp_path)
    (root / rows[0]["image_path"]).write_bytes(b"altered")
    spoil(root)
    parts = sorted((root / "manifest").iterdir())
    result = invoke("verify", str(root), "--repair")
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1
    assert sorted((root / "manifest").iterdir()) == parts  # no failed row was written


# ---------------------------------------------------------------------------------------
# A corrupt part file


def spoil_a_part(tmp_path: Path) -> tuple[Path, Path]:
    root, _ = make_job(tmp_path)
    bad = root / "manifest" / "part-1999999999999999999-0badf00d.parquet"
    bad.write_bytes(GARBAGE)
    return root, bad


@pytest.mark.parametrize(
    "args",
    [
        ["query", "JOB", "SELECT count(*) FROM manifest"],
        ["report", "JOB"],
        ["sheet", "JOB", "-o", "OUT/x.png"],
        ["grid", "JOB", "--x", "seed", "--y", "guidance", "-o", "OUT/x.png"],
        ["video", "JOB", "-o", "OUT/x.gif"],
        ["compact", "JOB"],
        ["verify", "JOB"],
    ],
    ids=lambda a: a[0],
)
def test_a_corrupt_part_is_one_line_naming_it_and_the_fix(tmp_path: Path, args):
    root, bad = spoil_a_part(tmp_path)
    result = invoke(*[str(root) if a == "JOB" else a.replace("OUT", str(tmp_path)) for a in args])
    one_line_error(result, str(bad), "not a readable manifest part", f"farm verify --quarantine {root}")
    assert bad.exists()


def test_resume_refuses_a_corrupt_part(tmp_path: Path):
    """farm render of the job reads the done set first: it stops there, before Ray starts."""
    root, bad = spoil_a_part(tmp_path)
    with pytest.raises(ManifestError, match="not a readable manifest part"):
        manifest.done_task_ids(str(root))
    with pytest.raises(ManifestError, match="farm verify --quarantine"):
        manifest.ok_task_ids(str(root))
    spec = tmp_path / "check.yaml"
    spec.write_text(JOB)
    result = invoke("render", str(spec), "--out", str(root.parent), "--no-progress")
    one_line_error(result, str(bad), "farm verify --quarantine")


def test_runs_lists_the_other_jobs_names_the_bad_one_and_exits_1(tmp_path: Path):
    root, bad = spoil_a_part(tmp_path)
    other = root.parent / "good"
    write_part(str(other), [base_row("good", t, Batch.of([t]), 0) | {"status": "ok"} for t in parse_job(JOB).tasks()])
    result = invoke("runs", str(root.parent))
    assert result.exit_code == 1, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[2:-1]] == ["good"]
    assert result.stderr.startswith("warning: ") and str(bad) in result.stderr
    assert len(result.stderr.splitlines()) == 1
    with pytest.raises(ManifestError):
        manifest.runs(str(root.parent))


def test_quarantine_moves_the_corrupt_part_aside_and_the_rest_reads(tmp_path: Path):
    root, bad = spoil_a_part(tmp_path)
    pending = root / "manifest" / "_compact-1999999999999999998-0badf00d.parquet"  # a merge's file, spoilt
    pending.write_bytes(GARBAGE)
    result = invoke("verify", str(root), "--quarantine")
    assert result.exit_code == 1, result.output  # parts were set aside: their rows are gone
    lines = result.stdout.splitlines()
    for line, name in zip(lines[:2], sorted([pending.name, bad.name]), strict=True):
        assert line.startswith(f"quarantined: manifest/{name} -> manifest-quarantine/{name} (Parquet magic bytes")
    assert "2 part file(s) set aside" in lines[-1]
    assert not bad.exists() and (root / "manifest-quarantine" / bad.name).read_bytes() == GARBAGE
    assert query(str(root), "SELECT count(*) AS n FROM manifest").to_pylist() == [{"n": 7}]
    assert invoke("verify", str(root)).exit_code == 0


# ---------------------------------------------------------------------------------------
# farm video with a missing frame (the sheets and gallery: test_sheets.py, test_report.py)


def test_video_leaves_out_a_missing_image_with_a_warning(tmp_path: Path):
    root, rows = make_job(tmp_path)
    (root / rows[2]["image_path"]).unlink()
    target = tmp_path / "v.gif"
    result = invoke("video", str(root), "-o", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {target}: 5 frames") and target.is_file()
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("warning: left out 1 image whose file is missing") and rows[2]["image_path"] in warning


# ---------------------------------------------------------------------------------------
# Through Ray: a rerun renders exactly the deleted images; --repair


SMALL = """
name: small
model: tiny
scheduler: euler
defaults: {steps: 2, width: 64, height: 64}
sweep:
  guidance: [5, 7.5]
  seed: [1, 2, 3, 4]
"""


@pytest.fixture(scope="module")
def rendered(ray_session, tmp_path_factory) -> tuple[Path, Path]:
    """The 8-task job rendered once (batches of 4); tests work on copies."""
    from farm.driver import RenderOptions, run_job
    from farm.spec import load_job

    folder = tmp_path_factory.mktemp("verify")
    spec = folder / "small.yaml"
    spec.write_text(SMALL)
    summary = run_job(load_job(spec), RenderOptions(out=str(folder / "out"), batch_size=4, progress=False))
    assert (summary.rendered, summary.failed) == (8, 0)
    return spec, folder / "out" / "small"


def copy_of(rendered, tmp_path: Path) -> tuple[Path, Path]:
    spec, root = rendered
    return spec, Path(shutil.copytree(root, tmp_path / "out" / "small"))


def fault_numbers(root: Path, tasks: int) -> dict[str, int]:
    """The fault table's row: ok rows, duplicates and lost, over the rows as written (superseded too)."""
    every = read_manifest(str(root), superseded=True).to_pylist()
    ok = [r for r in read_manifest(str(root)).to_pylist() if r["status"] == "ok" and r["capture"] is None]
    for row in ok:
        assert sha256_bytes((root / row["image_path"]).read_bytes()) == row["image_sha256"]
    return {
        "tasks": tasks,
        "ok_rows": len(ok),
        "superseded": len(every) - len(ok),
        "lost": tasks - len({r["task_id"] for r in ok}),
    }


@pytest.mark.slow
def test_a_rerun_renders_exactly_the_deleted_images(rendered, tmp_path: Path):
    spec, root = copy_of(rendered, tmp_path)
    rows = read_manifest(str(root)).to_pylist()
    for row in rows[:3]:
        (root / row["image_path"]).unlink()
    result = invoke("render", str(spec), "--out", str(root.parent), "--batch-size", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("small: rendered 3, skipped 5, failed 0 of 8"), result.output
    assert fault_numbers(root, 8) == {"tasks": 8, "ok_rows": 8, "superseded": 3, "lost": 0}
    assert invoke("verify", str(root)).exit_code == 0


@pytest.mark.slow
def test_verify_repair_renders_missing_and_altered_images_again(rendered, tmp_path: Path):
    _, root = copy_of(rendered, tmp_path)
    rows = read_manifest(str(root)).to_pylist()
    for row in rows[:2]:
        (root / row["image_path"]).unlink()
    (root / rows[2]["image_path"]).write_bytes(b"altered")
    before = invoke("verify", str(root))
    assert before.exit_code == 1 and "2 missing, 1 altered" in before.stdout
    repaired = invoke("verify", str(root), "--repair", "--no-progress")
    assert repaired.exit_code == 0, repaired.output
    assert "repair: rendered 3, skipped 5, failed 0 of 8" in repaired.stdout
    assert invoke("verify", str(root)).exit_code == 0
    # superseded: the 3 re-rendered images' old rows, and the altered one's failed row
    assert fault_numbers(root, 8) == {"tasks": 8, "ok_rows": 8, "superseded": 4, "lost": 0}
    assert "dropped 4 superseded rows" in manifest.compact(str(root))
    assert fault_numbers(root, 8)["superseded"] == 0
