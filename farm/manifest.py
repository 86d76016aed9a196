"""The manifest: one Arrow schema, part files written atomically, read as one dataset, SQL via DuckDB.

Every row is a recipe: it holds every input needed to render its image again, and the
outputs (path, sha256, status). Part files are never rewritten; a resumed run adds new ones.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from pyarrow.lib import ArrowException

from farm import __version__, storage
from farm.errors import FarmError
from farm.layout import JOB_MARKERS, MANIFEST_DIR, image_relpath
from farm.spec import SCHEDULERS, Batch, RenderTask

TABLE_NAME = "manifest"
# The rows that are a task's image (not a captured step frame) and rendered: what the sheets,
# the gallery and the videos show.
OK = "status = 'ok'"
IMAGES = "capture IS NULL"
OK_IMAGES = f"{OK} AND {IMAGES}"
T = TypeVar("T")

# Column -> (type, description). The column table in docs/manifest.md is generated from this list.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("task_id", pa.string(), "hash of the task's canonical JSON; the image file is images/<task_id>.png"),
    ("job", pa.string(), "job name"),
    ("status", pa.string(), "ok or failed"),
    ("error", pa.string(), "the error of a failed task, else null"),
    ("prompt", pa.string(), "prompt"),
    ("negative_prompt", pa.string(), "negative prompt (empty string for none)"),
    ("seed", pa.int64(), "seed of the image's CPU generator"),
    ("steps", pa.int32(), "denoising steps"),
    ("guidance", pa.float64(), "classifier-free guidance scale"),
    ("width", pa.int32(), "image width in pixels"),
    ("height", pa.int32(), "image height in pixels"),
    ("scheduler", pa.string(), f"scheduler name ({', '.join(SCHEDULERS)})"),
    ("scheduler_config", pa.string(), "the scheduler's full config as JSON"),
    ("variation_seed", pa.int64(), "seed whose noise is blended into the seed's noise, else null"),
    ("variation_strength", pa.float64(), "slerp weight of the variation seed's noise (0: the seed's own image)"),
    ("perturb_scale", pa.float64(), "perturbation: noise = (seed + scale x variation) / sqrt(1 + scale^2); 0: unused"),
    ("init_image", pa.string(), "img2img init image (absolute path), else null"),
    ("init_image_sha256", pa.string(), "sha256 of the init image file"),
    ("strength", pa.float64(), "img2img strength: int(steps x strength) steps run; null without an init image"),
    ("start_step", pa.int32(), "img2img: the step the loop starts at (steps - int(steps x strength)); 0 otherwise"),
    ("mix", pa.string(), "prompt mix as JSON [{prompt, weight}, ...], else null"),
    ("mix_mode", pa.string(), "how mix blends the prompt embeddings: sum or slerp"),
    ("token_mix", pa.string(), "token-embedding mixes as JSON [{token, other, weight}, ...], else null"),
    ("embeddings", pa.string(), "textual-inversion files as JSON [{path, sha256, token}, ...], else null"),
    ("guidance_loss", pa.string(), "guidance loss as JSON {name, target, scale, every}, else null"),
    ("captures", pa.string(), "step captures the task asked for (latents, x0), comma-separated, else null"),
    ("long_prompt", pa.string(), "prompts over 75 tokens: truncate or chunk"),
    ("prompt_tokens", pa.int32(), "the prompt's token count (the longest prompt of a mix)"),
    ("prompt_truncated", pa.bool_(), "true when the prompt or negative prompt lost tokens to truncation"),
    ("capture", pa.string(), "null for the image; latents or x0 for a captured step frame"),
    ("step_index", pa.int32(), "the captured frame's step (latents: 0 is the start), else null"),
    ("frame", pa.int32(), "animate or walk job: the output frame number (from 0), else null"),
    ("previous", pa.string(), "chained frame: task id of the frame before, blended into the init image, else null"),
    ("blend", pa.float64(), "chained frame: weight of the previous frame in the init image (0: the source frame)"),
    ("color_reference", pa.string(), "chained frame: task id whose LAB colours the init image takes, else null"),
    ("model", pa.string(), "model reference as written in the job"),
    ("model_hash", pa.string(), "sha256 over the model's files"),
    ("model_config", pa.string(), "the job's model_config (configs for a single-file checkpoint), else null"),
    ("dtype", pa.string(), "torch dtype of the model (float32, float16, bfloat16)"),
    ("device", pa.string(), "torch device type (cpu, cuda)"),
    ("batch_id", pa.string(), "hash of the task ids rendered together in one UNet batch"),
    ("batch_size", pa.int32(), "number of tasks in that batch"),
    ("batch_index", pa.int32(), "this task's position in the batch"),
    ("image_path", pa.string(), "image path relative to the job folder"),
    ("image_sha256", pa.string(), "sha256 of the PNG file's bytes"),
    ("seconds", pa.float64(), "render time of the batch divided by its size"),
    ("node", pa.string(), "host name of the node that rendered it"),
    ("actor", pa.string(), "Ray actor id that rendered it"),
    ("torch_version", pa.string(), "torch version"),
    ("diffusers_version", pa.string(), "diffusers version"),
    ("farm_version", pa.string(), "farm version"),
    ("created_at", pa.timestamp("us", tz="UTC"), "when the row was made"),
    ("task_json", pa.string(), "the whole task as canonical JSON (its hash is the task id)"),
]
SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype, _ in COLUMNS])


# ---------------------------------------------------------------------------------------
# Rows: the input half is known before rendering; the actor adds the outputs.

# Task fields held as JSON text in the manifest (lists and mappings).
JSON_FIELDS = ("mix", "token_mix", "embeddings", "guidance_loss")


def json_text(value: Any) -> str:
    """A value as the manifest's JSON text: sorted keys, anything else as its str()."""
    return json.dumps(value, sort_keys=True, default=str)


def task_columns(task: RenderTask) -> dict[str, Any]:
    """The task as manifest columns: lists and mappings as JSON text, unused ones as null."""
    row = task.to_dict()
    for name in JSON_FIELDS:
        row[name] = json_text(row[name]) if row[name] else None
    row["captures"] = ",".join(row.pop("capture")) or None
    return row


def base_row(job: str, task: RenderTask, batch: Batch, index: int) -> dict[str, Any]:
    """The input half of a manifest row: everything known before rendering."""
    return {
        **task_columns(task),
        "task_id": task.task_id,
        "job": job,
        "batch_id": batch.batch_id,
        "batch_size": len(batch.tasks),
        "batch_index": index,
        "image_path": image_relpath(task.task_id),
        "farm_version": __version__,
        "created_at": datetime.now(timezone.utc),
        "task_json": task.canonical_json(),
    }


def failed_rows(job: str, batch: Batch, message: str) -> list[dict[str, Any]]:
    """A ``failed`` row with ``message`` for every task of the batch."""
    return [
        base_row(job, task, batch, i) | {"status": "failed", "error": message} for i, task in enumerate(batch.tasks)
    ]


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by column) -> a table in the manifest schema; missing keys are null."""
    rows = list(rows)
    return pa.table({name: pa.array([r.get(name) for r in rows], type=dtype) for name, dtype, _ in COLUMNS})


def write_part(job_root: str, rows: list[dict[str, Any]]) -> str:
    """Write rows as one new part file, atomically; returns its path."""
    filesystem, base = storage.open_root(job_root)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    path = storage.join(base, MANIFEST_DIR, name)
    buffer = io.BytesIO()
    pq.write_table(rows_to_table(rows), buffer)
    storage.write_bytes(filesystem, path, buffer.getvalue())
    return path


class ManifestError(FarmError, ValueError):
    """A job folder that is missing or is not one, or a bad query: one line for the user."""


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


def _list_names(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    if not storage.exists(filesystem, folder):
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(folder))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def _replaced_by(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """The part names a pending merged file replaces (kept in its Parquet metadata)."""
    with filesystem.open_input_file(path) as source:
        metadata = pq.read_metadata(source).metadata or {}
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


def _dataset_of(filesystem: pafs.FileSystem, files: list[str]) -> ds.Dataset:
    if not files:
        return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in SCHEMA}))
    return ds.dataset(files, filesystem=filesystem, format="parquet", schema=SCHEMA)


def _read(filesystem: pafs.FileSystem, base: str, read: Callable[[ds.Dataset], T]) -> T:
    """Run ``read`` over the manifest; if it fails while the files changed under it (a
    compaction deleted or renamed a file between the listing and the scan), list again and
    rerun. An error over an unchanged listing is a real one and is raised at once."""
    import duckdb

    files = _live_files(filesystem, base)
    for attempt in range(READ_ATTEMPTS):
        try:
            return read(_dataset_of(filesystem, files))
        except (OSError, ArrowException, duckdb.Error):
            fresh = _live_files(filesystem, base)
            if fresh == files or attempt == READ_ATTEMPTS - 1:
                raise
            files = fresh
    raise AssertionError("unreachable")


def dataset(job_root: str) -> ds.Dataset:
    """The manifest's files, as listed now, as one dataset (hidden temporaries and parts a
    compaction replaced are left out). Prefer ``read_manifest``/``query``, which also retry
    a read that raced a compaction."""
    filesystem, base = storage.open_root(job_root)
    return _dataset_of(filesystem, _live_files(filesystem, base))


def read_manifest(job_root: str, columns: list[str] | None = None) -> pa.Table:
    filesystem, base = storage.open_root(job_root)
    return _read(filesystem, base, lambda d: d.to_table(columns=columns))


def ok_task_ids(job_root: str) -> set[str]:
    """Ids of tasks that already have an ok image row (what a resumed run skips)."""
    done = (ds.field("status") == "ok") & ds.field("capture").is_null()
    filesystem, base = storage.open_root(job_root)
    table = _read(filesystem, base, lambda d: d.to_table(columns=["task_id"], filter=done))
    return set(table.column("task_id").to_pylist())


def has_manifest(job_root: str) -> bool:
    filesystem, base = storage.open_root(job_root)
    return storage.exists(filesystem, storage.join(base, MANIFEST_DIR))


def query(job_root: str, sql: str) -> pa.Table:
    """Run SQL over the manifest, visible as the table ``manifest``."""
    filesystem, base = storage.open_root(job_root)
    return _sql(filesystem, base, sql)


def _sql(filesystem: pafs.FileSystem, base: str, sql: str) -> pa.Table:
    import duckdb

    def run(data: ds.Dataset) -> pa.Table:
        con = duckdb.connect()
        con.register(TABLE_NAME, data)
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


# One row per job: counted over image rows (capture IS NULL) except `frames`.
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


def runs(out: str) -> pa.Table:
    """``farm runs``: one row per job folder under ``out`` (a folder with manifest/, or one a
    render has started in), sorted by name: ok and failed image rows, images (tasks with an
    ok image), captured step frames, and the first and last ``created_at``. A job with no
    rows yet shows zeros and nulls."""
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
        counts = _sql(filesystem, folder.path, RUNS_SQL).to_pylist()[0]
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

    1. Write the merged rows (all parts, sorted by ``created_at`` then ``task_id``, in the
       manifest schema) as ``_compact-<id>.parquet``, atomically (hidden temporary, then
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
    merges anything. Compacting a job with at most one part is a no-op. Run one compaction
    of a job at a time (two at once could each delete parts the other's merge skipped).
    """
    filesystem, base = open_job(job_root)
    folder = storage.join(base, MANIFEST_DIR)
    finished = _finish_pending(filesystem, folder)
    parts = [n for n in _list_names(filesystem, folder) if n.startswith(PART_PREFIX)]
    if len(parts) <= 1:
        state = "nothing to compact" if not parts else "already compacted (one part file)"
        return f"{job_root}: {state}" + (f"; finished {finished} interrupted compaction" if finished else "")
    tables = [pq.read_table(storage.join(folder, n), filesystem=filesystem, schema=SCHEMA) for n in parts]
    merged = pa.concat_tables(tables).sort_by(COMPACT_ORDER)
    merged = merged.replace_schema_metadata({REPLACES_KEY: json.dumps(parts).encode()})
    buffer = io.BytesIO()
    pq.write_table(merged, buffer)
    name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    pending = storage.join(folder, PENDING_PREFIX + name)
    storage.write_bytes(filesystem, pending, buffer.getvalue())  # the commit
    _promote(filesystem, folder, PENDING_PREFIX + name, parts)
    return f"{job_root}: merged {len(parts)} part files ({merged.num_rows} rows) into {PART_PREFIX + name}"


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
    cells = [[_cell(r[h], max_width) for h in headers] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
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


def _cell(value: Any, max_width: int) -> str:
    text = "NULL" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
    text = text.replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"
