"""Render a recorded image again and compare it with the file (``farm reproduce``).

Two entry points, plain functions without Ray; both render in this process with
``BatchRenderer`` into a temporary folder:

- ``reproduce_task(job_root, task_id, out_dir)``: from the manifest, whose reader gives each
  task image its latest row (``manifest.LATEST``: the one that describes the file). The task's
  whole recorded batch is rendered again (every ok image row with its ``batch_id``, in
  ``batch_index`` order, each task rebuilt from its row's ``task_json``), so on the same machine
  kind and dtype the bytes are identical. A task whose latest row is failed has no image to compare.
- ``reproduce_image(png_path, out_dir)``: from the PNG's own ``farm`` metadata alone. The PNG
  knows its batch's id, size and its index, not the other tasks, so it is rendered alone.

Either way the recorded render path is rebuilt: a row's ``compile_mode`` (or a PNG's ``render_path``)
loads the model compiled in that mode (``farm render --compile``), and no compile_mode loads it eager,
as it always did. Recorded versions (torch, diffusers, triton) that differ from this process's, and a
render path that could not be rebuilt as recorded, are warnings: the bytes may differ for them.

"Identical" means the re-rendered PNG's sha256 equals the sha256 of the recorded file (and,
from the manifest, the row's ``image_sha256`` too). Otherwise the decoded pixels are compared
and a diff image is written to ``out_dir``.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from farm import storage
from farm.errors import FarmError
from farm.images import decode_rgb, encode_png, read_png_metadata, sha256_bytes
from farm.layout import MANIFEST_DIR, frame_relpath, image_relpath
from farm.spec import Batch, RenderTask, SafetyCheck

# Fields of the PNG's ``farm`` chunk that describe where the image sat in its batch.
PLACEMENT_FIELDS = ("batch_id", "batch_size", "batch_index")
# What a row (or a compiled PNG's ``render_path``) records of how the pixels were computed, beyond the
# task, the model and the dtype: compared with this render's, a difference is a warning.
RECORDED_PATH_FIELDS = ("compile_mode", "channels_last", "torch_version", "diffusers_version", "triton_version")


class ReproduceError(FarmError, ValueError):
    """Bad input for ``farm reproduce``; its message is one line for the user."""


@dataclass(frozen=True)
class Comparison:
    """The outcome of rendering one recorded image again."""

    task_id: str
    image_path: str  # the recorded file
    identical: bool  # new sha256 == the file's sha256 (== the row's image_sha256, from a manifest)
    recorded_sha256: str  # the row's image_sha256 (from a PNG alone: the file's sha256)
    file_sha256: str  # sha256 of the recorded file's bytes as they are now
    new_sha256: str  # sha256 of the re-rendered PNG
    max_difference: int  # largest |new - recorded| over every channel of every pixel, 0..255
    mean_difference: float  # mean of |new - recorded| over every channel of every pixel
    diff_path: str | None  # the amplified difference image (None when the pixels are equal)
    reproduced_path: str | None  # the re-rendered PNG (None when identical)
    batch_size: int  # size of the batch rendered now
    rendered_alone: bool  # True: rendered without its batch mates (from a PNG alone)
    recorded_batch_size: int  # size of the batch recorded
    warnings: tuple[str, ...] = ()
    compile_mode: str | None = None  # the render path rebuilt (the recorded compile_mode), None: eager

    def summary(self) -> str:
        """One line for the CLI."""
        layout = "rendered alone" if self.rendered_alone else f"in its recorded batch of {self.batch_size}"
        if self.compile_mode:
            layout += f", compiled: {self.compile_mode}"
        if self.identical:
            return f"{self.task_id}: identical ({layout}, sha256 {self.new_sha256[:12]})"
        text = (
            f"{self.task_id}: different ({layout}): max pixel difference {self.max_difference}/255, "
            f"mean {self.mean_difference:.4g}"
        )
        if self.max_difference == 0:
            text += " (pixels equal; the PNG bytes differ)"
        if self.diff_path:
            text += f"; diff image {self.diff_path}"
        return text


def reproduce_task(
    job_root: str, task_id: str, out_dir: str, allow_pickle: bool = False, dtype: str | None = None
) -> Comparison:
    """Render a task's recorded batch again from the manifest and compare its image with the file.

    ``dtype`` defaults to the recorded one. Raises ``ReproduceError`` for a folder without a
    manifest, an unknown task id, a task without an ok image row, or a task that fails now.
    """
    from farm import manifest

    if not manifest.has_manifest(job_root):
        raise ReproduceError(f"{job_root}: no manifest here (expected {MANIFEST_DIR}/part-*.parquet)")
    # The task's latest row says what its image is; its batch mates come from every row written,
    # since a mate rendered again later (a resume, farm verify --repair) has a newer row in
    # another batch, and the recorded batch is what renders these bytes again.
    mine = manifest.query(job_root, f"SELECT * FROM {manifest.TABLE_NAME} WHERE {_is(task_id)} AND capture IS NULL")
    if not mine.num_rows:
        raise ReproduceError(f"task {task_id!r} is not in the manifest of {job_root}")
    row = mine.to_pylist()[0]
    if row["status"] != "ok":
        error = row["error"] or "no error recorded"
        raise ReproduceError(f"task {task_id} has no image to compare (its row is {row['status']}: {error})")
    in_batch = f"batch_id = '{row['batch_id']}' AND {manifest.OK_IMAGES}"
    mates: dict[str, dict[str, Any]] = {}
    for mate in manifest.query(job_root, f"SELECT * FROM {manifest.ALL_ROWS} WHERE {in_batch}").to_pylist():
        mates[mate["task_id"]] = _latest([mates[mate["task_id"]], mate]) if mate["task_id"] in mates else mate
    members = sorted(mates.values(), key=lambda r: r["batch_index"])
    tasks = tuple(RenderTask.from_json(r["task_json"]) for r in members)
    for r, task in zip(members, tasks, strict=True):
        if task.task_id != r["task_id"]:
            raise ReproduceError(f"task {r['task_id']}: its row's task_json does not hash to its task_id")
    warnings = []
    if [r["batch_index"] for r in members] != list(range(row["batch_size"])):
        warnings.append(
            f"the manifest holds {len(members)} of the {row['batch_size']} tasks of batch {row['batch_id']}; "
            "rendered with those, so the bytes may differ"
        )

    filesystem, base = storage.open_root(job_root)
    path = storage.join(base, row["image_path"])
    try:
        recorded = storage.read_bytes(filesystem, path)
    except (OSError, FileNotFoundError) as exc:
        raise ReproduceError(f"{path}: cannot read the recorded image ({exc})") from exc

    new = _render(
        Batch(row["batch_id"], tasks),
        task_id,
        image_relpath(task_id),
        dtype or row["dtype"],
        allow_pickle,
        row["model_config"],
        warnings,
        recorded_hash=row["model_hash"],
        recorded_device=row["device"],
        job_root=job_root,
        safety_check=recorded_safety_check(recorded),
        recorded_path={name: row.get(name) for name in RECORDED_PATH_FIELDS},
    )
    return _compare(
        task_id,
        path,
        recorded,
        new,
        out_dir,
        recorded_sha256=row["image_sha256"],
        batch_size=len(tasks),
        rendered_alone=False,
        recorded_batch_size=row["batch_size"],
        warnings=warnings,
        compile_mode=row.get("compile_mode"),
    )


def reproduce_image(
    png_path: str,
    out_dir: str,
    allow_pickle: bool = False,
    model_config: str | None = None,
    dtype: str | None = None,
) -> Comparison:
    """Render an image again from nothing but its PNG's ``farm`` metadata and compare.

    The PNG holds its task and its placement (batch id, size, index) but not the other tasks of
    its batch, so the task is rendered alone. Rendered alone, an image may differ from its
    batch render by the small tolerance docs/reproducibility.md states from measurement (at most 1/255 in
    a channel on ``tiny``, float32, CPU); only an image recorded in a batch of one is expected
    to be identical. So that a different placement does not by itself change the bytes, the
    new pixels are encoded with the recorded placement fields (``batch_id``, ``batch_size``,
    ``batch_index``) in the metadata; everything else (model hash, dtype, scheduler config) is
    what this render produced. A captured step frame (``capture``/``step_index`` in its
    metadata) is compared with the same frame of the new render. A compiled image's PNG holds its
    ``render_path`` (compile_mode, channels_last, versions): the model loads compiled the same way.

    ``dtype`` defaults to the recorded one; ``model_config`` is the job's ``model_config`` (the
    PNG does not hold it; only single-file checkpoints need it).
    """
    try:
        recorded = Path(png_path).read_bytes()
    except OSError as exc:
        raise ReproduceError(f"{png_path}: {exc.strerror or exc}") from exc
    try:
        meta = read_png_metadata(recorded)
    except ValueError as exc:  # no farm chunk, or bad JSON in it
        raise ReproduceError(f"{png_path}: {exc}; farm reproduce needs a PNG written by farm") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a file that is no PNG
        raise ReproduceError(f"{png_path}: not a readable PNG ({exc})") from exc
    try:
        task = RenderTask.from_dict(meta["task"])
        recorded_batch_size = int(meta["batch_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ReproduceError(f"{png_path}: its farm metadata is incomplete ({exc})") from exc
    if task.task_id != meta.get("task_id"):
        raise ReproduceError(f"{png_path}: its farm metadata's task does not hash to its task_id")
    path = meta.get("render_path") or {}  # only a compiled image's PNG has one
    if not isinstance(path, dict):
        raise ReproduceError(f"{png_path}: its farm metadata's render_path is not an object")
    capture = meta.get("capture")
    relpath = (
        image_relpath(task.task_id) if capture is None else frame_relpath(task.task_id, capture, meta["step_index"])
    )

    warnings: list[str] = []
    new = _render(
        Batch.of([task]),
        task.task_id,
        relpath,
        dtype or meta.get("dtype") or "auto",
        allow_pickle,
        model_config,
        warnings,
        recorded_hash=meta.get("model_hash"),
        recorded_device=None,
        # A chained animation frame reads the frames it names from its own job folder.
        job_root=str(Path(png_path).resolve().parent.parent) if capture is None else None,
        safety_check=recorded_safety_check(recorded),
        recorded_path={name: path.get(name) for name in RECORDED_PATH_FIELDS},
    )
    if recorded_batch_size != 1:
        new_meta = read_png_metadata(new)
        new_meta.update({k: meta[k] for k in PLACEMENT_FIELDS if k in meta})
        new = encode_png(decode_rgb(new), new_meta)
    return _compare(
        task.task_id,
        str(png_path),
        recorded,
        new,
        out_dir,
        recorded_sha256=sha256_bytes(recorded),
        batch_size=1,
        rendered_alone=True,
        recorded_batch_size=recorded_batch_size,
        warnings=warnings,
        compile_mode=path.get("compile_mode"),
    )


def _render(
    batch: Batch,
    task_id: str,
    relpath: str,
    dtype: str,
    allow_pickle: bool,
    model_config: str | None,
    warnings: list[str],
    recorded_hash: str | None,
    recorded_device: str | None,
    job_root: str | None = None,
    safety_check: SafetyCheck | None = None,
    recorded_path: dict[str, Any] | None = None,
) -> bytes:
    """Render a batch in this process into a temporary folder; the bytes of task_id's PNG at relpath.

    The images a chained animation frame reads (the frame before, frame 0's colours) are
    copied in from ``job_root`` first. ``recorded_path`` (RECORDED_PATH_FIELDS, None where not
    recorded): its compile_mode is the render path to rebuild (None: eager).
    """
    import torch

    from farm.actor import BatchRenderer
    from farm.models import ModelError, pick_device, render_path

    device = pick_device()
    threads = torch.get_num_threads()
    recorded = recorded_path or {}
    try:
        with tempfile.TemporaryDirectory(prefix="farm-reproduce-") as folder:
            # CPU actors run one torch thread (docs/reproducibility.md); GPU actors keep the default.
            model = batch.tasks[0].model
            try:
                renderer = BatchRenderer(
                    "reproduce",
                    folder,
                    model,
                    dtype,
                    allow_pickle,
                    model_config,
                    1 if device == "cpu" else None,
                    safety_check,
                    compile=recorded.get("compile_mode") or False,
                )
            except ModelError as exc:  # its message names the model already
                raise ReproduceError(str(exc)) from exc
            warnings.extend(path_warnings(recorded, render_path(renderer.components)))
            info = renderer.info()
            if recorded_hash and info["model_hash"] != recorded_hash:
                warnings.append(
                    f"the model {model!r} now hashes to {info['model_hash'][:12]}, "
                    f"recorded {recorded_hash[:12]}: it is not the model that rendered the image"
                )
            if recorded_device and recorded_device != info["device"]:
                warnings.append(
                    f"recorded on {recorded_device}, rendered now on {info['device']}: "
                    "bytes match only on the same machine kind"
                )
            copy_inputs(batch, job_root, folder)
            rows = renderer.render(batch)
            failed = [r for r in rows if r["task_id"] == task_id and r["status"] != "ok"]
            if failed:
                raise ReproduceError(f"task {task_id} failed to render again: {failed[0]['error']}")
            return Path(folder, relpath).read_bytes()
    finally:
        torch.set_num_threads(threads)


def path_warnings(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """A line for each recorded render-path field (RECORDED_PATH_FIELDS) that this render does not
    match: other versions of torch, diffusers or triton, or a render path not rebuilt as recorded."""
    import diffusers

    now = now | {"diffusers_version": diffusers.__version__}
    lines = []
    for name in ("torch_version", "diffusers_version", "triton_version"):
        then, current = recorded.get(name), now.get(name)
        if then and then != current:
            library = name.removesuffix("_version")
            now_with = f"{library} {current}" if current else f"no {library}"
            lines.append(
                f"recorded with {library} {then}, rendered now with {now_with}: "
                "its kernels may compute other floats, so the bytes may differ"
            )
    for name in ("compile_mode", "channels_last"):
        then, current = recorded.get(name), now.get(name)
        if then is not None and then != current:
            lines.append(f"recorded with {name} {then}, rendered now with {current}: another render path")
    return lines


def recorded_safety_check(png: bytes) -> SafetyCheck | None:
    """The safety check an image was rendered under, from its PNG (None: none ran), so the new
    render is checked (and a flagged one blurred) as the recorded one was."""
    try:
        recorded = read_png_metadata(png).get("safety_check")
        return None if recorded is None else SafetyCheck(**recorded)
    except (ValueError, TypeError):  # no farm chunk, or not the fields SafetyCheck has
        return None


def copy_inputs(batch: Batch, job_root: str | None, folder: str) -> None:
    """Copy the job images that the batch's chained frames read into ``folder``."""
    names = {i for t in batch.tasks for i in (t.previous, t.color_reference) if i}
    if not names:
        return
    if job_root is None:
        raise ReproduceError("a chained animation frame needs its job folder (the frames it blends in)")
    filesystem, base = storage.open_root(job_root)
    for task_id in sorted(names):
        try:
            data = storage.read_bytes(filesystem, storage.join(base, image_relpath(task_id)))
        except (OSError, FileNotFoundError) as exc:
            raise ReproduceError(f"the frame {task_id} that this frame blends in is missing ({exc})") from exc
        Path(folder, image_relpath(task_id)).parent.mkdir(parents=True, exist_ok=True)
        Path(folder, image_relpath(task_id)).write_bytes(data)


def _compare(
    task_id: str,
    path: str,
    recorded: bytes,
    new: bytes,
    out_dir: str,
    *,
    recorded_sha256: str,
    batch_size: int,
    rendered_alone: bool,
    recorded_batch_size: int,
    warnings: list[str],
    compile_mode: str | None = None,
) -> Comparison:
    file_sha = sha256_bytes(recorded)
    new_sha = sha256_bytes(new)
    if file_sha != recorded_sha256:
        warnings.append(
            f"the file {path} changed since it was recorded (sha256 {file_sha[:12]}, manifest {recorded_sha256[:12]})"
        )
    identical = new_sha == file_sha == recorded_sha256
    max_diff, mean_diff, diff_path, reproduced_path = 0, 0.0, None, None
    if not identical:
        try:
            old_pixels = decode_rgb(recorded)
        except Exception as exc:  # noqa: BLE001 - the recorded file may be anything now
            old_pixels = None
            warnings.append(f"the recorded file is not a readable image ({exc})")
        new_pixels = decode_rgb(new)
        os.makedirs(out_dir, exist_ok=True)
        reproduced_path = os.path.join(out_dir, f"{task_id}.reproduced.png")
        Path(reproduced_path).write_bytes(new)
        if old_pixels is None or old_pixels.shape != new_pixels.shape:
            if old_pixels is not None:
                warnings.append(f"sizes differ: recorded {old_pixels.shape[1::-1]}, new {new_pixels.shape[1::-1]}")
            max_diff, mean_diff = 255, 255.0
        else:
            diff = np.abs(old_pixels.astype(np.int16) - new_pixels.astype(np.int16)).astype(np.uint8)
            max_diff, mean_diff = int(diff.max()), float(diff.mean())
            if max_diff:
                diff_path = os.path.join(out_dir, f"{task_id}.diff.png")
                Path(diff_path).write_bytes(diff_image(diff))
    return Comparison(
        task_id=task_id,
        image_path=path,
        identical=identical,
        recorded_sha256=recorded_sha256,
        file_sha256=file_sha,
        new_sha256=new_sha,
        max_difference=max_diff,
        mean_difference=mean_diff,
        diff_path=diff_path,
        reproduced_path=reproduced_path,
        batch_size=batch_size,
        rendered_alone=rendered_alone,
        recorded_batch_size=recorded_batch_size,
        warnings=tuple(warnings),
        compile_mode=compile_mode,
    )


def diff_image(diff: np.ndarray) -> bytes:
    """The absolute per-channel difference as a PNG, stretched linearly so the largest
    difference is 255 (white) and equal pixels are 0 (black): a difference of 1 is visible."""
    from PIL import Image

    peak = int(diff.max())
    scaled = diff if peak == 0 else np.round(diff.astype(np.float32) * (255.0 / peak)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(scaled, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _created(row: dict[str, Any]) -> Any:
    return (row["created_at"] is not None, row["created_at"])


def _is(task_id: str) -> str:
    """SQL for "task_id is this one", the id quoted as an SQL string (it comes from the command line)."""
    quoted = task_id.replace("'", "''")
    return f"task_id = '{quoted}'"


def _latest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=_created)
