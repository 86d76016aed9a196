"""The render actor: the model stack loaded once, a batch in, images written, rows out.

``BatchRenderer`` is a plain class, testable without Ray; the driver wraps it with
``ray.remote``. It holds the model and renders; reading a batch's inputs (``farm.inputs``) and
writing its outputs (``farm.outputs``) are plain functions beside it. Torch and diffusers are
imported inside functions, so importing this module (as the driver does) stays light.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from farm import metrics, storage
from farm.columns import table_to_ipc
from farm.errors import BatchFailed, FarmError, FatalRenderError
from farm.inputs import read_control_images, read_init_images
from farm.manifest import base_row, rows_to_table
from farm.models import ModelError
from farm.outputs import PngWrites, Producer, Verdicts, plan_outputs
from farm.spec import Batch, Embedding, RenderTask, SafetyCheck

if TYPE_CHECKING:
    from farm.text import LoadedEmbedding

# Write errors that every retry of the batch would meet again: the folder refuses writes (read-only,
# not a folder) or the disk is full. Others (a network file system's hiccup) may pass, and are retried.
LASTING_WRITE_ERRORS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
    | {errno.ENOSPC, errno.EDQUOT}
)
# Of those, the ones every other batch's writes would meet too: the run stops sending work.
RUN_STOPPING_WRITE_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})

# Threads a GPU actor encodes and writes its PNGs on, beside the one that drives the GPU. PIL's
# zlib releases the GIL, so they run in parallel: a 512x512 PNG takes 36-64 ms on one core, a
# batch of 8 about a tenth of a second on 4, well inside the next batch's denoising (seconds),
# so more threads would buy nothing and only take cores from the node's other actors (Ray
# reserves one CPU per GPU actor but pins none; GPU nodes have several cores per GPU).
GPU_PNG_THREADS = 4

# Sets of textual-inversion files whose vectors an actor keeps while its model is loaded (as
# many as the render core keeps prompt encoders), so a batch does not read its files again.
EMBEDDING_SETS_KEPT = 8


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


def png_threads_for(device: str) -> int:
    """Threads that encode and write PNGs beside the renders on ``device`` (0: none, inline).

    A CPU actor renders on the one CPU Ray reserved for it (a single torch thread, the driver's
    CPU_THREADS): encoding beside it would take that core from the next batch's render (or from
    another actor), so it encodes inline, after its render, as it always has. A GPU actor's
    renders run on the GPU: its PNGs are encoded on a few threads while the next batch denoises.
    """
    if device == "cpu":
        return 0
    return min(GPU_PNG_THREADS, os.cpu_count() or 1)


@contextmanager
def fatal_write_errors() -> Iterator[None]:
    """A write error that every retry would meet again (LASTING_WRITE_ERRORS) as a FatalRenderError
    whose message names the file; it carries the error when no other batch could be written either.
    Other write errors (a network file system's hiccup) pass unchanged, and the batch is retried."""
    try:
        yield
    except storage.WriteFailed as exc:
        if exc.errno in LASTING_WRITE_ERRORS:  # "cannot write <file>: <reason>"
            stops = exc if exc.errno in RUN_STOPPING_WRITE_ERRORS else None
            raise FatalRenderError(str(exc), write_error=stops) from exc
        raise


@dataclass(frozen=True)
class Controls:
    """A batch's ControlNets (loaded, one per entry of its controlnet_models) and each task's
    control images (task id -> one fitted, preprocessed image per ControlNet)."""

    modules: list[Any]
    images: dict[str, list[Any]]


class BatchRenderer:
    """Holds one loaded model stack and renders batches of tasks into a job folder.

    The first model loads in ``__init__``, so an actor that answers ``ready()`` (a restarted one
    included) can render at once; a batch for another model swaps it (``load``).

    Safe to call from several threads at once (Ray runs the actor with ``max_concurrency`` of the
    batches it holds, farm.pool): ``lock`` lets one batch at a time touch the model and what goes
    with it (loading, LoRAs, ControlNets, textual-inversion vectors, the render, the safety
    check). With ``png_threads`` (default: ``png_threads_for`` the device, 4 on a GPU, none on a
    CPU), a batch's PNGs are encoded and written on a pool of that many threads after the lock is
    released, so the next batch denoises meanwhile; the call returns its rows once they are all
    written. Without, they are written inline, inside the lock, as one thread would.
    """

    def __init__(
        self,
        job: str,
        job_root: str,
        model_ref: str,
        dtype: str = "auto",
        allow_pickle: bool = False,
        model_config: str | None = None,
        threads: int | None = None,
        safety_check: SafetyCheck | None = None,
        compile: bool | str = False,  # True: the device's mode; a string: a recorded compile_mode (reproduce)
        png_threads: int | None = None,
    ) -> None:
        configure_torch(threads)
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        # transformers 5 draws a "Loading weights" bar for every component it loads (a safety
        # checker, a LoRA's text encoder): noise between farm's own lines.
        transformers.utils.logging.disable_progress_bar()
        self.job = job
        self.job_root = job_root
        self.filesystem, self.base = storage.open_root(job_root)
        self.requested_dtype = dtype
        self.allow_pickle = allow_pickle
        self.model_config = model_config
        self.safety_check = safety_check
        self.compile = compile  # the opt-in compiled render path (models.load_components)
        self.checker: Any = None  # the loaded safety checker, when the job asks for one
        self.node = socket.gethostname()
        self.actor_id = _actor_id()
        self.model_ref: str | None = None
        self.components: Any = None
        self.embedding_sets: OrderedDict[tuple[Embedding, ...], tuple[LoadedEmbedding, ...]] = OrderedDict()
        # One batch at a time on the model (reentrant: render holds it while it calls load).
        self.lock = threading.RLock()
        self.metrics_lock = threading.Lock()  # metrics objects are made on first use: once
        self.load(model_ref)
        if png_threads is None:
            png_threads = png_threads_for(self.components.device)
        self.png_pool = ThreadPoolExecutor(png_threads, thread_name_prefix="farm-png") if png_threads else None

    def load(self, model_ref: str) -> dict[str, Any]:
        """Load a model (once; a batch for another model swaps it)."""
        with self.lock:
            return self._load(model_ref)

    def _load(self, model_ref: str) -> dict[str, Any]:
        if model_ref != self.model_ref:
            from farm import models

            # Free the old model before loading the new one; if the load fails, the next
            # batch tries again instead of finding half a state.
            self.components = None
            self.checker = None
            self.model_ref = None
            self.embedding_sets.clear()
            resolved = models.resolve_model(model_ref, self.allow_pickle, self.model_config)
            device = models.pick_device()
            own_checker = self.safety_check is not None and self.safety_check.checker is None
            self.components = models.load_components(
                resolved,
                device,
                models.pick_dtype(device, self.requested_dtype),
                safety_checker=own_checker,
                compile=self.compile,
            )
            if self.safety_check is not None:
                from farm.safety import SafetyError, load_checker

                try:
                    self.checker = load_checker(
                        self.safety_check.checker or self.components,
                        device,
                        self.components.dtype,
                        self.allow_pickle,
                    )
                except SafetyError as exc:  # the same for every batch: the job cannot run as asked
                    raise ModelError(str(exc)) from exc
            self.model_ref = model_ref
        return self.info()

    def ready(self) -> bool:
        """Answers once the actor is up, its first model loaded (the driver asks a restarted actor
        before giving it work). It takes no lock: on a threaded actor it answers at once, even
        while a batch renders."""
        return True

    def info(self) -> dict[str, Any]:
        """Where this actor runs and the model it holds (once no batch is swapping it)."""
        with self.lock:
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
        from farm.embeddings import load_embeddings
        from farm.losses import load_loss
        from farm.text import PromptEncoder, PromptError

        problems = []
        with self.lock:
            for embeddings in embedding_sets:
                try:
                    PromptEncoder(self.components, load_embeddings(embeddings, self.components))
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
        Tasks in ``skip`` (already done) are neither rendered nor written. The rows come back
        only once every file of the batch is written, whether inline or in the PNG pool (whose
        writes run after the lock is released, beside the next batch's render).

        A model that cannot load or an output that cannot be written raises FatalRenderError
        (its message names the model or the file): the driver fails the batch without retrying,
        and sends no more work when the write error would meet every batch (a full disk).
        """
        writes = PngWrites(self.filesystem, self.base, self.png_pool)
        try:
            with self.lock:
                start, rows = self.render_locked(batch, skip, writes)
            with fatal_write_errors():
                writes.wait()  # the pool's writes, if any: every file written before the rows go back
        except BaseException:
            writes.abandon()  # a render that raised after handing writes to the pool: none still running
            raise
        with self.metrics_lock:
            metrics.record_batch(self.job, self.actor_id, rows, time.perf_counter() - start)
        return rows

    def render_batches(self, batches: list[Batch], skips: list[frozenset[str]]) -> tuple[bytes, list[int | FarmError]]:
        """Render batches one after another in one call, each as ``render`` does. Returns every row of
        the call as one table in the manifest schema (Arrow IPC bytes, ``columns.table_to_ipc``),
        batch after batch, and per batch its row count there, or the error it raised (a
        FatalRenderError as is, any other as BatchFailed with its message).

        The driver sends several batches a call only when each renders in milliseconds, so that
        Ray's per-call cost does not cap the rate; each batch still succeeds or fails on its own.
        Rows travel as one Arrow table a call: the actor builds it, the driver only slices,
        concatenates and writes (dicts would cost it tens of microseconds a row to unpickle and
        convert, and a table per batch as much again in per-table overhead).
        """
        rows: list[dict[str, Any]] = []
        outcomes: list[int | FarmError] = []
        for batch, skip in zip(batches, skips, strict=True):
            try:
                batch_rows = self.render(batch, skip)
            except FarmError as exc:
                outcomes.append(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the batch fails with its message; the others go on
                outcomes.append(BatchFailed(str(exc).strip() or type(exc).__name__))
                continue
            rows += batch_rows
            outcomes.append(len(batch_rows))
        return table_to_ipc(rows_to_table(rows)), outcomes

    def render_locked(
        self, batch: Batch, skip: frozenset[str], writes: PngWrites
    ) -> tuple[float, list[dict[str, Any]]]:
        """``render``'s work on the model, under ``lock``: the rows, each image's and frame's write
        added to ``writes`` (written inline, or started in the pool); and when the batch started."""
        try:
            self.load(batch.tasks[0].model)
        except ModelError as exc:  # a missing or unusable model file stays so on a retry
            raise FatalRenderError(str(exc)) from exc
        start = time.perf_counter()
        todo = [t for t in batch.tasks if t.task_id not in skip]
        errors: dict[str, str] = {}
        init_images = read_init_images(todo, self.filesystem, self.base, errors)
        self.set_loras(todo, errors)
        controls = Controls(self.controlnets(todo, errors), read_control_images(todo, errors))
        embeddings = self.textual_inversion(todo, errors)
        rendered = self.render_tasks(todo, init_images, errors, embeddings, controls)
        rows = [
            base_row(self.job, task, batch, i) | {"status": "failed", "error": errors[task.task_id]}
            for i, task in enumerate(batch.tasks)
            if task.task_id in errors
        ]
        if rendered:
            producer = self.producer()
            for part, result, seconds in rendered:
                verdicts = self.check_safety(result)
                # The pool reads result's arrays after the lock is released, while the next batch
                # renders: they must be the batch's own (render_batch returns fresh host arrays),
                # never a buffer the render core reuses.
                part_rows, part_writes = plan_outputs(self.job, part, result, seconds, producer, verdicts)
                with fatal_write_errors():
                    writes.add(part_writes)
                rows += part_rows
        return start, rows

    def set_loras(self, tasks: list[RenderTask], errors: dict[str, str]) -> None:
        """Switch the model's LoRA adapters to the batch's set (a batch field), loading a file the
        first time it is met; one that cannot load fails every task of the batch, with its line."""
        from farm.loras import LoraError, apply_loras

        live = [t for t in tasks if t.task_id not in errors]
        if not live:
            return
        try:
            apply_loras(self.components, live[0].loras, self.allow_pickle)
        except LoraError as exc:
            errors.update(dict.fromkeys((t.task_id for t in live), str(exc)))

    def controlnets(self, tasks: list[RenderTask], errors: dict[str, str]) -> list[Any]:
        """The batch's ControlNets (a batch field), each loaded once per model; one that cannot load
        (or fits another family) fails every task of the batch, with its line."""
        from farm.controlnets import ControlNetError, load_controlnets

        live = [t for t in tasks if t.task_id not in errors]
        if not live or not live[0].controlnet:
            return []
        try:
            return load_controlnets(self.components, live[0].controlnet_models, self.allow_pickle)
        except ControlNetError as exc:
            errors.update(dict.fromkeys((t.task_id for t in live), str(exc)))
            return []

    def check_safety(self, result: Any) -> Verdicts | None:
        """The safety checker's verdict on each rendered image and what the job does with flagged
        ones; None when the job asked for no check."""
        if self.checker is None or self.safety_check is None:
            return None
        from farm.safety import check_images

        return Verdicts(check_images(self.checker, result.images), self.safety_check)

    def textual_inversion(self, tasks: list[RenderTask], errors: dict[str, str]) -> tuple[LoadedEmbedding, ...]:
        """The vectors of the batch's textual-inversion files (a batch field), read once per model.

        A file that cannot be read fails every task still to render, with the same message.
        """
        from farm.embeddings import load_embeddings
        from farm.text import PromptError

        live = [t for t in tasks if t.task_id not in errors]
        if not live or not live[0].embeddings:
            return ()
        key = live[0].embeddings
        if key in self.embedding_sets:
            self.embedding_sets.move_to_end(key)
            return self.embedding_sets[key]
        try:
            loaded = load_embeddings(key, self.components, live[0].long_prompt)
        except PromptError as exc:
            errors.update(dict.fromkeys((t.task_id for t in live), str(exc)))
            return ()
        self.embedding_sets[key] = loaded
        while len(self.embedding_sets) > EMBEDDING_SETS_KEPT:
            self.embedding_sets.popitem(last=False)
        return loaded

    def render_tasks(
        self,
        tasks: list[RenderTask],
        init_images: dict[str, Any],
        errors: dict[str, str],
        embeddings: Sequence[LoadedEmbedding] = (),
        controls: Controls | None = None,
    ) -> list[tuple[Batch, Any, float]]:
        """Render tasks as one batch -> [(batch rendered, result, seconds per image)].

        Tasks with unusable inputs are noted in ``errors`` and dropped; out of memory, the
        batch is halved (each half keeps its order, so the split is the same every time).
        ``embeddings`` holds the vectors of the tasks' textual-inversion files, ``controls`` the
        batch's ControlNets and each task's control images.
        """
        controls = controls or Controls([], {})
        import torch

        from farm.render import TaskInputError, render_batch

        while True:
            live = [t for t in tasks if t.task_id not in errors]
            if not live:
                return []
            start = time.perf_counter()
            try:
                result = render_batch(
                    self.components,
                    live,
                    [init_images.get(t.task_id) for t in live],
                    embeddings,
                    controlnets=controls.modules,
                    control_images=[controls.images[t.task_id] for t in live] if controls.modules else None,
                )
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
            return self.render_tasks(live[:half], init_images, errors, embeddings, controls) + self.render_tasks(
                live[half:], init_images, errors, embeddings, controls
            )

    def producer(self) -> Producer:
        """The output columns this actor's ok rows share (the loaded model, the node, the versions)."""
        import diffusers
        import torch

        from farm.models import render_path

        c = self.components
        return Producer(
            model_hash=c.model_hash,
            model_family=c.family,
            dtype=c.dtype,
            device=c.device,
            model_config=self.model_config,
            node=self.node,
            actor=self.actor_id,
            torch_version=torch.__version__,
            diffusers_version=diffusers.__version__,
            render_path=render_path(c),
        )


def free_device_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error, before a smaller retry."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
