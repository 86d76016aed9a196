"""``farm verify``: is every ok row's file there, with the bytes its row records? And the repairs:
set unreadable part files aside (``--quarantine``), render again what is missing or altered
(``--repair``).

A row is the record of its image (DESIGN.md): an image whose file is gone, or whose bytes no
longer hash to the row's ``image_sha256``, is not what the manifest says. Each folder is listed
once to find the missing files, and each file there is read once (reading is the check's cost).

The repair is ``farm render`` of the folder's own ``job.yaml`` into the same output root, so its
batches and bytes are a render's. A missing image needs nothing more: a render skips only the
tasks whose image is there (``manifest.done_task_ids``). An altered image (or a captured frame
missing or altered) gets a ``failed`` row first, so its task's latest row is not ok and the
render takes it; the render's new rows then supersede those (``manifest.LATEST``).

A repair holds the job folder's lock (farm.lock) from before its check until the render ends:
a render under way (its rows not yet written) is never judged by its half-written state, nor
has its new images marked failed. The render takes the held lock over rather than taking it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm import layout, manifest, storage
from farm.errors import FarmError
from farm.images import sha256_bytes
from farm.layout import JOB_FILE, MANIFEST_DIR, QUARANTINE_DIR
from farm.lock import JobLock

if TYPE_CHECKING:
    from farm.sink import Summary

ALTERED = "image altered: sha256 differs from its row (farm verify)"
FRAME_BAD = "a captured frame is missing or altered (farm verify)"


class VerifyError(FarmError):
    """A repair that cannot be done safely (no job.yaml, a renamed folder, tasks the spec no
    longer makes): one line for the user."""


@dataclass(frozen=True)
class Problem:
    """One ok row whose file is not as the row says."""

    task_id: str
    path: str  # relative to the job folder
    capture: str | None  # None: the task's image; else a captured frame's kind
    recorded: str | None  # the row's image_sha256
    actual: str | None  # the file's sha256; None: the file is missing

    def line(self) -> str:
        if self.actual is None:
            return f"missing: {self.path}"
        return f"altered: {self.path} (sha256 {self.actual[:12]}, its row says {(self.recorded or 'none')[:12]})"


@dataclass
class Check:
    """What ``check_files`` found."""

    job_root: str
    checked: int  # ok rows (files) checked
    problems: list[Problem]
    failed: int  # tasks whose latest image row is failed (not files: the render's errors)
    quarantined: list[str] = field(default_factory=list)  # part files set aside this time

    @property
    def ok(self) -> bool:
        return not self.problems and not self.quarantined

    def summary(self) -> str:
        counts = [f"{sum(p.actual is None for p in self.problems)} missing"]
        counts.append(f"{sum(p.actual is not None for p in self.problems)} altered")
        text = f"{self.job_root}: {self.checked} file{'s' if self.checked != 1 else ''} checked"
        text += f": {', '.join(counts)}" if self.problems else ", all as their rows say"
        if self.quarantined:
            text += f"; {len(self.quarantined)} part file(s) set aside, their rows gone"
        if not self.ok:
            text += f"; `farm verify --repair {self.job_root}` renders their tasks again"
        if self.failed:
            text += f" ({self.failed} task{'s' if self.failed != 1 else ''} failed: a render tries again)"
        return text


@dataclass(frozen=True)
class Repair:
    """How ``--repair`` renders: ``farm render``'s options; batch_size None is the largest batch recorded."""

    address: str | None = None
    actors: int | None = None
    batch_size: int | None = None
    allow_pickle: bool = False
    progress: bool = True
    wait: bool = False  # another run holds the job folder: wait for it rather than refuse


def check_files(job_root: str, quarantined: list[str] | None = None) -> Check:
    """Check every ok row (each task image's and frame's latest row) against its file."""
    filesystem, base = manifest.open_job(job_root)
    columns = "task_id, status, capture, image_path, image_sha256"
    rows = manifest.query(job_root, f"SELECT {columns} FROM {manifest.TABLE_NAME} ORDER BY image_path").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    present: set[str] = set()
    for folder in sorted({r["image_path"].split("/", 1)[0] for r in ok}):  # images/, frames/: one listing each
        present |= manifest.files_under(filesystem, base, folder)
    problems: list[Problem] = []
    for row in ok:
        actual = None
        if row["image_path"] in present:
            try:
                actual = sha256_bytes(storage.read_bytes(filesystem, storage.join(base, row["image_path"])))
            except FileNotFoundError:  # deleted since the listing
                actual = None
        if actual != row["image_sha256"]:
            problems.append(Problem(row["task_id"], row["image_path"], row["capture"], row["image_sha256"], actual))
    failed = sum(r["status"] == "failed" and r["capture"] is None for r in rows)
    return Check(job_root, len(ok), problems, failed, list(quarantined or []))


def quarantine_parts(job_root: str) -> list[str]:
    """Move every manifest file whose Parquet footer cannot be read to ``manifest-quarantine/``,
    so the rest reads again; one line for each. Its rows are gone from the manifest: a render
    (or ``--repair``) renders those tasks again."""
    filesystem, base = manifest.open_job(job_root)
    target = storage.join(base, QUARANTINE_DIR)
    lines = []
    for name, reason in manifest.corrupt_parts(job_root):
        filesystem.create_dir(target, recursive=True)
        filesystem.move(storage.join(base, MANIFEST_DIR, name), storage.join(target, name))
        lines.append(f"quarantined: {MANIFEST_DIR}/{name} -> {QUARANTINE_DIR}/{name} ({reason})")
    return lines


def repair_job(job_root: str, check: Check, repair: Repair, lock: JobLock) -> Summary:
    """Render the tasks of ``check``'s problems again: ``farm render`` of the folder's job.yaml
    into the same output root (which also renders any task not done: an interrupted run's, a
    failed one's, one whose rows were quarantined). ``lock`` is the job folder's, held by the
    caller since before ``check`` was made; the render runs under it. Returns the render's ``Summary``."""
    from farm.driver import RenderOptions, run_job
    from farm.spec import parse_job

    filesystem, base = manifest.open_job(job_root)
    root = storage.normalise_root(job_root)
    out, name = root.rstrip("/").rsplit("/", 1)
    spec_path = storage.join(base, JOB_FILE)
    if not storage.exists(filesystem, spec_path):
        raise VerifyError(f"{job_root}: no {JOB_FILE} to render from; render the job's spec with --out {out}")
    local = "://" not in root
    spec = parse_job(
        storage.read_bytes(filesystem, spec_path).decode(),
        default_name=name,
        where=f"{root}/{JOB_FILE}",
        base_dir=Path(base) if local else None,
    )
    if spec.name != name:
        raise VerifyError(f"{root}/{JOB_FILE} names the job {spec.name!r}, not {name!r} (a renamed folder?)")
    random_base = layout.random_base_of(root)
    bad = {p.task_id for p in check.problems}
    strangers = bad - {t.task_id for t in spec.tasks(random_base or 0)}
    if strangers:  # rendering would make other tasks than the ones to repair: never guess
        raise VerifyError(
            f"{len(strangers)} of the {len(bad)} tasks to repair are not tasks of {root}/{JOB_FILE} now "
            f"(a relative path that finds another file, a changed model?); render the job's spec with --out {out}"
        )
    lock.check()
    _mark_failed(root, check)
    largest, dtype, compiled = _recorded_render(root)
    options = RenderOptions(
        out=out,
        address=repair.address,
        actors=repair.actors,
        batch_size=repair.batch_size or largest,
        dtype=dtype,
        compile=compiled,
        allow_pickle=repair.allow_pickle,
        progress=repair.progress,
        wait=repair.wait,
    )
    return run_job(spec, options, lock=lock)


def _recorded_render(root: str) -> tuple[int, str, bool]:
    """The largest batch_size the image rows record (1 if none does), the dtype most of the ok
    images were rendered in ("auto" if none records one), and whether most were compiled: a repair
    renders as the job did, since float16 on a GPU, or a compiled path, would draw other bytes."""
    sql = (
        f"SELECT (SELECT max(batch_size) FROM {manifest.TABLE_NAME} WHERE {manifest.IMAGES}) AS n, "
        f"(SELECT mode(dtype) FROM {manifest.TABLE_NAME} WHERE {manifest.OK_IMAGES}) AS dtype, "
        f"(SELECT mode(compile_mode IS NOT NULL) FROM {manifest.TABLE_NAME} WHERE {manifest.OK_IMAGES}) AS compiled"
    )
    row = manifest.query(root, sql).to_pylist()[0]
    return max(row["n"] or 1, 1), row["dtype"] or "auto", bool(row["compiled"])


def _image_rows(root: str, task_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The latest image row (every column) of each of ``task_ids``: those rows only are read
    into Python, not the manifest's."""
    if not task_ids:
        return {}
    ids = ", ".join("'" + task_id.replace("'", "''") + "'" for task_id in sorted(task_ids))
    sql = f"SELECT * FROM {manifest.TABLE_NAME} WHERE {manifest.IMAGES} AND task_id IN ({ids})"
    return {r["task_id"]: r for r in manifest.query(root, sql).to_pylist()}


def _mark_failed(root: str, check: Check) -> None:
    """A failed row for each task whose image is there but altered, or whose frame is bad, so
    its latest row is not ok and the render takes it (a missing image needs none)."""
    missing = {p.task_id for p in check.problems if p.capture is None and p.actual is None}
    images = _image_rows(root, {p.task_id for p in check.problems} - missing)
    now = datetime.now(timezone.utc)
    failed = {}
    for problem in check.problems:
        row = images.get(problem.task_id)
        if problem.task_id in missing or row is None or row["status"] != "ok":
            continue
        error = ALTERED if problem.capture is None else FRAME_BAD
        failed[problem.task_id] = row | {"status": "failed", "error": error, "image_sha256": None, "created_at": now}
    if failed:
        manifest.write_part(root, list(failed.values()))


def verify(
    job_root: str,
    echo: Callable[[str], None],
    quarantine: bool = False,
    repair: Repair | None = None,
    notify: Callable[[str], None] | None = None,
) -> bool:
    """``farm verify``: set unreadable parts aside (``quarantine``), check every ok row's file,
    echo a line per problem and a summary; with ``repair``, render the bad tasks again and check
    once more. True when all is well at the end.

    A repair first takes the job folder's lock, as ``farm render`` does: a live holder is refused
    (JobLocked), or with ``repair.wait`` waited for (``notify``, default ``echo``, hears about it).
    """
    if repair is None:
        return _verify(job_root, echo, quarantine, None, None)
    manifest.open_job(job_root)  # not a job folder: refused before the lock would create one
    root = storage.normalise_root(job_root)
    out, name = root.rstrip("/").rsplit("/", 1)
    lock = JobLock(root, storage.join(out, name), retry="farm verify --repair --wait")
    lock.acquire(repair.wait, notify or echo)
    try:
        return _verify(job_root, echo, quarantine, repair, lock)
    finally:
        lock.release()


def _verify(
    job_root: str, echo: Callable[[str], None], quarantine: bool, repair: Repair | None, lock: JobLock | None
) -> bool:
    moved = quarantine_parts(job_root) if quarantine else []
    for line in moved:
        echo(line)
    check = check_files(job_root, moved)
    for problem in check.problems:
        echo(problem.line())
    echo(check.summary())
    if repair is None or lock is None or check.ok:
        return check.ok
    summary = repair_job(job_root, check, repair, lock)
    echo(f"repair: rendered {summary.rendered}, skipped {summary.skipped}, failed {summary.failed} of {summary.total}")
    for message in summary.errors[:3]:
        echo(f"  failed: {message}")
    after = check_files(job_root)
    for problem in after.problems:
        echo(problem.line())
    echo(after.summary())
    return after.ok and not summary.failed
