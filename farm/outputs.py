"""A rendered batch's outputs, written for the actor: each image (and captured step frame) as a
PNG carrying its recipe, straight to the job's file system, and the ``ok`` rows they produce.

Image files first, their rows after (DESIGN.md, "Nothing lost, nothing twice"): the rows come
back to the caller, which hands them on only once every file of the batch is written.
``plan_outputs`` makes a batch's rows and the list of its PNG writes, touching no file;
``PngWrites`` performs them, one after the other or in a thread pool (a GPU actor encodes a
batch's PNGs there while the next batch denoises), each filling its row's sha256.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from farm import storage
from farm.images import blur, encode_png, sha256_bytes
from farm.layout import frame_relpath
from farm.loras import a1111_lora_hashes
from farm.manifest import base_row, json_text
from farm.motion import FLOW_PARAMS
from farm.spec import Batch, SafetyCheck

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

    from farm.render import RenderResult


@dataclass(frozen=True)
class Verdicts:
    """The safety checker's verdict on each image of a batch (True: flagged) and the job's action."""

    flagged: list[bool]
    check: SafetyCheck  # the job's: the action on a flagged image, and whose checker ran


@dataclass(frozen=True)
class Producer:
    """What rendered a batch: the output columns every ok row of an actor shares."""

    model_hash: str
    model_family: str
    dtype: str
    device: str
    model_config: str | None
    node: str
    actor: str
    torch_version: str
    diffusers_version: str
    # The render path and the GPU (models.render_path): manifest columns of their own; a compiled
    # path's also goes into the PNG, since it changes the bytes and farm reproduce must rebuild it.
    render_path: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class PngWrite:
    """One PNG a batch writes: the pixels (through ``cover`` first) with their metadata at ``relpath``;
    its sha256 goes into ``row["image_sha256"]``."""

    row: dict[str, Any]
    relpath: str
    pixels: np.ndarray
    meta: dict[str, Any]
    cover: Callable[[np.ndarray], np.ndarray] | None = None


def write_outputs(
    filesystem: FileSystem,
    base: str,
    job: str,
    batch: Batch,
    result: RenderResult,
    seconds: float,
    producer: Producer,
    verdicts: Verdicts | None = None,
) -> list[dict[str, Any]]:
    """Write every image and captured frame of a rendered batch, one after the other, and return their
    rows (``plan_outputs``). The first write that fails raises; the writes after it are not tried."""
    rows, writes = plan_outputs(job, batch, result, seconds, producer, verdicts)
    PngWrites(filesystem, base).add(writes)
    return rows


def plan_outputs(
    job: str,
    batch: Batch,
    result: RenderResult,
    seconds: float,
    producer: Producer,
    verdicts: Verdicts | None = None,
) -> tuple[list[dict[str, Any]], list[PngWrite]]:
    """The rows of a rendered batch's images and captured frames (frames' rows carry ``capture`` and
    ``step_index``), and the PNG writes that fill their ``image_sha256``, in the order they are
    written: each image, then its frames. ``seconds`` is the render time per image.

    No file is touched here, and the rows are not done until every write has set its sha256: the
    caller hands them on only then (image files first, their rows after).

    With ``verdicts`` (the job's safety check), rows record ``nsfw``; a flagged image and its
    frames are blurred, or withheld: nothing written, a ``withheld`` row without an image path.
    """
    outputs = {
        "status": "ok",
        "model_hash": producer.model_hash,
        "model_family": producer.model_family,
        "dtype": producer.dtype,
        "device": producer.device,
        "scheduler_config": json_text(result.scheduler_config),
        "seconds": seconds,
        "model_config": producer.model_config,
        "node": producer.node,
        "actor": producer.actor,
        "torch_version": producer.torch_version,
        "diffusers_version": producer.diffusers_version,
        **producer.render_path,
    }
    rows: list[dict[str, Any]] = []
    writes: list[PngWrite] = []
    for index, task in enumerate(batch.tasks):
        row = base_row(job, task, batch, index) | outputs
        row.update(prompt_tokens=result.prompt_tokens[index], prompt_truncated=result.prompt_truncated[index])
        meta = {
            "task": json.loads(task.canonical_json()),
            "task_id": task.task_id,
            "batch_id": batch.batch_id,
            "batch_size": len(batch.tasks),
            "batch_index": index,
            "model_hash": producer.model_hash,
            "dtype": producer.dtype,
            "scheduler_config": result.scheduler_config,
        }
        if producer.render_path.get("compile_mode"):  # eager PNGs keep the bytes they always had
            meta["render_path"] = producer.render_path
        if task.loras:
            meta["lora_hashes"] = a1111_lora_hashes(task.loras)
        if task.flow:
            row["flow_config"] = json_text(FLOW_PARAMS[task.flow])
        flagged = verdicts is not None and verdicts.flagged[index]
        if verdicts is not None:  # the PNG says how it was checked, so farm reproduce checks it again
            row["nsfw"] = flagged
            meta.update(nsfw=flagged, safety_check=dataclasses.asdict(verdicts.check))
        if flagged and verdicts.check.action == "withhold":
            rows.append(row | {"status": "withheld", "image_path": None})
            continue
        cover = blur if flagged and verdicts.check.action == "blur" else None
        row["image_sha256"] = None  # set by its write (the key keeps its place among the columns)
        writes.append(PngWrite(row, row["image_path"], result.images[index], meta, cover))
        rows.append(row)
        for kind, frames in result.frames.items():
            for step_index, pixels in enumerate(frames[:, index]):
                path = frame_relpath(task.task_id, kind, step_index)
                step_meta = meta | {"capture": kind, "step_index": step_index}
                frame_row = row | {"capture": kind, "step_index": step_index, "image_path": path, "image_sha256": None}
                writes.append(PngWrite(frame_row, path, pixels, step_meta, cover))
                rows.append(frame_row)
    return rows, writes


class PngWrites:
    """A batch's PNG writes: each written as it is added (no ``pool``: one after the other, in the
    caller's thread), or handed to ``pool``, whose threads encode and write them while the caller
    goes on. A write sets its row's sha256 once its file is written; hand the rows on only after
    ``wait()``.

    ``wait`` returns once every write is done, or raises the error of the first write (in the
    order they were added) that failed, as writing them one after the other would have: an image
    that failed raises its error even if one after it failed sooner. The writes not yet started
    are then dropped and the running ones finished first, so nothing is still writing once it
    raises (a crash leaves at most images without rows, never rows without images).
    """

    def __init__(self, filesystem: FileSystem, base: str, pool: Executor | None = None) -> None:
        self.filesystem = filesystem
        self.base = base
        self.pool = pool
        self.pending: list[tuple[PngWrite, Future[str]]] = []

    def add(self, writes: list[PngWrite]) -> None:
        """Write (no pool; the first that fails raises, the rest are not tried) or start writing ``writes``."""
        for write in writes:
            args = (self.filesystem, self.base, write.relpath, write.pixels, write.meta, write.cover)
            if self.pool is None:
                write.row["image_sha256"] = write_png(*args)
            else:
                self.pending.append((write, self.pool.submit(write_png, *args)))

    def wait(self) -> None:
        """Once every write added is written; raises the first one's error (in order) that failed."""
        try:
            for write, future in self.pending:
                write.row["image_sha256"] = future.result()
        except BaseException:
            self.abandon()
            raise
        self.pending = []

    def abandon(self) -> None:
        """Drop the writes not started and wait for the running ones to end (their errors are not
        raised: the caller is raising its own)."""
        for _, future in self.pending:
            future.cancel()
        wait_futures([future for _, future in self.pending])
        self.pending = []


def write_png(
    filesystem: FileSystem,
    base: str,
    relpath: str,
    pixels: np.ndarray,
    meta: dict[str, Any],
    cover: Callable[[np.ndarray], np.ndarray] | None = None,
) -> str:
    """Encode pixels (through ``cover`` first, e.g. the safety blur) with their metadata as a PNG at
    ``relpath`` under ``base``; its sha256."""
    data = encode_png(pixels if cover is None else cover(pixels), meta)
    storage.write_bytes(filesystem, storage.join(base, relpath), data)
    return sha256_bytes(data)
