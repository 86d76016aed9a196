"""The manifest's columns: one Arrow schema, and the row made from a task (its input half).

Every row is a recipe: it holds every input needed to render its image again, and the
outputs (path, sha256, status) the actor adds. ``farm.manifest`` writes and reads the rows
(and re-exports these names); this module knows no files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from farm import __version__
from farm.layout import image_relpath
from farm.spec import SCHEDULERS, Batch, RenderTask

# Column -> (type, description). The column table in docs/manifest.md is generated from this list.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("task_id", pa.string(), "hash of the task's canonical JSON; the image file is images/<task_id>.png"),
    ("job", pa.string(), "job name"),
    ("status", pa.string(), "ok, failed, or withheld (flagged by the safety checker; no image written)"),
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
    ("flow", pa.string(), "chained frame: the optical flow its previous image was warped along (farneback, dis)"),
    ("flow_from", pa.string(), "chained frame with flow: the source frame before, where the flow starts, else null"),
    ("motion", pa.list_(pa.float64()), "2D-motion frame: [zoom, angle, x, y] that moves the frame before"),
    ("flow_config", pa.string(), "chained frame with flow: the flow method's parameters as JSON, else null"),
    (
        "schedule_type",
        pa.string(),
        "sigma spacing as A1111 names it: automatic (the sampler's own), karras, exponential",
    ),
    (
        "clip_skip",
        pa.int32(),
        "CLIP layer the prompt is read from (1: the last, A1111's convention); null: the family's",
    ),
    ("loras", pa.string(), "LoRA adapters as JSON [{path, sha256, weight}, ...], else null"),
    ("original_size", pa.list_(pa.int32()), "SDXL micro-conditioning [height, width] of the original image, else null"),
    ("target_size", pa.list_(pa.int32()), "SDXL micro-conditioning [height, width] of the target image, else null"),
    ("crops_coords_top_left", pa.list_(pa.int32()), "SDXL micro-conditioning crop [top, left], else null"),
    (
        "controlnet",
        pa.string(),
        "ControlNets as JSON [{model, image, image_sha256, preprocess, scale, start, end, ...}]",
    ),
    ("model", pa.string(), "model reference as written in the job"),
    ("model_family", pa.string(), "the model's family: sd1, sd2 (SD 2.x) or sdxl"),
    ("model_hash", pa.string(), "sha256 over the model's files"),
    ("model_config", pa.string(), "the job's model_config (configs for a single-file checkpoint), else null"),
    ("dtype", pa.string(), "torch dtype of the model (float32, float16, bfloat16)"),
    ("device", pa.string(), "torch device type (cpu, cuda)"),
    ("nsfw", pa.bool_(), "the safety checker's verdict (job field safety_check); null when the job ran none"),
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
    ("compile_mode", pa.string(), "torch.compile mode (--compile: default; aot_eager: that backend), else null: eager"),
    ("channels_last", pa.bool_(), "whether the UNet and VAE ran in channels_last memory format (--compile)"),
    ("triton_version", pa.string(), "triton version where a compiled path used it, else null"),
    ("gpu_name", pa.string(), "the GPU's model name (torch.cuda.get_device_name), else null"),
    ("cuda_version", pa.string(), "CUDA version torch was built with, on a GPU, else null"),
    ("cudnn_version", pa.string(), "cuDNN version, on a GPU, else null"),
    ("farm_version", pa.string(), "farm version"),
    ("created_at", pa.timestamp("us", tz="UTC"), "when the row was made"),
    ("task_json", pa.string(), "the whole task as canonical JSON (its hash is the task id)"),
]
SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype, _ in COLUMNS])


# ---------------------------------------------------------------------------------------
# Rows: the input half is known before rendering; the actor adds the outputs.

# Task fields held as JSON text in the manifest (lists and mappings).
JSON_FIELDS = ("mix", "token_mix", "embeddings", "guidance_loss", "loras", "controlnet")


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


def table_to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes: how an actor sends its rows. Ray's own pickling of a
    table costs the driver tens of microseconds a row to undo; reading IPC bytes, about one."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_ipc(data: bytes) -> pa.Table:
    """The table ``table_to_ipc`` wrote."""
    return pa.ipc.open_stream(data).read_all()


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by column) -> a table in the manifest schema; missing keys are null."""
    # Arrow walks the dicts in C: about 2.5x faster than a Python list per column, which counts
    # when the driver writes tens of thousands of rows a second (benchmarks/driver_ceiling.py).
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)
