"""The manifest: part files written atomically, read as one dataset, SQL via DuckDB.

Every row is a recipe (its columns and construction: ``farm.columns``, whose names this module
re-exports): it holds every input needed to render its image again, and the outputs (path,
sha256, status). Part files are never rewritten; a resumed run adds new ones. A task image
(or captured frame) with several rows is read as its latest row (``LATEST``).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from pyarrow.lib import ArrowException

from farm import storage
from farm.columns import COLUMNS as COLUMNS
from farm.columns import JSON_FIELDS as JSON_FIELDS
from farm.columns import SCHEMA, rows_to_table
from farm.columns import base_row as base_row
from farm.columns import failed_rows as failed_rows
from farm.columns import json_text as json_text
from farm.columns import task_columns as task_columns
from farm.errors import FarmError
from farm.layout import IMAGES_DIR, JOB_MARKERS, MANIFEST_DIR

TABLE_NAME = "manifest"
# The rows that are a task's image (not a captured step frame) and rendered: what the sheets,
# the gallery and the videos show.
OK = "status = 'ok'"
IMAGES = "capture IS NULL"
OK_IMAGES = f"{OK} AND {IMAGES}"
# A task the job's safety check withheld: rendered and recorded, no image written; a resume skips it.
WITHHELD_IMAGES = f"status = 'withheld' AND {IMAGES}"
T = TypeVar("T")


def write_part(job_root: str, rows: list[dict[str, Any]] | pa.Table) -> str:
    """Write rows (dicts, or a table in the manifest schema) as one new part file, atomically; returns its path."""
    filesystem, base = storage.open_root(job_root)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    path = storage.join(base, MANIFEST_DIR, name)
    buffer = io.BytesIO()
    pq.write_table(rows if isinstance(rows, pa.Table) else rows_to_table(rows), buffer)
    storage.write_bytes(filesystem, path, buffer.getvalue())
    return path


class ManifestError(FarmError, ValueError):
    """A job folder that is missing or is not one, a bad query, an unreadable part: one line for the user."""


# ---------------------------------------------------------------------------------------
# Which row of a task image wins
#
# A task's image (or captured frame) can have several rows: a failed attempt and its retry, a
# rerun that rendered a deleted image again, a double submit, `farm verify --repair` marking
# an altered image failed. The latest row is the one that matches the file (it was written
# after its image was), so per (task_id, capture, step_index) every reader sees only the row
# with the latest created_at; a tie goes to the later file (part names carry their write
# time), then to content, so the answer never depends on scan order. The SQL view `manifest`,
# read_manifest, ok_task_ids and done_task_ids all apply this one rule; `farm compact` drops
# the other rows; the view `manifest_all` shows every row until then.

PART_COLUMN = "_part"  # each row's file, ranked by name (write time): a tie-break for LATEST
LATEST = (
    "row_number() OVER (PARTITION BY task_id, capture, step_index ORDER BY created_at DESC NULLS LAST, "
    f"{PART_COLUMN} DESC, status DESC, image_sha256 DESC NULLS LAST) = 1"
)
LATEST_COLUMNS = ["task_id", "capture", "step_index", "created_at", PART_COLUMN, "status", "image_sha256"]
ALL_ROWS = "manifest_all"  # the SQL view of every row, superseded ones too
READ_SCHEMA = SCHEMA.append(pa.field(PART_COLUMN, pa.int32()))


def _latest_rows(table: pa.Table) -> pa.Table:
    """The rows of ``table`` (which holds LATEST_COLUMNS) that LATEST keeps, in table order."""
    import duckdb

    con = duckdb.connect()
    con.register("rows", table.select(LATEST_COLUMNS).append_column("_row", pa.array(np.arange(table.num_rows))))
    keep = con.sql(f"SELECT _row FROM rows QUALIFY {LATEST} ORDER BY _row").fetchnumpy()["_row"]
    return table.take(pa.array(keep, pa.int64()))


# ---------------------------------------------------------------------------------------
# Reading: which files make up the manifest
#
# A manifest folder holds part files (``part-<ns>-<hex>.parquet``) and, only while a
# compaction is under way or after one crashed, one pending merged file
# (``_compact-<ns>-<hex>.parquet``) whose Parquet metadata lists the parts it replaces.
# Hidden files (``.``) are temporaries of unfinished writes and are never read. See
# ``compact`` for why this keeps every reader correct at every moment.

PART_PREFIX = "part-"
PENDING_PREFIX = "_compact-"
REPLACES_KEY = b"farm.replaces"
READ_ATTEMPTS = 5  # a reader that races a compaction lists the folder again; see _read


class CorruptPartError(ManifestError):
    """A manifest file that is not readable Parquet: its name, why, and how to set it aside."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, reason: str) -> None:
        self.path = path
        job = _uri(filesystem, path.rsplit("/", 2)[0])
        super().__init__(
            f"{_uri(filesystem, path)}: not a readable manifest part ({reason}); "
            f"move it aside with `farm verify --quarantine {job}`"
        )


def _uri(filesystem: pafs.FileSystem, path: str) -> str:
    """A path of ``filesystem`` as the user would type it (a URI off the local disk)."""
    return path if filesystem.type_name == "local" else f"{filesystem.type_name}://{path}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _part_problem(filesystem: pafs.FileSystem, path: str) -> str | None:
    """Why a manifest file's Parquet footer cannot be read, or None when it can."""
    try:
        with filesystem.open_input_file(path) as source:
            pq.read_metadata(source)
    except (FileNotFoundError, PermissionError):  # gone since the listing (a compaction), or not ours
        return None
    except (OSError, ArrowException) as exc:
        return _first_line(exc)
    return None


def _check_parts(filesystem: pafs.FileSystem, files: list[str]) -> None:
    """Raise CorruptPartError for the first file whose footer cannot be read. Reads every
    footer, so it runs only once a read has failed."""
    for path in files:
        if (reason := _part_problem(filesystem, path)) is not None:
            raise CorruptPartError(filesystem, path, reason)


def _list_names(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    if not storage.exists(filesystem, folder):
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(folder))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def _replaced_by(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """The part names a pending merged file replaces (kept in its Parquet metadata)."""
    try:
        with filesystem.open_input_file(path) as source:
            metadata = pq.read_metadata(source).metadata or {}
    except FileNotFoundError:
        raise
    except (OSError, ArrowException) as exc:
        raise CorruptPartError(filesystem, path, _first_line(exc)) from exc
    return json.loads(metadata.get(REPLACES_KEY, b"[]"))


def _pending(filesystem: pafs.FileSystem, folder: str, names: list[str]) -> dict[str, list[str]]:
    """Pending merged files not yet renamed to their part name -> the parts each replaces."""
    pending = {}
    for name in names:
        if name.startswith(PENDING_PREFIX):
            promoted = PART_PREFIX + name[len(PENDING_PREFIX) :]
            # Once its part name exists the rename happened (or, on an object store, its
            # copy did): the part is the live copy and this file is a leftover.
            if promoted not in names:
                pending[name] = _replaced_by(filesystem, storage.join(folder, name))
    return pending


def _live_files(filesystem: pafs.FileSystem, base: str) -> list[str]:
    """The files whose rows are the manifest now: each row in exactly one of them."""
    folder = storage.join(base, MANIFEST_DIR)
    for attempt in range(READ_ATTEMPTS):
        names = _list_names(filesystem, folder)
        try:
            pending = _pending(filesystem, folder, names)
        except FileNotFoundError:  # a pending file renamed since the listing: list again
            if attempt == READ_ATTEMPTS - 1:
                raise
            continue
        replaced = {part for parts in pending.values() for part in parts}
        parts = [n for n in names if n.startswith(PART_PREFIX) and n not in replaced]
        return [storage.join(folder, n) for n in parts + sorted(pending)]
    raise AssertionError("unreachable")


def _file_key(path: str) -> str:
    """A part's or pending merge's name without its prefix: ``<time_ns>-<hex>``, in write order."""
    name = path.rsplit("/", 1)[-1]
    for prefix in (PART_PREFIX, PENDING_PREFIX):
        name = name.removeprefix(prefix)
    return name


def _dataset_of(filesystem: pafs.FileSystem, files: list[str]) -> ds.Dataset:
    """The files as one dataset in READ_SCHEMA: each row's ``_part`` is its file's rank by
    write time, a constant of the file (a partition value), so it costs no reading."""
    if not files:
        return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in READ_SCHEMA}))
    rank = {path: i for i, path in enumerate(sorted(files, key=_file_key))}
    partitions = [ds.field(PART_COLUMN) == pa.scalar(rank[f], pa.int32()) for f in files]
    return ds.FileSystemDataset.from_paths(
        files, schema=READ_SCHEMA, format=ds.ParquetFileFormat(), filesystem=filesystem, partitions=partitions
    )


def _read(filesystem: pafs.FileSystem, base: str, read: Callable[[ds.Dataset], T]) -> T:
    """Run ``read`` over the manifest; if it fails while the files changed under it (a
    compaction deleted or renamed a file between the listing and the scan), list again and
    rerun. An error over an unchanged listing is a real one: a CorruptPartError if a file's
    footer cannot be read (checked only now, so a good read costs nothing), else raised as is."""
    import duckdb

    sql_errors = (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)
    files = _live_files(filesystem, base)
    for attempt in range(READ_ATTEMPTS):
        try:
            return read(_dataset_of(filesystem, files))
        except (OSError, ArrowException, duckdb.Error) as exc:
            fresh = _live_files(filesystem, base)
            if fresh != files and attempt < READ_ATTEMPTS - 1:
                files = fresh
                continue
            if not isinstance(exc, sql_errors):  # the query's own text cannot be a file's fault
                _check_parts(filesystem, files)
            raise
    raise AssertionError("unreachable")


def dataset(job_root: str) -> ds.Dataset:
    """The manifest's files, as listed now, as one dataset of every row, superseded ones too
    (hidden temporaries and parts a compaction replaced are left out), with ``_part``. Prefer
    ``read_manifest``/``query``, which keep each task image's latest row and retry a read
    that raced a compaction."""
    filesystem, base = storage.open_root(job_root)
    return _dataset_of(filesystem, _live_files(filesystem, base))


def read_manifest(job_root: str, columns: list[str] | None = None, superseded: bool = False) -> pa.Table:
    """The manifest's rows (``columns`` of them, default all): each task image's latest row
    (LATEST), or with ``superseded`` every row the files hold."""
    filesystem, base = storage.open_root(job_root)
    names = columns or SCHEMA.names
    if superseded:
        return _read(filesystem, base, lambda d: d.to_table(columns=names))
    wanted = list(dict.fromkeys([*names, *LATEST_COLUMNS]))
    return _latest_rows(_read(filesystem, base, lambda d: d.to_table(columns=wanted))).select(names)


def ok_task_ids(job_root: str) -> set[str]:
    """Ids of tasks whose latest image row is ok."""
    table = query(job_root, f"SELECT task_id FROM {TABLE_NAME} WHERE {OK_IMAGES}")
    return set(table.column("task_id").to_pylist())


def done_task_ids(job_root: str) -> set[str]:
    """What a resumed run skips: tasks whose latest image row is ok and whose image file is
    there, so a deleted image is rendered again, and tasks the job's safety check withheld. The
    images folder is listed once (one call, not one per task: on an object store each is a request)."""
    filesystem, base = storage.open_root(job_root)
    rows = _sql(filesystem, base, f"SELECT task_id, image_path FROM {TABLE_NAME} WHERE {OK_IMAGES}").to_pylist()
    present = files_under(filesystem, base, IMAGES_DIR)
    withheld = _sql(filesystem, base, f"SELECT task_id FROM {TABLE_NAME} WHERE {WITHHELD_IMAGES}")
    return {r["task_id"] for r in rows if r["image_path"] in present} | set(withheld.column("task_id").to_pylist())


def files_under(filesystem: pafs.FileSystem, base: str, folder: str) -> set[str]:
    """The files under a job's ``folder`` (recursively), as paths relative to the job, from one listing."""
    root = storage.join(base, folder)
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    infos = filesystem.get_file_info(selector)
    return {f"{folder}/{i.path[len(root) + 1 :]}" for i in infos if i.type == pafs.FileType.File}


def corrupt_parts(job_root: str) -> list[tuple[str, str]]:
    """Every file of the manifest folder whose Parquet footer cannot be read, with why (what
    `farm verify --quarantine` moves aside). Reads each footer."""
    filesystem, base = open_job(job_root)
    folder = storage.join(base, MANIFEST_DIR)
    found = [(n, _part_problem(filesystem, storage.join(folder, n))) for n in _list_names(filesystem, folder)]
    return [(name, reason) for name, reason in found if reason is not None]


def has_manifest(job_root: str) -> bool:
    filesystem, base = storage.open_root(job_root)
    return storage.exists(filesystem, storage.join(base, MANIFEST_DIR))


def query(job_root: str, sql: str) -> pa.Table:
    """Run SQL over the manifest: ``manifest`` holds each task image's latest row, ``manifest_all`` every row."""
    filesystem, base = storage.open_root(job_root)
    return _sql(filesystem, base, sql)


def _sql(filesystem: pafs.FileSystem, base: str, sql: str) -> pa.Table:
    import duckdb

    columns = ", ".join(f'"{name}"' for name in SCHEMA.names)

    def run(data: ds.Dataset) -> pa.Table:
        con = duckdb.connect()
        con.register("_files", data)
        con.execute(f"CREATE TEMP VIEW {ALL_ROWS} AS SELECT {columns} FROM _files")
        con.execute(f"CREATE TEMP VIEW {TABLE_NAME} AS SELECT {columns} FROM _files QUALIFY {LATEST}")
        relation = con.sql(sql)
        if relation is None:  # a statement that returns nothing (SET, CREATE ...)
            return pa.table({})
        # duckdb 2 renamed arrow() (a table in 1.x) to to_arrow_table().
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
        return fetch()

    return _read(filesystem, base, run)


# ---------------------------------------------------------------------------------------
# Commands: farm query, farm runs, farm compact

FORMATS = ("table", "csv", "json", "parquet")


def open_job(job_root: str) -> tuple[pafs.FileSystem, str]:
    """The file system and base of a job folder, or a one-line ManifestError."""
    filesystem, base = storage.open_root(job_root)
    info = filesystem.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"{job_root}: no such folder")
    if info.type != pafs.FileType.Directory or not storage.exists(filesystem, storage.join(base, MANIFEST_DIR)):
        raise ManifestError(f"{job_root}: not a job folder (no manifest/ here; expected OUT/<job name>)")
    return filesystem, base


def run_query(job_root: str, sql: str, fmt: str = "table", output: str | None = None) -> str:
    """``farm query``: run SQL over a job's manifest and return the text to print.

    With ``output`` (a path or a pyarrow.fs URI) the result goes to that file, written
    atomically, and the text is a one-line note; ``parquet`` needs an output (it is binary).
    """
    import duckdb

    if fmt not in FORMATS:
        raise ManifestError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "parquet" and not output:
        raise ManifestError("--format parquet writes a binary file: name it with -o/--output FILE")
    filesystem, base = open_job(job_root)
    try:
        table = _sql(filesystem, base, sql)
    except duckdb.Error as exc:
        raise ManifestError(f"SQL: {str(exc).splitlines()[0]}") from exc
    if not output:
        return format_table(table, fmt)
    if fmt == "parquet":
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
    else:
        data = (format_table(table, fmt) + "\n").encode()
    out_fs, out_path = storage.open_root(output)
    storage.write_bytes(out_fs, out_path, data)
    return f"wrote {table.num_rows} row{'s' if table.num_rows != 1 else ''} to {output}"


# One row per job: counted over image rows (capture IS NULL) except `frames`, each task
# image's latest row only (LATEST), so `ok` and `failed` count tasks.
RUNS_SQL = f"""
SELECT
    count(*) FILTER (WHERE {OK_IMAGES}) AS ok,
    count(*) FILTER (WHERE capture IS NULL AND status = 'failed') AS failed,
    count(DISTINCT task_id) FILTER (WHERE {OK_IMAGES}) AS images,
    count(*) FILTER (WHERE capture IS NOT NULL) AS frames,
    min(created_at) AS first_created,
    max(created_at) AS last_created
FROM manifest
"""


def runs(out: str, problems: list[str] | None = None) -> pa.Table:
    """``farm runs``: one row per job folder under ``out`` (a folder with manifest/, or one a
    render has started in), sorted by name: ok and failed image rows, images (tasks with an
    ok image), captured step frames, and the first and last ``created_at``. A job with no
    rows yet shows zeros and nulls.

    A job with an unreadable part file raises its CorruptPartError, or, given ``problems``,
    is left out of the table and its one-line error appended there, so the others still list."""
    filesystem, base = storage.open_root(out)
    info = filesystem.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"{out}: no such folder")
    if info.type != pafs.FileType.Directory:
        raise ManifestError(f"{out}: not a folder (expected the --out folder of farm render)")
    folders = sorted(
        (i for i in filesystem.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.Directory),
        key=lambda i: i.base_name,
    )
    rows = []
    for folder in folders:
        if not any(storage.exists(filesystem, storage.join(folder.path, m)) for m in JOB_MARKERS):
            continue
        try:
            counts = _sql(filesystem, folder.path, RUNS_SQL).to_pylist()[0]
        except CorruptPartError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        rows.append({"job": folder.base_name, **counts})
    types = {"ok": pa.int64(), "failed": pa.int64(), "images": pa.int64(), "frames": pa.int64()}
    created = SCHEMA.field("created_at").type
    fields = [("job", pa.string()), *types.items(), ("first_created", created), ("last_created", created)]
    return pa.table({name: pa.array([r[name] for r in rows], type=t) for name, t in fields})


# Rows of a compacted file come in this order; a stable sort keeps ties in file order.
COMPACT_ORDER = [
    ("created_at", "ascending"),
    ("task_id", "ascending"),
    ("capture", "ascending"),
    ("step_index", "ascending"),
]


def compact(job_root: str) -> str:
    """``farm compact``: merge a job's part files into one; returns what it did.

    The merge is visible to readers at one atomic step, and every listing of the folder, at
    any moment, names each row exactly once:

    1. Write the merged rows (all parts' rows but those another row supersedes, see LATEST;
       sorted by ``created_at`` then ``task_id``, in the manifest schema) as
       ``_compact-<id>.parquet``, atomically (hidden temporary, then
       rename). Its Parquet metadata lists the part names it replaces. The rename is the
       commit: before it, readers see the old parts (a crash leaves only a hidden
       temporary, which readers skip and the next render deletes); from it on, readers
       read the pending file and skip every part it lists.
    2. Delete the replaced parts. A reader skips them whether or not they are still there.
    3. Rename ``_compact-<id>`` to ``part-<id>``. Where the part name exists a reader
       ignores the pending file (on an object store a rename is a copy, then a delete), so
       the end state is one ordinary part file that any Parquet reader reads correctly.

    Parts a render writes meanwhile are not in the list, so they stay visible and are merged
    by the next compaction. A read that lists the folder and then finds a file gone (deleted
    in step 2 or renamed in step 3) lists it again and reruns (``_read``). A compaction that
    crashed after step 1 is finished by the next ``compact`` (steps 2 and 3) before it
    merges anything. Compacting a job with at most one part, none of whose rows is superseded,
    is a no-op. Run one compaction of a job at a time (two at once could each delete parts the
    other's merge skipped).
    """
    filesystem, base = open_job(job_root)
    folder = storage.join(base, MANIFEST_DIR)
    finished = _finish_pending(filesystem, folder)
    parts = [n for n in _list_names(filesystem, folder) if n.startswith(PART_PREFIX)]
    if len(parts) <= 1 and not (parts and _superseded(filesystem, base)):
        state = "nothing to compact" if not parts else "already compacted (one part file)"
        return f"{job_root}: {state}" + (f"; finished {finished} interrupted compaction" if finished else "")
    tables = []
    for rank, name in enumerate(sorted(parts, key=_file_key)):  # the ranks _dataset_of gives
        path = storage.join(folder, name)
        try:
            table = pq.read_table(path, filesystem=filesystem, schema=SCHEMA)
        except pa.ArrowInvalid as exc:  # named as a reader names it (the footer's fault, not the path's)
            raise CorruptPartError(filesystem, path, _part_problem(filesystem, path) or _first_line(exc)) from exc
        tables.append(table.append_column(PART_COLUMN, pa.array(np.full(table.num_rows, rank, np.int32))))
    every = pa.concat_tables(tables)
    merged = _latest_rows(every).drop_columns([PART_COLUMN]).sort_by(COMPACT_ORDER)
    dropped = every.num_rows - merged.num_rows
    merged = merged.replace_schema_metadata({REPLACES_KEY: json.dumps(parts).encode()})
    buffer = io.BytesIO()
    pq.write_table(merged, buffer)
    name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    pending = storage.join(folder, PENDING_PREFIX + name)
    storage.write_bytes(filesystem, pending, buffer.getvalue())  # the commit
    _promote(filesystem, folder, PENDING_PREFIX + name, parts)
    files = f"{len(parts)} part file{'s' if len(parts) != 1 else ''}"
    message = f"{job_root}: merged {files} ({merged.num_rows} rows) into {PART_PREFIX + name}"
    if dropped:
        message += f"; dropped {dropped} superseded row{'s' if dropped != 1 else ''} (a later row of the same image)"
    return message


def _superseded(filesystem: pafs.FileSystem, base: str) -> int:
    """How many rows a later row of the same task image supersedes (what compact drops)."""
    sql = f"SELECT (SELECT count(*) FROM {ALL_ROWS}) - (SELECT count(*) FROM {TABLE_NAME}) AS n"
    return int(_sql(filesystem, base, sql).column("n")[0].as_py())


def _promote(filesystem: pafs.FileSystem, folder: str, pending: str, replaced: list[str]) -> None:
    """Steps 2 and 3 of ``compact``: delete the replaced parts, then rename to a part name."""
    for part in replaced:
        path = storage.join(folder, part)
        if storage.exists(filesystem, path):
            filesystem.delete_file(path)
    filesystem.move(storage.join(folder, pending), storage.join(folder, PART_PREFIX + pending[len(PENDING_PREFIX) :]))


def _finish_pending(filesystem: pafs.FileSystem, folder: str) -> int:
    """Finish what a crashed compaction left (a pending file); returns how many."""
    names = _list_names(filesystem, folder)
    live = _pending(filesystem, folder, names)
    leftovers = [n for n in names if n.startswith(PENDING_PREFIX) and n not in live]
    for name in leftovers:  # their part name already exists: step 3 was half done
        filesystem.delete_file(storage.join(folder, name))
    for name, replaced in sorted(live.items()):
        _promote(filesystem, folder, name, replaced)
    return len(live) + len(leftovers)


def missing_warning(job_root: str, missing: list[str]) -> str:
    """The one warning line of a reader (sheet, gallery, video) that left out images whose
    files are gone: which (the first few), and what finds and restores them."""
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (
        f"left out {len(missing)} image{'s' if len(missing) != 1 else ''} whose file is missing ({shown}); "
        f"`farm verify {job_root}` lists them, `farm verify --repair {job_root}` renders them again"
    )


def format_table(table: pa.Table, fmt: str = "table", max_width: int = 60) -> str:
    """Render a query result as a text table, CSV or JSON lines."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        return buffer.getvalue().decode().rstrip("\n")
    table = table.rename_columns(unique_names(table.column_names))
    rows = table.to_pylist()
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in rows)
    headers = table.column_names
    # Column names can be anyone's text too (PIVOT ... ON prompt makes one per prompt).
    shown = [_cell(h, None) for h in headers]
    cells = [[_cell(r[h], max_width) for h in headers] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(shown)]
    line = "  ".join(h.ljust(w) for h, w in zip(shown, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, rule, *body, f"({len(rows)} row{'s' if len(rows) != 1 else ''})"])


def unique_names(names: list[str]) -> list[str]:
    """``SELECT 1 AS a, 2 AS a`` is legal SQL; suffix repeats so no column hides another."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out


def _cell(value: Any, max_width: int | None) -> str:
    """One value as table text, cut to ``max_width`` characters (None: not cut).

    The table goes to a terminal and its text can be anyone's (a prompt from a shared list), so
    control characters are shown escaped as Python writes them, never sent: C0 controls (``\\x1b``,
    ``\\n``, ``\\t``), DEL, C1 controls (``\\x9b``, a one-byte CSI to some terminals), and the
    bidirectional overrides and line separators (``\\u202e``), so a value can neither clear the
    screen, set the window title, nor reorder the text around it. CSV and JSON keep the exact text.
    """
    text = "NULL" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
    if not text.isprintable():  # plain text, the common case, skips building the table
        controls = [*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F)]
        controls += range(0x2066, 0x206A)  # the bidi isolates
        text = text.translate({code: repr(chr(code))[1:-1] for code in controls})
    return text if max_width is None or len(text) <= max_width else text[: max_width - 1] + "…"
