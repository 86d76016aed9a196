"""A full disk loses nothing: a write that fails leaves no partial file, rows that cannot be
written stay buffered for the next try, no new work goes out meanwhile, and a run that cannot
write them ends with exit 1 and one line saying how many rendered images wait for a rerun.

Fast: no Ray (fake actors, as in test_dispatch.py), a file system that runs out of space midway.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pyarrow import fs as pafs
from test_dispatch import JOB, FakeActor, fake_ray

from farm import pool as pool_module
from farm import storage
from farm.cli import main
from farm.driver import Planned, RenderOptions, Summary, WorkQueue, cut_batches, dispatch
from farm.errors import FarmError
from farm.manifest import base_row, read_manifest
from farm.sink import RowSink
from farm.spec import Batch, parse_job


@pytest.fixture(autouse=True)
def one_batch_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake actors answer at once, which would group their batches; these rules are each batch's."""
    monkeypatch.setattr(pool_module, "MAX_GROUP", 1)


class HalfWritten:
    """An output stream that takes half of what it is given, then finds the disk full."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __enter__(self) -> HalfWritten:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()

    def write(self, data: bytes) -> int:
        self.inner.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


class FullDisk:
    """The local file system, whose next ``failures`` writes under ``folder`` run out of space
    halfway; ``rename_fails`` makes the rename after a complete write fail instead."""

    def __init__(self, folder: str | Path, failures: int = 10**9, rename_fails: bool = False) -> None:
        self.inner = pafs.LocalFileSystem()
        self.folder = str(folder)
        self.failures = failures
        self.rename_fails = rename_fails
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_output_stream(self, path: str) -> Any:
        stream = self.inner.open_output_stream(path)
        if path.startswith(self.folder) and not self.rename_fails:
            self.attempts += 1
            if self.failures > 0:
                self.failures -= 1
                return HalfWritten(stream)
        return stream

    def move(self, src: str, dest: str) -> None:
        if self.rename_fails:
            raise PermissionError(errno.EACCES, f"Failed renaming '{src}' to '{dest}'. Detail: [errno 13]")
        self.inner.move(src, dest)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*")) if folder.exists() else []


def full_disk_for_manifests(monkeypatch: pytest.MonkeyPatch, disk: FullDisk) -> None:
    """Manifest parts go through ``disk`` (the manifest writer opens its root through storage)."""
    monkeypatch.setattr(storage, "open_root", lambda root: (disk, storage.normalise_root(root)))


def rows_of(batch: Batch) -> list[dict[str, Any]]:
    return [base_row("d", t, batch, i) | {"status": "ok"} for i, t in enumerate(batch.tasks)]


def test_a_write_that_fails_midway_leaves_no_partial_file_and_names_its_target(tmp_path: Path):
    target = f"{tmp_path}/manifest/part-1.parquet"
    with pytest.raises(OSError) as failed:
        storage.write_bytes(FullDisk(tmp_path), target, b"x" * 1000)
    assert failed.value.errno == errno.ENOSPC
    assert str(failed.value) == f"cannot write {target}: No space left on device"  # not the hidden temporary
    assert leftovers(tmp_path) == []


def test_a_rename_that_fails_leaves_no_temporary_file(tmp_path: Path):
    target = f"{tmp_path}/images/a.png"
    with pytest.raises(OSError, match=f"^cannot write {target}: Permission denied$"):
        storage.write_bytes(FullDisk(tmp_path, rename_fails=True), target, b"png")
    assert leftovers(tmp_path) == [] and not Path(target).exists()


def test_a_failed_flush_keeps_its_rows_for_the_next_try(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    disk = FullDisk(tmp_path, failures=2)
    rows = rows_of(Batch.of(list(parse_job(JOB).tasks())[:3]))
    with monkeypatch.context() as patch:
        full_disk_for_manifests(patch, disk)
        sink = RowSink("d", str(tmp_path), set(), Summary(job_root=str(tmp_path)), 3, flush_seconds=0, progress=False)
        sink.record(rows)
        sink.flush_if_due()  # the disk is full: the rows stay, the run is not ended here
        assert (sink.buffered, sink.stalled) == (3, True)
        sink.flush_if_due()  # still full
        assert (sink.buffered, disk.attempts) == (3, 2)
        assert leftovers(tmp_path) == []  # no half-written part under any name
        sink.flush_if_due()  # space again: the same rows, written once
        assert (sink.buffer, sink.buffered, sink.stalled) == ([], 0, False)
        sink.close()
    written = read_manifest(str(tmp_path), superseded=True).to_pylist()  # written once: no duplicate
    assert sorted(r["task_id"] for r in written) == sorted(r["task_id"] for r in rows)
    assert leftovers(tmp_path) == []


def run(actor: FakeActor, root: Path, done: set[str] | None = None) -> Summary:
    spec = parse_job(JOB)
    summary = Summary(job_root=str(root))
    options = RenderOptions(progress=False, retries=2, flush_seconds=0)
    work = WorkQueue(cut_batches(spec.tasks(), 1))
    dispatch(spec, str(root), [actor], work, done or set(), Planned(), options, summary)
    return summary


def outcome(root: Path) -> dict[str, int]:
    """The fault table's row (test_faults.check_outcome without the images: fake actors draw none)."""
    tasks = {t.task_id for t in parse_job(JOB).tasks()}
    ok = [r["task_id"] for r in read_manifest(str(root), superseded=True).to_pylist() if r["status"] == "ok"]
    return {"tasks": len(tasks), "ok_rows": len(ok), "duplicates": len(ok) - len(set(ok)), "lost": len(tasks - set(ok))}


def test_a_full_disk_stops_new_work_and_ends_the_run_with_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from farm.sink import RowsNotWritten

    monkeypatch.setitem(sys.modules, "ray", fake_ray())
    root = tmp_path / "d"
    actor = FakeActor()
    with monkeypatch.context() as patch:
        full_disk_for_manifests(patch, FullDisk(tmp_path))
        with pytest.raises(RowsNotWritten) as failed:
            run(actor, root)
    # The two batches already sent came back; none went out after the first write failed.
    assert len(actor.batches) == 2
    assert failed.value.exit_code == 1
    assert str(failed.value) == f"disk full writing {root}/manifest; 2 images are safe, rerun to finish"
    assert leftovers(root) == []

    # Space again: the rerun renders the rest, and every task has exactly one ok row
    summary = run(FakeActor(), root)
    assert (summary.rendered, summary.failed) == (6, 0)
    assert outcome(root) == {"tasks": 6, "ok_rows": 6, "duplicates": 0, "lost": 0}


def test_a_full_disk_freed_mid_run_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "ray", fake_ray())
    root = tmp_path / "d"
    actor = FakeActor()
    with monkeypatch.context() as patch:
        full_disk_for_manifests(patch, FullDisk(tmp_path, failures=2))
        summary = run(actor, root)
    assert (summary.rendered, summary.failed, len(actor.batches)) == (6, 0, 6)
    assert outcome(root) == {"tasks": 6, "ok_rows": 6, "duplicates": 0, "lost": 0}
    assert leftovers(root) == []


@pytest.mark.parametrize(
    ("cause", "why"),
    [(OSError(errno.ENOSPC, "No space left"), "disk full"), (OSError(errno.EIO, "I/O"), "Input/output error")],
)
def test_farm_render_says_what_is_safe_in_one_line_and_exits_1(small_job: Path, monkeypatch, cause, why):
    from farm import driver
    from farm.sink import RowsNotWritten

    def full(spec: Any, options: Any, notify: Any = None) -> None:
        raise RowsNotWritten("out/small/manifest", cause, 5)

    monkeypatch.setattr(driver, "run_job", full)
    result = CliRunner().invoke(main, ["render", str(small_job)])
    assert result.exit_code == 1, result.output
    assert result.output == f"error: {why} writing out/small/manifest; 5 images are safe, rerun to finish\n"


def test_a_summary_that_cannot_be_written_after_rendering_is_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Exit 2 says refused before rendering: a write that fails after it is exit 1."""
    from farm.driver import write_summary

    monkeypatch.setattr(storage, "open_root", lambda root: (FullDisk(tmp_path), storage.normalise_root(root)))
    with pytest.raises(FarmError) as failed:
        write_summary(str(tmp_path / "d"), Summary(job_root=str(tmp_path / "d")))
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        f"No space left on device writing {tmp_path}/d/summary.json; the images and their rows are saved"
    )
    assert leftovers(tmp_path) == []


def write_fails_from_the_second_batch(root: Path, code: int) -> FakeActor:
    """An actor whose PNG writes fail with ``code`` from its 2nd batch on, the error coming back
    as Ray returns it: the FatalRenderError pickled across, inside Ray's error."""
    import pickle
    import traceback

    from ray.exceptions import RayTaskError

    from farm.errors import FatalRenderError

    def fate(batch: Batch) -> None:
        if len(actor.batches) < 2:
            return
        path = f"{root}/images/{batch.tasks[0].task_id}.png"
        cause = storage.WriteFailed(code, storage.reason(OSError(code, "")), path)
        try:
            raise FatalRenderError(str(cause), write_error=cause) from cause
        except FatalRenderError as exc:
            crossed = pickle.loads(pickle.dumps(exc))
            error = RayTaskError("render", traceback.format_exc(), crossed, proctitle="ray::BatchRenderer", ip="::1")
            raise error.as_instanceof_cause() from None

    actor = FakeActor(fate=fate)
    return actor


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (errno.ENOSPC, "disk full"),
        (errno.EDQUOT, "disk full"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_an_image_the_disk_cannot_take_stops_new_work_and_ends_the_run_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, why: str
):
    """The manifest's small write would still succeed: the PNG's error alone stops the run."""
    from farm.pool import IN_FLIGHT_PER_ACTOR
    from farm.sink import RowsNotWritten

    monkeypatch.setitem(sys.modules, "ray", fake_ray())
    root = tmp_path / "d"
    actor = write_fails_from_the_second_batch(root, code)
    with pytest.raises(RowsNotWritten) as failed:
        run(actor, root)
    # Only the batches already in flight when the 2nd failed were rendered; none went out after.
    assert len(actor.batches) == 3 <= 2 + IN_FLIGHT_PER_ACTOR
    assert failed.value.exit_code == 1
    second = [t.task_id for t in parse_job(JOB).tasks()][1]
    assert str(failed.value) == f"{why} writing {root}/images/{second}.png; 1 images are safe, rerun to finish"
    rows = read_manifest(str(root), superseded=True).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]  # the ok batch's row is kept

    # Space again: the rerun renders the failed and the unsent batches, not the one done
    summary = run(FakeActor(), root, done={rows[0]["task_id"]})
    assert (summary.rendered, summary.failed) == (5, 0)
    assert outcome(root) == {"tasks": 6, "ok_rows": 6, "duplicates": 0, "lost": 0}
