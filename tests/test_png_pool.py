"""A GPU actor writes its PNGs in a thread pool while the next batch denoises: the same files and rows
as writing them inline, the rows back only once every file is written, one batch on the model at a
time, and a write error raised as the inline path raises it.

No Ray, no GPU: the real BatchRenderer on the tiny model, its pooled path forced on (``png_threads``);
two threads calling ``render`` at once stand for Ray's threaded actor (farm.pool.start_actors).
"""

from __future__ import annotations

import errno
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pyarrow import fs as pafs

from farm import storage
from farm.actor import BatchRenderer, png_threads_for
from farm.errors import FatalRenderError
from farm.images import sha256_bytes
from farm.spec import Batch, parse_job

JOB = """
name: p
model: tiny
scheduler: euler
defaults: {{steps: 3, width: 64, height: 64{extra}}}
sweep: {{seed: {seeds}}}
"""
TIMING = ("seconds", "created_at")  # the columns two renders of the same batch may differ in


def batch(seeds: list[int], capture: bool = False) -> Batch:
    extra = ", capture: [latents, x0]" if capture else ""
    return Batch.of(list(parse_job(JOB.format(extra=extra, seeds=seeds)).tasks()))


@pytest.fixture
def make(tiny_path: Path, tmp_path: Path):
    """make(name, png_threads) -> a BatchRenderer writing to tmp_path/name, as a CPU actor runs it."""
    threads = torch.get_num_threads()
    made: list[BatchRenderer] = []

    def renderer(name: str, png_threads: int | None) -> BatchRenderer:
        made.append(BatchRenderer("p", str(tmp_path / name), "tiny", threads=1, png_threads=png_threads))
        return made[-1]

    try:
        yield renderer
    finally:
        for r in made:
            if r.png_pool is not None:
                r.png_pool.shutdown()
        torch.set_num_threads(threads)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


class Watched:
    """The local file system, noting when each file is in place (its rename done); ``before_move``
    runs first (a delay, a wait), ``fail`` maps a file name to (errno, seconds before failing)."""

    def __init__(self, before_move: Any = None, fail: dict[str, tuple[int, float]] | None = None) -> None:
        self.inner = pafs.LocalFileSystem()
        self.before_move = before_move
        self.fail = fail or {}
        self.moved: dict[str, float] = {}  # path -> time.monotonic() once it was in place
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_output_stream(self, path: str) -> Any:
        for name, (code, delay) in self.fail.items():
            if f"/.{name}." in path:  # the hidden temporary name of that file
                time.sleep(delay)
                raise OSError(code, f"Failed to open local file '{path}'. Detail: [errno {code}]")
        return self.inner.open_output_stream(path)

    def move(self, src: str, dest: str) -> None:
        if self.before_move is not None:
            self.before_move(dest)
        self.inner.move(src, dest)
        with self.lock:
            self.moved[dest] = time.monotonic()


def test_the_pool_writes_the_same_files_and_rows_as_inline_writes(make, tmp_path: Path):
    work = batch([1, 2, 3], capture=True)  # 3 images and 21 frames (4 latents + 3 x0 each)
    inline = make("inline", 0)
    pooled = make("pooled", 4)
    assert inline.png_pool is None and pooled.png_pool is not None
    inline_rows = inline.render(work)
    pooled_rows = pooled.render(work)

    assert len(pooled_rows) == 24 and all(r["status"] == "ok" for r in pooled_rows)
    assert without_timing(pooled_rows) == without_timing(inline_rows)  # same rows, same order
    assert [list(r) for r in pooled_rows] == [list(r) for r in inline_rows]  # same columns, same places
    written = files(tmp_path / "pooled")
    assert written == files(tmp_path / "inline")  # byte for byte
    assert len(written) == 24
    for row in pooled_rows:
        assert sha256_bytes(written[row["image_path"]]) == row["image_sha256"]


def test_rows_come_back_only_once_every_file_is_written(make, tmp_path: Path):
    renderer = make("slow", 4)
    disk = Watched(before_move=lambda dest: time.sleep(0.05))  # each write ends a little late
    renderer.filesystem = disk
    rows = renderer.render(batch([1, 2, 3, 4], capture=True))
    returned = time.monotonic()
    on_disk = files(tmp_path / "slow")  # what was there the moment the rows came back

    assert len(rows) == len(disk.moved) == 4 * 8
    assert max(disk.moved.values()) <= returned
    for row in rows:
        assert sha256_bytes(on_disk[row["image_path"]]) == row["image_sha256"]


def test_two_batches_at_once_give_what_serial_calls_give_one_on_the_model_at_a_time(make, tmp_path: Path):
    first, second = batch([1, 2]), batch([3, 4])
    owner = {t.task_id: b.batch_id for b in (first, second) for t in b.tasks}
    serial = make("serial", 0)
    expected = {b.batch_id: serial.render(b) for b in (first, second)}

    renderer = make("threads", 2)
    on_model: list[str] = []  # batches in render_tasks now
    entered: set[str] = set()  # batches that reached render_tasks
    overlaps: list[list[str]] = []
    timed_out: list[str] = []
    state = threading.Condition()
    render_tasks = renderer.render_tasks

    def watched_render_tasks(tasks, *args, **kwargs):
        with state:
            on_model.append(owner[tasks[0].task_id])
            entered.add(owner[tasks[0].task_id])
            if len(on_model) > 1:
                overlaps.append(list(on_model))
            state.notify_all()
        try:
            time.sleep(0.1)  # room for the other thread to come in, were it let
            return render_tasks(tasks, *args, **kwargs)
        finally:
            with state:
                on_model.remove(owner[tasks[0].task_id])

    def other_batch_on_the_model(dest: str) -> None:
        """A batch's PNG lands only once the other batch has reached the model: it must be
        rendering while this one writes (the lock is not held across the writes)."""
        mine = owner[Path(dest).stem]
        with state:
            if not state.wait_for(lambda: entered - {mine}, timeout=20):
                timed_out.append(dest)

    renderer.render_tasks = watched_render_tasks
    renderer.filesystem = Watched(before_move=other_batch_on_the_model)
    got: dict[str, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def call(work: Batch) -> None:
        start.wait()
        try:
            got[work.batch_id] = renderer.render(work)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(b,)) for b in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == [] and overlaps == [] and timed_out == []
    assert entered == {first.batch_id, second.batch_id}
    for key, rows in expected.items():
        assert without_timing(got[key]) == without_timing(rows)
    assert files(tmp_path / "threads") == files(tmp_path / "serial")


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOTDIR, errno.EIO])
def test_a_write_error_in_the_pool_is_raised_as_inline_writes_raise_it(make, tmp_path: Path, code: int):
    """The second image fails (late); the fourth fails sooner with another error, which inline
    writes never reach: the pool raises the second's, as FatalRenderError when a retry cannot help
    (with ``write_error`` when no batch could be written), else the WriteFailed itself; and only
    once the third, slow and still writing when the second failed, is done."""
    work = batch([1, 2, 3, 4])
    ids = [t.task_id for t in work.tasks]
    fail = {f"{ids[1]}.png": (code, 0.3), f"{ids[3]}.png": (errno.ENOSPC, 0.0)}
    raised = {}
    for name, threads in (("inline", 0), ("pooled", 4)):
        renderer = make(name, threads)
        disk = Watched(before_move=lambda dest: time.sleep(0.6) if ids[2] in dest else None, fail=fail)
        renderer.filesystem = disk
        with pytest.raises((FatalRenderError, OSError)) as failed:
            renderer.render(work)
        at = time.monotonic()
        time.sleep(0.8)
        # nothing still writing once it raised (the pool's slow third image finished first)
        assert all(moved <= at for moved in disk.moved.values())
        assert not [p for p in (tmp_path / name).rglob(".*")]  # no temporary left
        raised[name] = failed.value

    inline, pooled = raised["inline"], raised["pooled"]
    assert type(pooled) is type(inline)
    assert str(inline) == f"cannot write {tmp_path}/inline/images/{ids[1]}.png: {storage.reason(OSError(code, ''))}"
    assert str(pooled) == str(inline).replace("/inline/", "/pooled/")
    if code == errno.EIO:  # another try may pass: the write's own error, and the batch is retried
        assert isinstance(pooled, storage.WriteFailed) and pooled.errno == code
    else:
        assert isinstance(pooled, FatalRenderError)
        assert isinstance(pooled.__cause__, storage.WriteFailed) and pooled.__cause__.errno == code
        stops = pooled.write_error
        assert (stops is None) == (inline.write_error is None) == (code == errno.ENOTDIR)
        if stops is not None:
            assert (stops.errno, str(stops)) == (code, str(inline.write_error).replace("/inline/", "/pooled/"))


def test_cpu_actors_write_inline_and_gpu_actors_in_a_pool(make):
    assert make("cpu", None).png_pool is None  # the tiny model on this CPU: no pool by default
    assert png_threads_for("cpu") == 0
    assert 1 <= png_threads_for("cuda") <= 4


def test_actors_run_a_thread_per_batch_they_hold(monkeypatch: pytest.MonkeyPatch):
    from farm import pool
    from farm.pool import IN_FLIGHT_PER_ACTOR, ActorPlan, start_actors

    options: dict[str, Any] = {}

    class Handle:
        def __init__(self, *args: Any) -> None:
            self.ready = SimpleNamespace(remote=lambda: "ready")

    def remote(**kwargs: Any) -> Any:
        options.update(kwargs)
        return lambda cls: SimpleNamespace(remote=Handle)

    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(remote=remote, get=lambda refs: refs, kill=None))
    actors = start_actors(ActorPlan(2, 1, 1.0, None), "p", "/tmp/p", "tiny", "auto", False, None)
    assert len(actors) == 2
    assert options["max_concurrency"] == IN_FLIGHT_PER_ACTOR == pool.IN_FLIGHT_PER_ACTOR == 2
