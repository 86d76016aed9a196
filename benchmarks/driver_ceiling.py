"""Driver ceiling: how fast the real driver plans and dispatches when rendering costs nothing.

What it measures. A grid job on the ``tiny`` preset (P prompts x S seeds, 64x64) runs through
``farm.driver.run_job`` on an embedded Ray, exactly as ``farm render`` runs it (planning,
batching, resume's done set, the actor pool's backpressure, the row sink and its manifest
parts), except that the actors are ``NullRenderer``: they import no torch, load no model and
answer every batch at once with rows of the real shape (every manifest column). So the
figures are the driver's own ceiling, the rate no GPU cluster can exceed. Reported per size:

- **planning**: tasks expanded, id'd and cut into batches per second, without Ray
  (``plan_work`` drained on its own);
- **first dispatch**: seconds from the actors being ready to the first batch handed to one
  (goal: within 2 s at 10^6 tasks), and from ``run_job``'s start;
- **dispatched**: images handed to actors per second over the run (goal: >= 20,000/s, twice
  what a 1,000-GPU cluster at 10 images/s each consumes); **recorded**: rows written to the
  manifest per second, from the first dispatch to the end of the run.

The null actors share this machine's cores with the driver, so on a small machine they take
some of its time; the driver process's own CPU seconds are shown beside the wall time.

Run: ``python benchmarks/driver_ceiling.py [--tasks 10000,100000,1000000] [--actors 2]
[--batch-size 8]``. ``FARM_HOME`` is pointed at a temporary folder when unset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

from grid_throughput import busy_cpus, in_own_farm_home, warn_if_busy

# Seeds per prompt: the job is PROMPTS x (tasks / PROMPTS) seeds, the shape of a big sweep.
PROMPTS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", default="10000,100000,1000000", help="job sizes, comma-separated (default 10^4, 10^5, 10^6)"
    )
    parser.add_argument("--actors", type=int, default=2, help="null actors (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="tasks per batch (default 8)")
    return parser.parse_args(argv)


def grid_yaml(tasks: int) -> str:
    """A sweep of PROMPTS prompts x enough seeds for ``tasks`` tasks on tiny, 64x64."""
    prompts = min(PROMPTS, tasks)
    seeds = tasks // prompts
    lines = [f"  - prompt number {i}, a watercolor painting of a castle" for i in range(prompts)]
    return (
        "name: ceiling\nmodel: tiny\nscheduler: euler\n"
        "defaults: {steps: 20, width: 64, height: 64, negative_prompt: blurry}\n"
        "sweep:\n  prompt:\n" + "\n".join(lines) + f"\n  seed: {{range: [0, {seeds}]}}\n"
    )


class NullRenderer:
    """Stands in for ``farm.actor.BatchRenderer`` (same constructor and calls): no torch, no model;
    a batch "renders" at once into rows of every manifest column, as a real actor's ok rows."""

    def __init__(self, job: str, job_root: str, *args: Any, **kwargs: Any) -> None:
        self.job = job
        self.template: dict[str, Any] | None = None

    def ready(self) -> bool:
        return True

    def check_inputs(self, *args: Any) -> list[str]:
        return []

    def render_batches(self, batches: list[Any], skips: list[frozenset[str]]) -> tuple[bytes, list[int]]:
        """As BatchRenderer.render_batches: the call's rows as one table, and each batch's row count."""
        from farm.columns import rows_to_table, table_to_ipc

        rendered = [self.render(batch, skip) for batch, skip in zip(batches, skips, strict=True)]
        table = rows_to_table([row for rows in rendered for row in rows])
        return table_to_ipc(table), [len(rows) for rows in rendered]

    def render(self, batch: Any, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        from datetime import datetime, timezone

        from farm.layout import image_relpath
        from farm.manifest import base_row

        rows = []
        for index, task in enumerate(batch.tasks):
            if task.task_id in skip:
                continue
            if self.template is None:  # every column once; per task only what differs in this grid
                self.template = base_row(self.job, task, batch, index) | OUTPUT_COLUMNS
            rows.append(
                self.template
                | {
                    "task_id": task.task_id,
                    "prompt": task.prompt,
                    "seed": task.seed,
                    "batch_id": batch.batch_id,
                    "batch_size": len(batch.tasks),
                    "batch_index": index,
                    "image_path": image_relpath(task.task_id),
                    "image_sha256": task.task_id,
                    "created_at": datetime.now(timezone.utc),
                    "task_json": task.canonical_json(),
                }
            )
        return rows


# The output half of an ok row, as an actor on a CPU would fill it.
OUTPUT_COLUMNS = {
    "status": "ok",
    "model_hash": "0" * 64,
    "model_family": "sd1",
    "dtype": "float32",
    "device": "cpu",
    "scheduler_config": "{}",
    "seconds": 0.0,
    "node": "null",
    "actor": "null",
    "torch_version": "-",
    "diffusers_version": "-",
    "prompt_tokens": 12,
    "prompt_truncated": False,
    "channels_last": False,
}


def plan_rate(spec: Any, batch_size: int) -> tuple[int, float]:
    """Tasks planned (expanded, id'd, batched) and the seconds it took, without Ray."""
    from farm.driver import plan_work

    start = time.perf_counter()
    work = plan_work(spec, spec.tasks(0), set(), batch_size)
    planned = 0
    while (batch := work.take()) is not None:
        planned += len(batch.tasks)
    return planned, time.perf_counter() - start


def run_once(tasks: int, args: argparse.Namespace) -> dict[str, float]:
    """One job of ``tasks`` tasks through run_job with null actors; its timings."""
    import farm.driver as driver
    import farm.pool as pool
    from farm.spec import parse_job

    spec = parse_job(grid_yaml(tasks))
    planned, plan_s = plan_rate(spec, args.batch_size)
    marks: dict[str, float] = {}
    submitted, calls = [0], [0]
    real_start_actors, real_submit = driver.start_actors, pool.ActorPool.submit

    def start_actors(*a: Any, **k: Any) -> Any:
        actors = real_start_actors(*a, **k)
        marks["ready"] = time.perf_counter()
        return actors

    def submit(self: Any, index: int, batches: Any, skips: Any, tickets: Any) -> None:
        marks.setdefault("first", time.perf_counter())
        marks["last"] = time.perf_counter()
        submitted[0] += sum(len(batch.tasks) for batch in batches)
        calls[0] += 1
        real_submit(self, index, batches, skips, tickets)

    if NullRenderer.__module__ != "__main__":  # imported (a profiler's script): workers cannot import it
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[NullRenderer.__module__])
    driver.start_actors, pool.ActorPool.submit, pool.BatchRenderer = start_actors, submit, NullRenderer
    options = driver.RenderOptions(
        out=tempfile.mkdtemp(prefix="farm-ceiling-"), actors=args.actors, batch_size=args.batch_size, progress=False
    )
    cpu0, start = time.process_time(), time.perf_counter()
    try:
        summary = driver.run_job(spec, options)
    finally:
        driver.start_actors, pool.ActorPool.submit = real_start_actors, real_submit
    end, cpu = time.perf_counter(), time.process_time() - cpu0
    span = max(marks["last"] - marks["first"], 1e-9)
    return {
        "tasks": tasks,
        "plan_per_s": planned / plan_s,
        "first_after_ready": marks["first"] - marks["ready"],
        "first_after_start": marks["first"] - start,
        "startup": marks["ready"] - start,
        "dispatched_per_s": submitted[0] / span,
        "recorded_per_s": summary.rendered / max(end - marks["first"], 1e-9),
        "wall": end - start,
        "driver_cpu": cpu,
        "rendered": summary.rendered,
        "batches_per_call": submitted[0] / args.batch_size / max(calls[0], 1),
    }


def benchmark(args: argparse.Namespace) -> int:
    import ray

    from farm.driver import start_ray, stop_ray

    sizes = [int(s) for s in args.tasks.split(",")]
    busy_before = busy_cpus()
    start_ray(None)  # once, so every size shares it (run_job joins the running Ray)
    try:
        results = [run_once(n, args) for n in sizes]
    finally:
        stop_ray()
    del ray
    print(
        f"driver ceiling: null actors x {args.actors}, batch size {args.batch_size}, {PROMPTS} prompts x seeds, "
        f"{os.cpu_count()} CPUs"
    )
    header = (
        f"{'tasks':>9}  {'planned/s':>10}  {'actors up s':>11}  {'1st after ready s':>17}  "
        f"{'1st after start s':>17}  {'dispatched/s':>12}  {'recorded/s':>10}  {'wall s':>7}  {'driver cpu s':>12}  "
        f"{'batches/call':>12}"
    )
    print(header)
    for r in results:
        print(
            f"{r['tasks']:>9}  {r['plan_per_s']:>10.0f}  {r['startup']:>11.2f}  {r['first_after_ready']:>17.3f}  "
            f"{r['first_after_start']:>17.3f}  {r['dispatched_per_s']:>12.0f}  {r['recorded_per_s']:>10.0f}  "
            f"{r['wall']:>7.1f}  {r['driver_cpu']:>12.1f}  {r['batches_per_call']:>12.1f}"
        )
        assert r["rendered"] == r["tasks"], "every task must come back as a row"
    print("goals: first dispatch within 2 s of the actors being ready at 10^6 tasks; >= 20000 images/s dispatched")
    warn_if_busy(busy_before)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_own_farm_home(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
