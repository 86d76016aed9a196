"""The manifest: one Arrow schema, part files written atomically, read as one dataset, SQL via DuckDB.

Every row is a recipe: it holds every input needed to render its image again, and the
outputs (path, sha256, status). Part files are never rewritten; a resumed run adds new ones.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from farm import storage

MANIFEST_DIR = "manifest"
TABLE_NAME = "manifest"

# Column -> (type, description). The README's manifest table is generated from this list.
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
    ("scheduler", pa.string(), "scheduler name (ddim, pndm, lms, euler, euler_a, heun, dpmpp_2m)"),
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


def dataset(job_root: str) -> ds.Dataset:
    """All part files of a job as one dataset (hidden temporary files are ignored)."""
    filesystem, base = storage.open_root(job_root)
    folder = storage.join(base, MANIFEST_DIR)
    if not storage.exists(filesystem, folder):
        return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in SCHEMA}))
    return ds.dataset(folder, filesystem=filesystem, format="parquet", schema=SCHEMA)


def read_manifest(job_root: str, columns: list[str] | None = None) -> pa.Table:
    return dataset(job_root).to_table(columns=columns)


def ok_task_ids(job_root: str) -> set[str]:
    """Ids of tasks that already have an ok image row (what a resumed run skips)."""
    done = (ds.field("status") == "ok") & ds.field("capture").is_null()
    table = dataset(job_root).to_table(columns=["task_id"], filter=done)
    return set(table.column("task_id").to_pylist())


def has_manifest(job_root: str) -> bool:
    filesystem, base = storage.open_root(job_root)
    return storage.exists(filesystem, storage.join(base, MANIFEST_DIR))


def query(job_root: str, sql: str) -> pa.Table:
    """Run SQL over the manifest, visible as the table ``manifest``."""
    import duckdb

    con = duckdb.connect()
    con.register(TABLE_NAME, dataset(job_root))
    relation = con.sql(sql)
    if relation is None:  # a statement that returns nothing (SET, CREATE ...)
        return pa.table({})
    # duckdb 2 renamed arrow() (a table in 1.x) to to_arrow_table().
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


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
