"""The driver: the only code that schedules Ray work. It never imports torch.

It cuts the task stream into deterministic batches, skips batches already done (resume),
keeps a bounded number of batches in flight per actor (backpressure), retries the work of
a failed call or a dead actor, and writes manifest parts as rows stream back.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyarrow.lib import ArrowException

from farm import manifest, metrics, storage
from farm.actor import IMAGES_DIR, BatchRenderer, base_row, image_relpath
from farm.models import PRESETS, ModelError, resolve_model
from farm.spec import Batch, JobSpec, RenderTask
from farm.stitch import ANIMATION_FILE, StitchError, write_job_video
from farm.video import VideoError

# One batch rendering and one queued per actor: the actor never waits for the driver, and
# no more than two batches of work are lost with it if it dies.
IN_FLIGHT_PER_ACTOR = 2
# Rows are written out at least this often (seconds) and whenever this many are buffered,
# so a crash loses little and a big job does not make thousands of tiny part files.
FLUSH_SECONDS = 5.0
FLUSH_ROWS = 512
DEFAULT_BATCH_SIZE = 8
# Torch's CPU kernels split reductions differently with 1 thread than with several, which
# changes the floats; a fixed count per actor keeps the bytes independent of the actor count.
# Parallelism on CPU comes from actors instead (one per core by default).
CPU_THREADS = 1
DEFAULT_RETRIES = 2
# An actor that died rests before it is asked whether Ray has restarted it: a restart
# imports torch and loads the model (seconds), and calls before that fail at once.
ACTOR_REST_SECONDS = 1.0
MAX_ACTOR_REST_SECONDS = 30.0
# A batch whose actors keep dying (it crashes them, or the cluster is going away) fails
# after this many lost actors rather than loop for ever.
MAX_ACTOR_LOSSES = 5
JOB_FILE = "job.yaml"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


class FarmError(Exception):
    """A problem to report to the user in one line (bad model, bad options)."""


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


@dataclass
class Summary:
    job_root: str
    total: int = 0
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed: float = 0.0
    startup: float = 0.0  # Ray start + actor start and model load, within elapsed
    actors: int = 0
    errors: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)  # animate and walk jobs: one per shot
    flicker: list[float] = field(default_factory=list)  # per video: mean |frame n+1 - frame n|, 0-255

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def rendering_images_per_second(self) -> float:
        """Throughput once the actors are up: what a long job sees."""
        busy = self.elapsed - self.startup
        return self.rendered / busy if busy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_root": self.job_root,
            "total": self.total,
            "rendered": self.rendered,
            "skipped": self.skipped,
            "failed": self.failed,
            "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(self.images_per_second, 3),
            "startup_s": round(self.startup, 3),
            "rendering_images_per_s": round(self.rendering_images_per_second, 3),
            "actors": self.actors,
            "errors": self.errors[:20],
            **({"videos": self.videos, "flicker": [round(f, 4) for f in self.flicker]} if self.videos else {}),
        }


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
    for task in tasks:
        if chunk and (task.batch_key != chunk[0].batch_key or len(chunk) == batch_size):
            yield Batch.of(chunk)
            chunk = []
        chunk.append(task)
    if chunk:
        yield Batch.of(chunk)


def shots(spec: JobSpec, tasks: Iterable[RenderTask]) -> Iterator[list[RenderTask]]:
    """An animation's tasks cut into shots (every sweep combination's frames, in order)."""
    shot: list[RenderTask] = []
    for task in tasks:
        shot.append(task)
        if len(shot) == spec.frames_per_shot:
            yield shot
            shot = []


class WorkQueue:
    """The batches to hand out: free ones in task order, and chains, each of whose batches
    waits until the one before it has its rows (a chained animation's frames).

    A chain goes to one actor at a time, but several chains run at once on different actors.
    Chains are opened lazily, a new one only when every open chain has its batch out, so at
    most one chain per dispatch slot is held in memory.
    """

    def __init__(self, batches: Iterable[Batch] = (), chains: Iterable[Iterable[Batch]] = ()) -> None:
        self._free = iter(batches)
        self._free_done = False
        self._chains = iter(chains)
        self._chains_done = False
        self._open: list[deque[Batch]] = []  # open chains' batches not yet handed out
        self._out: list[Batch | None] = []  # per open chain, its batch handed out (by identity)
        self._turn = 0  # the open chain asked first next time, so every chain gets its turn

    def take(self) -> Batch | None:
        """The next batch that can start now, or None (for now, or for good: see ``empty``)."""
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
        return self._free_done and self._chains_done and not self._open


def plan_work(spec: JobSpec, tasks: Iterable[RenderTask], done: set[str], batch_size: int) -> WorkQueue:
    """The job's pending work: batches of the tasks not done, or for a chained animation one
    chain per shot of its frames not done, one frame a batch."""
    if spec.animation is not None and spec.animation.mode == "chained":
        chains = ((Batch.of([t]) for t in shot if t.task_id not in done) for shot in shots(spec, tasks))
        return WorkQueue(chains=chains)
    return WorkQueue(
        batch for batch in cut_batches(tasks, batch_size) if not all(t.task_id in done for t in batch.tasks)
    )


# ---------------------------------------------------------------------------------------
# Output folder


def job_root(spec: JobSpec, out: str) -> str:
    return storage.join(storage.normalise_root(out), spec.name)


def prepare_output(spec: JobSpec, root: str) -> int:
    """Write the spec as submitted, clear a crash's leftovers; return the run's random base."""
    filesystem, base = storage.open_root(root)
    storage.write_bytes(filesystem, storage.join(base, JOB_FILE), spec.source.encode())
    for folder in (IMAGES_DIR, manifest.MANIFEST_DIR):
        storage.remove_temporaries(filesystem, storage.join(base, folder))
    if spec.animation is not None:  # for `farm video`: the frame rate and shape of the shots
        record = {"fps": spec.animation.fps, "mode": spec.animation.mode, "frames_per_shot": spec.frames_per_shot}
        storage.write_bytes(filesystem, storage.join(base, ANIMATION_FILE), json.dumps(record).encode())
    random_base = random_base_of(root)
    if random_base is None:
        random_base = secrets.randbits(32)
        storage.write_bytes(filesystem, storage.join(base, RUN_FILE), json.dumps({"random_base": random_base}).encode())
    return random_base


def random_base_of(root: str) -> int | None:
    """The random-seed draw kept in a job folder's run.json (None before the first run)."""
    filesystem, base = storage.open_root(root)
    path = storage.join(base, RUN_FILE)
    if storage.exists(filesystem, path):
        return int(json.loads(storage.read_bytes(filesystem, path))["random_base"])
    return None


# ---------------------------------------------------------------------------------------
# Ray


def start_ray(address: str | None) -> bool:
    """Join a cluster at ``address``, or start an embedded local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local" always starts a new Ray, never joins one named by RAY_ADDRESS or `ray start`;
            # it serves no dashboard: nothing listens beyond what Ray itself needs.
            ray.init(address="local", include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FarmError(f"--address {address or 'local'}: cannot start or join Ray: {exc}") from exc
    return True


@dataclass(frozen=True)
class ActorPlan:
    count: int
    num_gpus: int
    num_cpus: float
    threads: int | None  # torch threads per actor; None leaves torch's default (GPU actors)


def plan_actors(resources: dict[str, float], options: RenderOptions) -> ActorPlan:
    """How many actors, and what each asks Ray for, from the cluster's resources and the options.

    ``--device auto``: one actor per GPU where the cluster has GPUs now, else one single-threaded
    actor per CPU. ``cuda``: GPU actors even before any GPU node is up (an autoscaling cluster
    adds nodes for them), so ``--actors`` is needed when there is none yet. ``cpu``: CPU actors.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1)) or 1
    use_gpu = options.device == "cuda" or (options.device == "auto" and gpus > 0)
    if use_gpu:
        count = options.actors or gpus
        if not count:
            raise FarmError("--device cuda: the cluster has no GPU yet; give --actors N and it scales up for them")
        return ActorPlan(count, 1, 1.0, None)
    count = options.actors or cpus
    # More actors than CPUs still all start (sharing cores) rather than wait forever.
    return ActorPlan(count, 0, min(1.0, cpus / count), CPU_THREADS)


def start_actors(spec: JobSpec, root: str, options: RenderOptions, first_model: str) -> list[Any]:
    """Start the render actors (see plan_actors); each loads the first model before any batch."""
    import ray

    plan = plan_actors(ray.cluster_resources(), options)
    remote = ray.remote(
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
        # Across nodes rather than packed: a lost node takes as few actors with it as it can.
        scheduling_strategy="SPREAD",
        max_restarts=-1,
        max_task_retries=0,
    )(BatchRenderer)
    actors = [
        remote.remote(spec.name, root, options.dtype, options.allow_pickle, spec.model_config, plan.threads)
        for _ in range(plan.count)
    ]
    try:
        ray.get([a.load.remote(first_model) for a in actors])
    except Exception as exc:
        for actor in actors:
            ray.kill(actor)
        raise FarmError(error_message(exc)) from exc
    return actors


def error_message(exc: BaseException) -> str:
    """The user's one line from a Ray error: the original exception's message, not Ray's wrapper."""
    cause = getattr(exc, "cause", None) or getattr(exc, "base_exception", None)
    if cause is not None and cause is not exc:
        return error_message(cause)
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        if line.strip() and ("Error:" in line or "error:" in line):
            return line.strip()
    return text.splitlines()[-1] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------
# The run


def run_job(spec: JobSpec, options: RenderOptions) -> Summary:
    """Render every task of a job not already done, and write its manifest."""
    import ray

    # 1. Check the models locally where we can, so a bad reference fails before Ray starts
    #    (presets always resolve; building one here would import torch into the driver)
    root = job_root(spec, options.out)
    if not options.address:
        for model in ({spec.defaults["model"]} | swept_values(spec, "model")) - set(PRESETS):
            try:
                resolve_model(model, options.allow_pickle, spec.model_config)
            except ModelError as exc:
                raise FarmError(str(exc)) from exc

    # 2. Prepare the output folder and find what is already done
    random_base = prepare_output(spec, root)
    done = manifest.ok_task_ids(root)
    summary = Summary(job_root=root, total=spec.count())
    # The first task not done names the model the actors load at start-up.
    first, todo = None, 0
    for task in spec.tasks(random_base):
        if task.task_id not in done:
            first = first or task
            todo += 1
    summary.skipped = summary.total - todo

    start = time.perf_counter()
    if first is not None:
        # 3. Start or join Ray, and the actors (each loads the model once)
        started = start_ray(options.address)
        try:
            actors = start_actors(spec, root, options, first.model)
            check_inputs(spec, actors[0])
            summary.actors = len(actors)
            summary.startup = time.perf_counter() - start
            # 4. Dispatch batches with backpressure; write rows as they arrive
            work = plan_work(spec, spec.tasks(random_base), done, options.batch_size)
            dispatch(spec, root, actors, work, done, todo, options, summary)
        finally:
            if started:
                ray.shutdown()
    # 5. An animation's videos, one per shot, and their flicker
    if spec.animation is not None:
        write_videos(spec, root, random_base, done, summary)
    summary.elapsed = time.perf_counter() - start
    write_summary(root, summary)
    return summary


def write_videos(spec: JobSpec, root: str, random_base: int, done: set[str], summary: Summary) -> None:
    """Each shot's rendered frames, in order, as OUT/<job>/<job>.mp4 (<job>-shot<N>.mp4 for several)."""
    filesystem, base = storage.open_root(root)
    count = spec.count() // spec.frames_per_shot
    for index, shot in enumerate(shots(spec, spec.tasks(random_base))):
        frames = [image_relpath(t.task_id) for t in shot if t.task_id in done]
        if not frames:
            continue
        name = f"{spec.name}.mp4" if count == 1 else f"{spec.name}-shot{index}.mp4"
        try:
            result = write_job_video(filesystem, base, frames, storage.join(root, name), spec.animation.fps)  # type: ignore[union-attr]
        except (StitchError, VideoError, OSError, ArrowException) as exc:  # the frames are safe; `farm video` retries
            summary.errors.append(f"{name}: not written: {exc}")
            continue
        summary.videos.append(name)
        summary.flicker.append(result.flicker)
        if len(frames) < len(shot):
            summary.errors.append(f"{name}: {len(frames)} of {len(shot)} frames ({len(shot) - len(frames)} failed)")


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


def swept_values(spec: JobSpec, name: str) -> set[Any]:
    return {combo[names.index(name)] for names, values in spec.axes if name in names for combo in values}


def dispatch(
    spec: JobSpec,
    root: str,
    actors: list[Any],
    work: WorkQueue,
    done: set[str],
    todo: int,
    options: RenderOptions,
    summary: Summary,
) -> None:
    """Keep every actor busy, retry failures, and write manifest parts as results stream in.

    Two kinds of failure. A batch whose render raised is retried up to ``options.retries``
    times, then gets failed rows. An actor that died (killed, or its node lost) is not the
    batch's fault: its batches go back to the queue for the other actors without using up
    their retries (up to MAX_ACTOR_LOSSES per batch, so a batch that kills every actor it
    meets still ends), and the actor gets no work until Ray has restarted it and it answers.
    """
    import ray
    from ray.exceptions import RayActorError, RayError
    from tqdm import tqdm

    retry: deque[tuple[Batch, int, int]] = deque()  # batch, render failures, actor losses
    in_flight: dict[Any, tuple[int, Batch, int, int]] = {}
    load = [0] * len(actors)
    resting: dict[int, float] = {}  # actor index -> when to ask it whether it is back
    rests = [0] * len(actors)  # consecutive failed asks, for the back-off
    probes: dict[Any, int] = {}  # ready() calls in flight -> actor index
    buffer: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    bar = tqdm(total=todo, unit="img", disable=not options.progress, dynamic_ncols=True, desc=spec.name)

    def flush() -> None:
        nonlocal last_flush
        if buffer:
            manifest.write_part(root, buffer)
            buffer.clear()
        last_flush = time.monotonic()

    def next_batch() -> tuple[Batch, int, int] | None:
        if retry:
            return retry.popleft()
        batch = work.take()
        return (batch, 0, 0) if batch else None

    def rest(index: int) -> None:
        resting[index] = time.monotonic() + min(ACTOR_REST_SECONDS * 2 ** rests[index], MAX_ACTOR_REST_SECONDS)
        rests[index] += 1

    def record(rows: list[dict[str, Any]]) -> None:
        fresh = [r for r in rows if r["task_id"] not in done]
        images = [r for r in fresh if r.get("capture") is None]  # the rest are step captures
        done.update(r["task_id"] for r in images if r["status"] == "ok")
        buffer.extend(fresh)
        ok = sum(r["status"] == "ok" for r in images)
        summary.rendered += ok
        summary.failed += len(images) - ok
        summary.errors.extend(r["error"] for r in images if r["status"] != "ok" and r["error"] not in summary.errors)
        bar.update(len(images))

    try:
        while True:
            now = time.monotonic()
            for index, actor in enumerate(actors):
                # Ask a resting actor whether it is back (once its rest is over).
                if index in resting and resting[index] <= now and index not in probes.values():
                    probes[actor.ready.remote()] = index
            # Fill the awake actors up to their in-flight limit, one batch each per round, so
            # that work which comes a batch at a time (chains) spreads over every actor.
            handed = True
            while handed:
                handed = False
                for index, actor in enumerate(actors):
                    if index in resting or load[index] >= IN_FLIGHT_PER_ACTOR or not (item := next_batch()):
                        continue
                    batch, failures, losses = item
                    # Tasks already done (the rest of the batch failed an input check
                    # before) are not rendered again: their images stay as their rows say.
                    skip = frozenset(t.task_id for t in batch.tasks if t.task_id in done)
                    in_flight[actor.render.remote(batch, skip)] = (index, batch, failures, losses)
                    load[index] += 1
                    handed = True
            metrics.set_queue_depth(spec.name, len(in_flight) + len(retry))
            if not in_flight and not retry and work.empty:
                break
            # Wake for a result or an answer, when buffered rows are due, or when a rest ends.
            wakes = [t for i, t in resting.items() if i not in probes.values()]
            if buffer:
                wakes.append(last_flush + options.flush_seconds)
            timeout = max(0.0, min(wakes) - time.monotonic()) if wakes else None
            waiting = list(in_flight) + list(probes)
            if not waiting:
                time.sleep(timeout or 0.0)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            for ref in ready:
                if ref in probes:
                    index = probes.pop(ref)
                    try:
                        ray.get(ref)
                        del resting[index]
                        rests[index] = 0
                    except RayError:
                        rest(index)
                    continue
                index, batch, failures, losses = in_flight.pop(ref)
                load[index] -= 1
                try:
                    rows = ray.get(ref)
                except RayActorError as exc:  # the actor died or is restarting: not the batch's fault
                    rest(index)
                    if losses < MAX_ACTOR_LOSSES:
                        retry.append((batch, failures, losses + 1))
                        continue
                    message = f"lost {losses + 1} actors rendering this batch; last: {error_message(exc)}"
                    rows = failed_rows(spec.name, batch, message)
                    metrics.record_failed(spec.name, len(batch.tasks))
                    summary.errors.append(message)
                except RayError as exc:  # the render raised
                    message = error_message(exc)
                    if failures < options.retries:
                        retry.append((batch, failures + 1, losses))
                        continue
                    rows = failed_rows(spec.name, batch, message)
                    metrics.record_failed(spec.name, len(batch.tasks))
                    summary.errors.append(message)
                record(rows)
                ok = all(r["status"] == "ok" for r in rows)
                for dropped in work.finish(batch, ok):
                    frame = batch.tasks[0].frame
                    message = f"not rendered: frame {frame} of this shot failed, and each frame needs the one before"
                    record(failed_rows(spec.name, dropped, message))
            if len(buffer) >= FLUSH_ROWS or time.monotonic() - last_flush >= options.flush_seconds:
                flush()
    finally:
        # Whatever happened (Ctrl-C included), rows already rendered reach the manifest.
        flush()
        bar.close()


def failed_rows(job: str, batch: Batch, message: str) -> list[dict[str, Any]]:
    return [
        base_row(job, task, batch, i) | {"status": "failed", "error": message} for i, task in enumerate(batch.tasks)
    ]


def write_summary(root: str, summary: Summary) -> None:
    filesystem, base = storage.open_root(root)
    data = json.dumps(summary.to_dict(), indent=2).encode()
    storage.write_bytes(filesystem, storage.join(base, SUMMARY_FILE), data)


def dry_run_tasks(spec: JobSpec, out: str, limit: int) -> tuple[int, list[RenderTask]]:
    """The task count and the first tasks, without Ray; random seeds as a rerun would draw them."""
    random_base = random_base_of(job_root(spec, out)) if os.path.exists(storage.normalise_root(out)) else None
    tasks = []
    for task in spec.tasks(random_base if random_base is not None else secrets.randbits(32)):
        if len(tasks) >= limit:
            break
        tasks.append(task)
    return spec.count(), tasks
