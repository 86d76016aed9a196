"""The row sink: where a job's result rows go on their way to the manifest.

The driver hands it every row a batch returns (or the failed rows it made itself). The sink
keeps the set of tasks done (so a retried batch does not write a row twice), counts images
into the run's ``Summary``, moves the progress bar, and writes buffered rows as a manifest
part when enough have gathered or enough time has passed. Leaving its ``with`` block writes
whatever is still buffered, however the block is left (Ctrl-C included): rows already
rendered always reach the manifest (DESIGN.md, nothing lost, nothing twice).

A write that fails (a full disk) drops nothing: the rows stay buffered and the next flush tries
again. While rows wait like that the sink is ``stalled`` (the driver sends no new work); a flush
the caller asks for, the last one included, raises ``RowsNotWritten``, whose one line says how
many rendered images are waiting for their rows.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from farm import manifest, storage
from farm.columns import rows_to_table
from farm.errors import RunFailed
from farm.layout import MANIFEST_DIR
from farm.spec import Batch

# Rows are written out at least this often (seconds) and whenever this many are buffered,
# so a crash loses little and a big job does not make thousands of tiny part files; but by
# count no more often than FLUSH_MIN_SECONDS, so that at tens of thousands of rows a second
# (tiny renders on a big cluster) the driver writes a few parts a second, not dozens.
FLUSH_SECONDS = 5.0
FLUSH_ROWS = 512
FLUSH_MIN_SECONDS = 0.5
# Row statuses that finish a task: rendered, or rendered and withheld by the job's safety check.
DONE_STATUSES = ("ok", "withheld")


@dataclass
class Summary:
    """A run's counts, timings and videos: printed by `farm render`, kept as summary.json."""

    job_root: str
    total: int = 0
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    withheld: int = 0  # flagged by the job's safety check: done, no image written
    elapsed: float = 0.0
    startup: float = 0.0  # Ray start + actor start and model load, within elapsed
    ray_start: float = 0.0  # of startup: starting or joining Ray
    first_image: float | None = None  # seconds from the run's start to its first image's row
    since: float = field(default_factory=time.perf_counter, repr=False)  # the run's start (perf_counter)
    actors: int = 0
    errors: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)  # animate and walk jobs: one per shot
    flicker: list[float] = field(default_factory=list)  # per video: mean |frame n+1 - frame n|, 0-255
    # per video: the same once the motion is undone (flow or 2D motion); None for a walk
    flicker_compensated: list[float | None] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def rendering_images_per_second(self) -> float:
        """Throughput once the actors are up: what a long job sees."""
        busy = self.elapsed - self.startup
        return self.rendered / busy if busy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_root": self.job_root,
            "total": self.total,
            "rendered": self.rendered,
            "skipped": self.skipped,
            "failed": self.failed,
            **({"withheld": self.withheld} if self.withheld else {}),
            "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(self.images_per_second, 3),
            "startup_s": round(self.startup, 3),
            "ray_start_s": round(self.ray_start, 3),
            "first_image_s": None if self.first_image is None else round(self.first_image, 3),
            "rendering_images_per_s": round(self.rendering_images_per_second, 3),
            "actors": self.actors,
            "errors": self.errors[:20],
            **(
                {
                    "videos": self.videos,
                    "flicker": [round(f, 4) for f in self.flicker],
                    "flicker_compensated": [None if f is None else round(f, 4) for f in self.flicker_compensated],
                }
                if self.videos
                else {}
            ),
        }


# A write error with one of these means the disk (or the user's quota) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class RowsNotWritten(RunFailed):
    """Rows that could not be written to the manifest: they stay buffered; exit 1."""

    def __init__(self, folder: str, cause: OSError, images: int) -> None:
        why = "disk full" if cause.errno in DISK_FULL else storage.reason(cause)
        super().__init__(f"{why} writing {folder}; {images} images are safe, rerun to finish")
        self.cause = cause
        self.images = images


class RowSink:
    """Buffers result rows, counts them into a Summary, and writes them as manifest parts.

    ``done`` is the job's set of task ids with ok rows; the sink adds to it as rows arrive,
    and the caller's set (the one its work was planned from) sees every addition.
    """

    def __init__(
        self,
        job: str,
        root: str,
        done: set[str],
        summary: Summary,
        todo: int,
        flush_seconds: float = FLUSH_SECONDS,
        progress: bool = True,
    ) -> None:
        from tqdm import tqdm

        self.job = job
        self.root = root
        self.done = done
        self.summary = summary
        self.flush_seconds = flush_seconds
        self.buffer: list[pa.Table] = []  # in the manifest schema, a batch's rows each
        self.buffered = 0  # rows in the buffer
        self.last_flush = time.monotonic()
        self.write_error: OSError | None = None  # the last flush's failure, while its rows wait
        self.bar = tqdm(total=todo, unit="img", disable=not progress, dynamic_ncols=True, desc=job)

    def set_total(self, todo: int) -> None:
        """The images this run renders, once planning knows them exactly (it runs beside the render)."""
        self.bar.total = todo
        self.bar.refresh()

    def __enter__(self) -> RowSink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def done_in(self, batch: Batch) -> frozenset[str]:
        """The batch's tasks that already have ok rows (the rest of it failed an input check
        before): an actor skips them, so their images stay as their rows say."""
        return frozenset(t.task_id for t in batch.tasks if t.task_id in self.done)

    def record(self, rows: Iterable[dict[str, Any]] | pa.Table) -> bool:
        """Take a batch's rows, dicts or a table in the manifest schema (as actors send them): buffer
        them and count its images (a retry's repeats are dropped). True if every row is ``ok``."""
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
        every_ok = all(status == "ok" for status in table.column("status").to_pylist())
        ids = table.column("task_id").to_pylist()
        fresh = [task_id not in self.done for task_id in ids]
        if not all(fresh):
            table = table.filter(pa.array(fresh))
        columns = table.select(["task_id", "capture", "status", "error"]).to_pydict()
        # (task id, status, error) of each image; the other rows are step captures
        images = [
            (task_id, status, error)
            for task_id, capture, status, error in zip(*columns.values(), strict=True)
            if capture is None
        ]
        self.done.update(task_id for task_id, status, _ in images if status in DONE_STATUSES)
        if table.num_rows:
            self.buffer.append(table)
            self.buffered += table.num_rows
        ok = sum(status == "ok" for _, status, _ in images)
        withheld = sum(status == "withheld" for _, status, _ in images)
        summary = self.summary
        summary.rendered += ok
        if ok and summary.first_image is None:
            summary.first_image = time.perf_counter() - summary.since
        summary.withheld += withheld
        summary.failed += len(images) - ok - withheld
        failures = (error for _, status, error in images if status == "failed")
        summary.errors.extend(error for error in failures if error not in summary.errors)
        self.bar.update(len(images))
        return every_ok

    def due_at(self) -> float | None:
        """When the buffered rows must be written (time.monotonic()), or None with none buffered."""
        return self.last_flush + self.flush_seconds if self.buffer else None

    @property
    def stalled(self) -> bool:
        """Rows wait for a write that failed: new work would only add rows that cannot be written."""
        return self.write_error is not None and bool(self.buffer)

    def flush_if_due(self) -> None:
        """Flush if enough rows or time have gathered. A failed write keeps the rows buffered and
        is tried again when due (a full disk may be freed meanwhile); it does not end the run."""
        since = time.monotonic() - self.last_flush
        if (self.buffered >= FLUSH_ROWS and since >= FLUSH_MIN_SECONDS) or since >= self.flush_seconds:
            with contextlib.suppress(RowsNotWritten):  # the rows wait; the driver sees ``stalled``
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one manifest part (a batch's rows always land together).

        Raises RowsNotWritten if the write fails; the rows stay buffered for the next try.
        """
        if self.buffer:
            # one chunk per column: Parquet writes a table of many small slices twice as slowly
            table = pa.concat_tables(self.buffer).combine_chunks()
            try:
                manifest.write_part(self.root, table)
            except OSError as exc:
                self.write_error = exc
                self.last_flush = time.monotonic()  # try again in flush_seconds, not at once
                images = table.filter(pc.and_(pc.is_null(table["capture"]), pc.equal(table["status"], "ok")))
                raise RowsNotWritten(storage.join(self.root, MANIFEST_DIR), exc, images.num_rows) from exc
            self.buffer.clear()
            self.buffered = 0
        self.write_error = None
        self.last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.bar.close()
