"""The driver: the only code that schedules Ray work. It never imports torch.

It cuts the task stream into deterministic batches, skips batches already done (resume),
starts the actors, and runs the dispatch loop: take a batch, hand it to an actor with room
(``farm.pool``), wait, then record its rows (``farm.sink``) or retry it. An animation's
videos are written at the end by ``farm.stitch``.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from farm import layout, manifest, metrics, storage
from farm.cluster import start_ray, stop_ray
from farm.errors import FarmError, RunFailed
from farm.layout import ANIMATION_FILE, IMAGES_DIR, JOB_FILE, MANIFEST_DIR, RUN_FILE, SUMMARY_FILE, random_base_of
from farm.lock import JobLock
from farm.loras import is_pickle
from farm.manifest import failed_rows
from farm.models import ModelError, resolve_model
from farm.pool import ActorPlan, ActorPool, error_message, start_actors
from farm.presets import PRESETS
from farm.sink import FLUSH_SECONDS, RowSink, RowsNotWritten, Summary
from farm.spec import Batch, JobSpec, RenderTask, shots
from farm.stitch import write_shot_videos

DEFAULT_BATCH_SIZE = 8
# Torch's CPU kernels split reductions differently with 1 thread than with several, which
# changes the floats; a fixed count per actor keeps the bytes independent of the actor count.
# Parallelism on CPU comes from actors instead (one per core by default).
CPU_THREADS = 1
DEFAULT_RETRIES = 2
# A batch whose actors keep dying (it crashes them, or the cluster is going away) fails
# after this many lost actors rather than loop for ever.
MAX_ACTOR_LOSSES = 5


@dataclass(frozen=True)
class RenderOptions:
    out: str = "out"
    address: str | None = None
    actors: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str = "auto"
    device: str = "auto"  # auto, cuda or cpu: what the actors run on (plan_actors)
    allow_pickle: bool = False
    retries: int = DEFAULT_RETRIES
    flush_seconds: float = FLUSH_SECONDS
    progress: bool = True
    wait: bool = False  # another run holds the job folder: wait for it rather than refuse (farm.lock)
    compile: bool = False  # channels_last + torch.compile for the UNet and VAE decode; recorded in rows


# ---------------------------------------------------------------------------------------
# Batching (pure, deterministic)


def cut_batches(tasks: Iterable[RenderTask], batch_size: int) -> Iterator[Batch]:
    """Consecutive tasks with the same batch key, in task order, cut into chunks of ``batch_size``.

    Formed from the task order alone, never from timing, so the same job always gives the
    same batches whatever the actor count (DESIGN.md, reproducibility).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    chunk: list[RenderTask] = []
    key: tuple | None = None  # the chunk's batch key, read once per chunk rather than per task
    for task in tasks:
        task_key = task.batch_key
        if chunk and (task_key != key or len(chunk) == batch_size):
            yield Batch.of(chunk)
            chunk = []
        if not chunk:
            key = task_key
        chunk.append(task)
    if chunk:
        yield Batch.of(chunk)


class WorkQueue:
    """The batches to hand out: free ones in task order, and chains, each of whose batches
    waits until the one before it has its rows (a chained animation's frames).

    A chain goes to one actor at a time, but several chains run at once on different actors.
    Chains are opened lazily, a new one only when every open chain has its batch out, so at
    most one chain per dispatch slot is held in memory.
    """

    def __init__(self, batches: Iterable[Batch] = (), chains: Iterable[Iterable[Batch]] = ()) -> None:
        self._ahead: Batch | None = None  # taken by peek, handed out by the next take
        self._free = iter(batches)
        self._free_done = False
        self._chains = iter(chains)
        self._chains_done = False
        self._open: list[deque[Batch]] = []  # open chains' batches not yet handed out
        self._out: list[Batch | None] = []  # per open chain, its batch handed out (by identity)
        self._turn = 0  # the open chain asked first next time, so every chain gets its turn

    def peek(self) -> Batch | None:
        """The batch the next ``take`` hands out (the driver starts the actors on its model), or None."""
        if self._ahead is None:
            self._ahead = self.take()
        return self._ahead

    def take(self) -> Batch | None:
        """The next batch that can start now, or None (for now, or for good: see ``empty``)."""
        if self._ahead is not None:
            batch, self._ahead = self._ahead, None
            return batch
        if not self._free_done:
            batch = next(self._free, None)
            if batch is not None:
                return batch
            self._free_done = True
        for i in range(len(self._open)):
            c = (self._turn + i) % len(self._open)
            if self._out[c] is None and self._open[c]:
                return self._hand_out(c)
        while not self._chains_done:
            chain = next(self._chains, None)
            if chain is None:
                self._chains_done = True
            elif batches := deque(chain):
                self._open.append(batches)
                self._out.append(None)
                return self._hand_out(len(self._open) - 1)
        return None

    def _hand_out(self, c: int) -> Batch:
        batch = self._open[c].popleft()
        self._out[c] = batch
        self._turn = c + 1
        return batch

    def finish(self, batch: Batch, ok: bool) -> list[Batch]:
        """A batch has its rows: free its chain. If it failed, the rest of its chain cannot
        render (each frame needs the one before); those batches are returned, to be failed."""
        for c, out in enumerate(self._out):
            if out is batch:
                dropped = [] if ok else list(self._open[c])
                if not ok:
                    self._open[c].clear()
                self._out[c] = None
                if not self._open[c]:  # the chain is done: close it
                    del self._open[c], self._out[c]
                return dropped
        return []

    @property
    def empty(self) -> bool:
        return self._ahead is None and self._free_done and self._chains_done and not self._open


@dataclass
class Planned:
    """What planning has streamed past so far: the tasks seen, those already done (skipped), and
    whether it has seen them all. It runs beside the render (WorkQueue pulls it), never before it."""

    seen: int = 0
    skipped: int = 0
    finished: bool = False


def count_planned(tasks: Iterable[RenderTask], done: set[str], planned: Planned) -> Iterator[RenderTask]:
    """``tasks``, counting each into ``planned`` as it goes by."""
    for task in tasks:
        planned.seen += 1
        planned.skipped += task.task_id in done
        yield task
    planned.finished = True


def plan_work(
    spec: JobSpec, tasks: Iterable[RenderTask], done: set[str], batch_size: int, planned: Planned | None = None
) -> WorkQueue:
    """The job's pending work, planned lazily as it is taken: batches of the tasks not done, or for
    a chained animation one chain per shot of its frames not done, one frame a batch. ``planned``
    counts the tasks as planning reaches them."""
    if planned is not None:
        tasks = count_planned(tasks, done, planned)
    if spec.animation is not None and spec.animation.mode == "chained":
        chains = ((Batch.of([t]) for t in shot if t.task_id not in done) for shot in shots(spec, tasks))
        return WorkQueue(chains=chains)
    return WorkQueue(
        batch for batch in cut_batches(tasks, batch_size) if not all(t.task_id in done for t in batch.tasks)
    )


# ---------------------------------------------------------------------------------------
# Output folder


def prepare_output(spec: JobSpec, root: str) -> int:
    """Write the spec as submitted, clear a crash's leftovers; return the run's random base."""
    filesystem, base = storage.open_root(root)
    storage.write_bytes(filesystem, storage.join(base, JOB_FILE), spec.source.encode())
    for folder in (IMAGES_DIR, MANIFEST_DIR):
        storage.remove_temporaries(filesystem, storage.join(base, folder))
    if spec.animation is not None:  # for `farm video`: the frame rate and shape of the shots
        record = {"fps": spec.animation.fps, "mode": spec.animation.mode, "frames_per_shot": spec.frames_per_shot}
        layout.write_json(root, ANIMATION_FILE, record)
    random_base = random_base_of(root)
    if random_base is None:
        random_base = secrets.randbits(32)
        layout.write_json(root, RUN_FILE, {"random_base": random_base})
    return random_base


# ---------------------------------------------------------------------------------------
# Actors


def plan_actors(resources: dict[str, float], options: RenderOptions, tasks: int | None = None) -> ActorPlan:
    """How many actors, and what each asks Ray for, from the cluster's resources and the options.

    ``--device auto``: one actor per GPU where the cluster has GPUs now, else one single-threaded
    actor per CPU. ``cuda``: GPU actors even before any GPU node is up (an autoscaling cluster
    adds nodes for them), so ``--actors`` is needed when there is none yet. ``cpu``: CPU actors.
    Without ``--actors``, no more actors than ``tasks`` (at most that many are left): an actor
    with nothing to do would only slow the others' start-up, all importing torch at once.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1)) or 1
    use_gpu = options.device == "cuda" or (options.device == "auto" and gpus > 0)
    cap = max(tasks, 1) if tasks is not None else None
    if use_gpu:
        count = options.actors or min(gpus, cap or gpus)
        if not count:
            raise FarmError("--device cuda: the cluster has no GPU yet; give --actors N and it scales up for them")
        return ActorPlan(count, 1, 1.0, None)
    count = options.actors or min(cpus, cap or cpus)
    # More actors than CPUs still all start (sharing cores) rather than wait forever.
    return ActorPlan(count, 0, min(1.0, cpus / count), CPU_THREADS)


# ---------------------------------------------------------------------------------------
# The run


def run_job(
    spec: JobSpec, options: RenderOptions, notify: Callable[[str], None] | None = None, lock: JobLock | None = None
) -> Summary:
    """Render every task of a job not already done, and write its manifest.

    Before anything is written, the output is checked (it takes a write) and the job folder
    locked: one run writes a job folder at a time (farm.lock). A live holder is refused, or with
    ``options.wait`` waited for (``notify`` hears about it). The lock is released however the
    run ends. A ``lock`` given is the job folder's, already held by the caller (`farm verify
    --repair` checks and marks under it): run_job neither takes nor releases it.
    """
    # 1. Check the models locally where we can, so a bad reference fails before Ray starts
    #    (presets always resolve; building one here would import torch into the driver)
    root = layout.job_root(options.out, spec.name)
    if not options.address:
        for model in ({spec.defaults["model"]} | swept_values(spec, "model")) - set(PRESETS):
            try:
                resolve_model(model, options.allow_pickle, spec.model_config)
            except ModelError as exc:
                raise FarmError(str(exc)) from exc
    check_lora_files(spec, options.allow_pickle)
    label = storage.join(options.out, spec.name)  # the folder as the user named it
    check_writable(root, options.out, label)
    if lock is not None:  # the caller's: it took it and releases it
        return render_locked(spec, options, root, lock)
    lock = JobLock(root, label)
    lock.acquire(options.wait, notify)
    try:
        return render_locked(spec, options, root, lock)
    finally:
        lock.release()


def check_writable(root: str, out: str, label: str) -> None:
    """Write and delete a probe file in the job folder, so an output that cannot be written is
    refused in one line before Ray starts (rather than every batch rendered, then failed)."""
    filesystem, base = storage.open_root(root)
    try:
        storage.check_writable(filesystem, base)
    except OSError as exc:
        raise FarmError(f"--out {out}: cannot write to {label}: {storage.reason(exc)}") from exc


def render_locked(spec: JobSpec, options: RenderOptions, root: str, lock: JobLock) -> Summary:
    """run_job once the job folder is ours: prepare it, skip what is done, render the rest."""
    import ray

    # 2. Prepare the output folder, find what is already done, and plan the work lazily: tasks are
    #    expanded as batches are taken, so the first batch goes out while the rest is unplanned.
    #    The count is arithmetic; the skipped ones are counted as planning passes them.
    random_base = prepare_output(spec, root)
    done = manifest.done_task_ids(root)
    summary = Summary(job_root=root, total=spec.count())
    planned = Planned()
    work = plan_work(spec, spec.tasks(random_base), done, options.batch_size, planned)
    # The first batch not done names the model the actors load at start-up.
    first = work.peek()

    start = summary.since
    if first is not None:
        # 3. Start or join Ray, and the actors (each loads the model once)
        started = start_ray(options.address)
        summary.ray_start = time.perf_counter() - start
        try:
            # At most as many actors as tasks left (an upper bound: done ids may be other jobs')
            plan = plan_actors(ray.cluster_resources(), options, max(summary.total - len(done), 1))
            actors = start_actors(
                plan,
                spec.name,
                root,
                first.tasks[0].model,
                options.dtype,
                options.allow_pickle,
                spec.model_config,
                spec.safety_check,
                options.compile,
            )
            check_inputs(spec, actors[0])
            summary.actors = len(actors)
            summary.startup = time.perf_counter() - start
            # 4. Dispatch batches with backpressure; write rows as they arrive
            dispatch(spec, root, actors, work, done, planned, options, summary, lock.check)
        finally:
            if started:
                stop_ray()
    summary.skipped = planned.skipped
    # 5. An animation's videos, one per shot, and their flicker
    if spec.animation is not None:
        videos = write_shot_videos(spec, root, spec.tasks(random_base), done)
        summary.videos.extend(name for name, _ in videos.videos)
        summary.flicker.extend(flicker for _, flicker in videos.videos)
        summary.flicker_compensated.extend(videos.compensated)
        summary.errors.extend(videos.errors)
    summary.elapsed = time.perf_counter() - start
    write_summary(root, summary)
    return summary


def check_inputs(spec: JobSpec, actor: Any) -> None:
    """Ask one actor whether the model accepts the job's shared inputs; the first problem ends the job."""
    import ray

    embedding_sets = [e for e in {spec.defaults["embeddings"]} | swept_values(spec, "embeddings") if e]
    losses = {spec.defaults["guidance_loss"]} | swept_values(spec, "guidance_loss")
    loss_names = sorted({loss.name for loss in losses if loss is not None and loss.name != "color"})
    if embedding_sets or loss_names:
        problems = ray.get(actor.check_inputs.remote(embedding_sets, loss_names))
        if problems:
            raise FarmError(problems[0])


def check_lora_files(spec: JobSpec, allow_pickle: bool) -> None:
    """Refuse, before Ray starts, a LoRA that is not a .safetensors file unless pickle is allowed."""
    if allow_pickle:
        return
    for entries in {spec.defaults["loras"]} | swept_values(spec, "loras"):
        for lora in entries:
            if is_pickle(lora.path):
                raise FarmError(
                    f"loras: {lora.path} is not a .safetensors file; pickle files can run arbitrary code when "
                    "loaded: convert it to .safetensors, or pass --allow-pickle if you trust its source"
                )


def swept_values(spec: JobSpec, name: str) -> set[Any]:
    return {combo[names.index(name)] for names, values in spec.axes if name in names for combo in values}


# ---------------------------------------------------------------------------------------
# The dispatch loop


@dataclass(frozen=True)
class Attempt:
    """A batch on its way to an actor, with what befell it before: the two kinds of failure
    count separately (see ``dispatch``)."""

    batch: Batch
    failures: int = 0  # renders that raised
    losses: int = 0  # actors that died rendering it
    alone: bool = False  # its call of several batches failed as a whole: it goes in a call of its own


def dispatch(
    spec: JobSpec,
    root: str,
    actors: list[Any],
    work: WorkQueue,
    done: set[str],
    planned: Planned,
    options: RenderOptions,
    summary: Summary,
    guard: Callable[[], None] = lambda: None,
) -> None:
    """Keep every actor busy, retry failures, and write manifest parts as results stream in.

    Two kinds of failure. A batch whose render raised is retried up to ``options.retries``
    times, then gets failed rows; at once if the error says a retry cannot help (the actor
    raised FatalRenderError: an output it cannot write, a model it cannot load). An actor that
    died (killed, or its node lost) is not the batch's fault: its batches go back to the queue
    for the other actors without using up their retries (up to MAX_ACTOR_LOSSES per batch, so
    a batch that kills every actor it meets still ends), and the actor rests until Ray has
    restarted it (``ActorPool``).

    Rows that cannot be written (a full disk) stay in the sink, and no new work goes out while
    they wait; once the batches in flight are in, one more write is tried: it raises
    RowsNotWritten (exit 1), or it succeeds and the run goes on. An image that cannot be written
    for a reason every other batch would meet too (a full disk or quota, a read-only or refused
    folder: the reply's ``stop``) fails its batch and stops new work the same way; once the
    batches in flight are in and their rows written, the run ends with RowsNotWritten naming
    the file. ``guard`` is called on every round and raises to stop the run (run_job's: the job
    folder's lock was lost).
    """

    pool: ActorPool[Attempt] = ActorPool(actors)
    retry: deque[Attempt] = deque()  # tried before: these go out before new work
    stop: OSError | None = None  # a write error that every batch would meet: no new work

    def next_attempt() -> Attempt | None:
        if retry:
            return retry.popleft()
        batch = work.take()
        return Attempt(batch) if batch else None

    def next_call(size: int) -> list[Attempt]:
        """Up to ``size`` attempts for one call (pool.group_size); one to go alone goes alone."""
        call: list[Attempt] = []
        while len(call) < size and (attempt := next_attempt()) is not None:
            if attempt.alone and call:
                retry.appendleft(attempt)
                break
            call.append(attempt)
            if attempt.alone:
                break
        return call

    def give_up(attempt: Attempt, message: str) -> list[dict[str, Any]]:
        metrics.record_failed(spec.name, len(attempt.batch.tasks))
        summary.errors.append(message)
        return failed_rows(spec.name, attempt.batch, message)

    # The progress bar's total: exact once planning has passed every task; until then, what is
    # left if every done task is one of this job's (a rerun's usual case).
    todo = max(summary.total - len(done), 0)
    with RowSink(spec.name, root, done, summary, todo, options.flush_seconds, options.progress) as sink:
        while True:
            guard()
            if planned.finished and todo != summary.total - planned.skipped:
                todo = summary.total - planned.skipped
                sink.set_total(todo)
            # 1. Hand work to every actor with room (and ask the rested ones whether they are back)
            pool.wake()
            for index in () if sink.stalled or stop else pool.free_slots():
                if not (call := next_call(pool.group_size())):
                    break
                pool.submit(index, [a.batch for a in call], [sink.done_in(a.batch) for a in call], call)
            metrics.set_queue_depth(spec.name, pool.batches_out + len(retry))
            if not pool.busy and stop is not None:  # the batches in flight are in: write their rows, end
                sink.flush()
                raise RowsNotWritten(stop.filename or root, stop, summary.rendered) from stop
            if not pool.busy and not retry and work.empty:
                break
            if not pool.busy and sink.stalled:
                sink.flush()  # the last try: RowsNotWritten ends the run; written, the run goes on
                continue
            # 2. Wait for a batch's answer (or a rest's end, or buffered rows falling due)
            for reply in pool.wait(sink.due_at()):
                attempt = reply.ticket
                if reply.alone:  # not necessarily this batch's fault: once more, on its own
                    retry.append(replace(attempt, alone=True))
                    continue
                if reply.lost is not None:  # the actor died or is restarting: not the batch's fault
                    if attempt.losses < MAX_ACTOR_LOSSES:
                        retry.append(replace(attempt, losses=attempt.losses + 1))
                        continue
                    message = (
                        f"lost {attempt.losses + 1} actors rendering this batch; last: {error_message(reply.lost)}"
                    )
                    rows = give_up(attempt, message)
                elif reply.error is not None:  # the render raised
                    if attempt.failures < options.retries and not reply.fatal:
                        retry.append(replace(attempt, failures=attempt.failures + 1))
                        continue
                    rows = give_up(attempt, error_message(reply.error))
                    stop = stop or reply.stop
                else:
                    rows = reply.rows if reply.rows is not None else []
                # 3. Record its rows; a failed frame of a chain fails the rest of its shot
                ok = sink.record(rows)
                for dropped in work.finish(attempt.batch, ok):
                    frame = attempt.batch.tasks[0].frame
                    message = f"not rendered: frame {frame} of this shot failed, and each frame needs the one before"
                    sink.record(failed_rows(spec.name, dropped, message))
            sink.flush_if_due()


def write_summary(root: str, summary: Summary) -> None:
    """Keep the run's summary. It is written after rendering, so failing to is exit 1 (exit 2 says
    refused before rendering); the images and their rows are already saved."""
    try:
        layout.write_json(root, SUMMARY_FILE, summary.to_dict(), indent=2)
    except OSError as exc:
        where = storage.join(root, SUMMARY_FILE)
        raise RunFailed(f"{storage.reason(exc)} writing {where}; the images and their rows are saved") from exc


def dry_run_tasks(spec: JobSpec, out: str, limit: int) -> tuple[int, list[RenderTask]]:
    """The task count and the first tasks, without Ray; random seeds as a rerun would draw them."""
    # Through the output's own file system, so a URI's run.json is found as a local one is.
    random_base = random_base_of(layout.job_root(out, spec.name))
    tasks = []
    for task in spec.tasks(random_base if random_base is not None else secrets.randbits(32)):
        if len(tasks) >= limit:
            break
        tasks.append(task)
    return spec.count(), tasks
