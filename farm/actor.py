"""The render actor: the model stack loaded once, a batch in, images written, rows out.

``BatchRenderer`` is a plain class, testable without Ray; the driver wraps it with
``ray.remote``. Torch and diffusers are imported inside it, so importing this module (as
the driver does) stays light.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

from farm import __version__, metrics, storage
from farm.images import encode_png, sha256_bytes
from farm.spec import Batch, Embedding, RenderTask

IMAGES_DIR = "images"
# Step captures: frames/<task_id>/<kind>-<step>.png, one row each (README, "Step capture").
FRAMES_DIR = "frames"
# Task fields held as JSON text in the manifest (lists and mappings).
JSON_FIELDS = ("mix", "token_mix", "embeddings", "guidance_loss")


def image_relpath(task_id: str) -> str:
    """Output file names come from task ids, never from prompts (DESIGN.md, safety)."""
    return f"{IMAGES_DIR}/{task_id}.png"


def frame_relpath(task_id: str, kind: str, step_index: int) -> str:
    return f"{FRAMES_DIR}/{task_id}/{kind}-{step_index:04d}.png"


def task_columns(task: RenderTask) -> dict[str, Any]:
    """The task as manifest columns: lists and mappings as JSON text, unused ones as null."""
    row = task.to_dict()
    for name in JSON_FIELDS:
        row[name] = _json(row[name]) if row[name] else None
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


def configure_torch(threads: int | None) -> None:
    """Deterministic kernels and a fixed thread count, before any model is built."""
    # cuBLAS needs this workspace setting for deterministic GEMMs; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if torch.cuda.is_available():
        # warn_only: an op without a deterministic CUDA kernel warns instead of failing the job.
        torch.use_deterministic_algorithms(True, warn_only=True)


class BatchRenderer:
    """Holds one loaded model stack and renders batches of tasks into a job folder."""

    def __init__(
        self,
        job: str,
        job_root: str,
        dtype: str = "auto",
        allow_pickle: bool = False,
        model_config: str | None = None,
        threads: int | None = None,
    ) -> None:
        configure_torch(threads)
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        self.job = job
        self.job_root = job_root
        self.filesystem, self.base = storage.open_root(job_root)
        self.requested_dtype = dtype
        self.allow_pickle = allow_pickle
        self.model_config = model_config
        self.node = socket.gethostname()
        self.actor_id = _actor_id()
        self.model_ref: str | None = None
        self.components: Any = None

    def load(self, model_ref: str) -> dict[str, Any]:
        """Load a model (once; a batch for another model swaps it)."""
        if model_ref != self.model_ref:
            from farm import models

            # Free the old model before loading the new one; if the load fails, the next
            # batch tries again instead of finding half a state.
            self.components = None
            self.model_ref = None
            resolved = models.resolve_model(model_ref, self.allow_pickle, self.model_config)
            device = models.pick_device()
            self.components = models.load_components(resolved, device, models.pick_dtype(device, self.requested_dtype))
            self.model_ref = model_ref
        return self.info()

    def ready(self) -> bool:
        """Answers once the actor is up (the driver asks a restarted actor before giving it work)."""
        return True

    def info(self) -> dict[str, Any]:
        c = self.components
        return {
            "node": self.node,
            "actor": self.actor_id,
            "device": c.device,
            "dtype": c.dtype,
            "model_hash": c.model_hash,
        }

    def check_inputs(self, embedding_sets: list[tuple[Embedding, ...]], loss_names: list[str]) -> list[str]:
        """Problems with inputs a whole job shares (textual-inversion files, custom losses), checked
        against the loaded model before any batch runs, so they end the job with one clear line."""
        from farm.losses import load_loss
        from farm.text import PromptEncoder, PromptError

        problems = []
        for embeddings in embedding_sets:
            try:
                PromptEncoder(self.components, embeddings)
            except PromptError as exc:
                problems.append(str(exc))
        for name in loss_names:
            try:
                load_loss(name)
            except ValueError as exc:
                problems.append(str(exc))
        return problems

    def render(self, batch: Batch, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Render one batch, write each PNG (and captured frames), and return the manifest rows.

        A task whose inputs cannot be used (an unreadable init image, a prompt the model
        cannot encode) gets a failed row with its error; the rest of the batch renders. Out
        of GPU memory, the batch is split in halves and each rendered on its own. Either way
        rows record the batch actually rendered (its own ``batch_id``, size and index).
        Tasks in ``skip`` (already done) are neither rendered nor written.
        """
        self.load(batch.tasks[0].model)
        start = time.perf_counter()
        todo = [t for t in batch.tasks if t.task_id not in skip]
        errors: dict[str, str] = {}
        init_images = {t.task_id: self.read_init_image(t, errors) for t in todo if t.init_image}
        rendered = self.render_tasks(todo, init_images, errors)
        rows = [
            base_row(self.job, task, batch, i) | {"status": "failed", "error": errors[task.task_id]}
            for i, task in enumerate(batch.tasks)
            if task.task_id in errors
        ]
        for part, result, seconds in rendered:
            rows += self.write_outputs(part, result, seconds)
        metrics.record_batch(self.job, self.actor_id, rows, time.perf_counter() - start)
        return rows

    def render_tasks(
        self, tasks: list[RenderTask], init_images: dict[str, Any], errors: dict[str, str]
    ) -> list[tuple[Batch, Any, float]]:
        """Render tasks as one batch -> [(batch rendered, result, seconds per image)].

        Tasks with unusable inputs are noted in ``errors`` and dropped; out of memory, the
        batch is halved (each half keeps its order, so the split is the same every time).
        """
        import torch

        from farm.render import TaskInputError, render_batch

        while True:
            live = [t for t in tasks if t.task_id not in errors]
            if not live:
                return []
            start = time.perf_counter()
            try:
                result = render_batch(self.components, live, [init_images.get(t.task_id) for t in live])
                return [(Batch.of(live), result, (time.perf_counter() - start) / len(live))]
            except TaskInputError as exc:  # raised before denoising: drop those tasks and go again
                errors.update({live[i].task_id: message for i, message in exc.errors.items()})
                continue
            except torch.OutOfMemoryError:
                pass
            # Out of memory. Past the except block, the error's traceback (and the tensors its
            # frames hold) is gone, so the memory can be given back before the smaller retry.
            free_device_memory()
            if len(live) == 1:
                errors[live[0].task_id] = f"out of {self.components.device} memory rendering this task alone"
                return []
            half = (len(live) + 1) // 2
            return self.render_tasks(live[:half], init_images, errors) + self.render_tasks(
                live[half:], init_images, errors
            )

    def read_init_image(self, task: RenderTask, errors: dict[str, str]) -> Any:
        """The task's init image fitted to its size, or None with the error noted.

        A chained animation frame's init image is its source frame blended with the frame
        rendered before it, then matched to frame 0's colours (README, "Animation").
        """
        from farm.images import fit_image

        try:
            with open(task.init_image, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
            if sha256_bytes(data) != task.init_image_sha256:
                raise ValueError("the file changed since the job was read (its sha256 differs); rerun the job")
            image = fit_image(data, task.width, task.height)
        except (OSError, ValueError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            errors[task.task_id] = f"init_image: {task.init_image}: {message}"
            return None
        if task.previous is None:
            return image
        return self.chain_init_image(task, image, errors)

    def chain_init_image(self, task: RenderTask, source: Any, errors: dict[str, str]) -> Any:
        """``source`` blended with the previous frame's image, then matched to the reference's colours."""
        from farm.video import blend_images, match_colors

        try:
            image = blend_images(source, self.read_output(task.previous, task), task.blend)  # type: ignore[arg-type]
            if task.color_reference:
                image = match_colors(image, self.read_output(task.color_reference, task))
            return image
        except (OSError, ValueError) as exc:
            errors[task.task_id] = str(exc)
            return None

    def read_output(self, task_id: str, task: RenderTask) -> Any:
        """The image another task of this job wrote (a chained frame reads the one before it)."""
        from farm.images import decode_rgb

        path = storage.join(self.base, image_relpath(task_id))
        try:
            data = storage.read_bytes(self.filesystem, path)
        except (OSError, FileNotFoundError) as exc:
            raise ValueError(f"frame {task.frame}: the image of {task_id} is missing (did that frame fail?)") from exc
        pixels = decode_rgb(data)
        if pixels.shape[:2] != (task.height, task.width):
            raise ValueError(f"frame {task.frame}: {task_id}'s image is {pixels.shape[1]}x{pixels.shape[0]}")
        return pixels

    def write_outputs(self, batch: Batch, result: Any, seconds: float) -> list[dict[str, Any]]:
        """Write every image and captured frame, and return their rows (frames' rows carry ``capture``)."""
        import diffusers
        import torch

        c = self.components
        outputs = {
            "status": "ok",
            "model_hash": c.model_hash,
            "dtype": c.dtype,
            "device": c.device,
            "scheduler_config": _json(result.scheduler_config),
            "seconds": seconds,
            "model_config": self.model_config,
            "node": self.node,
            "actor": self.actor_id,
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
        }
        rows = []
        for index, task in enumerate(batch.tasks):
            row = base_row(self.job, task, batch, index) | outputs
            row.update(prompt_tokens=result.prompt_tokens[index], prompt_truncated=result.prompt_truncated[index])
            meta = {
                "task": json.loads(task.canonical_json()),
                "task_id": task.task_id,
                "batch_id": batch.batch_id,
                "batch_size": len(batch.tasks),
                "batch_index": index,
                "model_hash": c.model_hash,
                "dtype": c.dtype,
                "scheduler_config": result.scheduler_config,
            }
            row["image_sha256"] = self.write_png(row["image_path"], result.images[index], meta)
            rows.append(row)
            for kind, frames in result.frames.items():
                for step_index, pixels in enumerate(frames[:, index]):
                    path = frame_relpath(task.task_id, kind, step_index)
                    sha = self.write_png(path, pixels, meta | {"capture": kind, "step_index": step_index})
                    rows.append(
                        row | {"capture": kind, "step_index": step_index, "image_path": path, "image_sha256": sha}
                    )
        return rows

    def write_png(self, relpath: str, pixels: Any, meta: dict[str, Any]) -> str:
        data = encode_png(pixels, meta)
        storage.write_bytes(self.filesystem, storage.join(self.base, relpath), data)
        return sha256_bytes(data)


def free_device_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error, before a smaller retry."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _actor_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            actor = ray.get_runtime_context().get_actor_id()
            if actor:
                return actor
    except Exception:  # noqa: BLE001 - outside Ray there is simply no actor id
        pass
    return f"local-{os.getpid()}"
