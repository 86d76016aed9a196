"""The render actor: the model stack loaded once, a batch in, images written, rows out.

``BatchRenderer`` is a plain class, testable without Ray; the driver wraps it with
``ray.remote``. Torch and diffusers are imported inside it, so importing this module (as
the driver does) stays light.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

from farm import __version__, storage
from farm.images import encode_png, sha256_bytes
from farm.spec import Batch, RenderTask

IMAGES_DIR = "images"


def image_relpath(task_id: str) -> str:
    """Output file names come from task ids, never from prompts (DESIGN.md, safety)."""
    return f"{IMAGES_DIR}/{task_id}.png"


def base_row(job: str, task: RenderTask, batch: Batch, index: int) -> dict[str, Any]:
    """The input half of a manifest row: everything known before rendering."""
    return {
        **task.to_dict(),
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

    def info(self) -> dict[str, Any]:
        c = self.components
        return {
            "node": self.node,
            "actor": self.actor_id,
            "device": c.device,
            "dtype": c.dtype,
            "model_hash": c.model_hash,
        }

    def render(self, batch: Batch) -> list[dict[str, Any]]:
        """Render one batch, write each PNG, and return its manifest rows."""
        import diffusers
        import torch

        from farm.render import render_batch

        self.load(batch.tasks[0].model)
        c = self.components
        start = time.perf_counter()
        images, sched_config = render_batch(c, batch.tasks)
        seconds = (time.perf_counter() - start) / len(batch.tasks)
        rows = []
        for index, (task, pixels) in enumerate(zip(batch.tasks, images, strict=True)):
            row = base_row(self.job, task, batch, index)
            meta = {
                "task": task.to_dict(),
                "task_id": task.task_id,
                "batch_id": batch.batch_id,
                "batch_size": len(batch.tasks),
                "batch_index": index,
                "model_hash": c.model_hash,
                "dtype": c.dtype,
                "scheduler_config": sched_config,
            }
            data = encode_png(pixels, meta)
            storage.write_bytes(self.filesystem, storage.join(self.base, row["image_path"]), data)
            row.update(
                status="ok",
                image_sha256=sha256_bytes(data),
                model_hash=c.model_hash,
                dtype=c.dtype,
                device=c.device,
                scheduler_config=_json(sched_config),
                seconds=seconds,
                model_config=self.model_config,
                node=self.node,
                actor=self.actor_id,
                torch_version=torch.__version__,
                diffusers_version=diffusers.__version__,
            )
            rows.append(row)
        return rows


def _json(value: Any) -> str:
    import json

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
