"""Task planning: what a job costs before its first image, per task, as ids are computed and tasks expanded.

What it measures, in CPU time of this process (``time.process_time``: on a shared machine other
work inflates it less than wall time), per task in microseconds, the best of ``--repeat`` rounds:

- **task id**: ``RenderTask.task_id`` on ``--ids`` fresh tasks of three shapes (a plain task; one
  with a LoRA, a ControlNet and SDXL's size pairs; a chained animation frame), against the id as it
  was computed before issue 16 (sha256 of ``json.dumps`` of ``dataclasses.asdict`` less technique
  fields at their defaults, keys sorted), which the new one must equal (checked on every task).
- **expansion**: ``JobSpec.tasks()`` of a grid on ``tiny`` at 64x64, 100 prompts x ``N / 100``
  seeds, for each of ``--tasks`` (default 10^4 and 10^5; 10^6 takes a minute): the tasks expanded
  and dropped (the driver streams them), expanded with their ids, and expanded with the old id.
  The job's parse time is shown once per size.

Run: ``python benchmarks/task_planning.py [--tasks 10000 100000 [1000000]] [--ids 20000] [--repeat 3]``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from grid_throughput import in_own_farm_home

PROMPTS = 100
CORE = ("model", "scheduler", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=[10_000, 100_000], help="grid sizes (multiples of 100; default 1e4 1e5)"
    )
    parser.add_argument("--ids", type=int, default=20_000, help="tasks per id shape (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the best is shown (default 3)")
    return parser.parse_args(argv)


def old_task_id(task: Any) -> str:
    """The id as RenderTask.task_id computed it before issue 16."""
    data = dataclasses.asdict(task)
    for f in dataclasses.fields(task):
        if f.name not in CORE and getattr(task, f.name) == f.default:
            del data[f.name]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def best_us_per_item(run: Callable[[Any], int], repeat: int, prepare: Callable[[], Any] = lambda: None) -> float:
    """The best of ``repeat`` calls of ``run`` on what ``prepare`` gives (untimed), in us of CPU per item
    (``run`` returns how many items it handled)."""
    best = float("inf")
    for _ in range(repeat):
        given = prepare()
        start = time.process_time()
        count = run(given)
        best = min(best, (time.process_time() - start) / count * 1e6)
    return best


def id_shapes() -> dict[str, Any]:
    """One task of each shape the id benchmark times."""
    from farm.spec import RenderTask
    from farm.spec.task import ControlNetUnit, Lora

    plain = RenderTask("tiny", "euler", "a watercolor painting of a castle", "blurry", 1, 20, 7.5, 64, 64)
    unit = ControlNetUnit("tiny-controlnet", "/jobs/assets/house.png", "ab" * 32, "canny")
    return {
        "plain": plain,
        "lora + controlnet + sdxl": dataclasses.replace(
            plain,
            model="tiny-xl",
            loras=(Lora("/jobs/loras/tiny-style.safetensors", "cd" * 32, 0.5),),
            controlnet=(unit,),
            original_size=(64, 64),
            target_size=(64, 64),
            crops_coords_top_left=(0, 0),
        ),
        "chained frame": dataclasses.replace(
            plain,
            frame=3,
            previous="0123456789abcdef0123",
            blend=0.3,
            color_reference="fedcba9876543210fedc",
            init_image="/cache/frames/0003.png",
            init_image_sha256="ef" * 32,
            strength=0.6,
            start_step=8,
        ),
    }


def bench_ids(args: argparse.Namespace) -> None:
    print(f"task id: us of CPU per id, {args.ids} fresh tasks per shape, best of {args.repeat}")
    print(f"{'shape':<26} {'old':>8} {'new':>8} {'x faster':>9}")
    for name, shape in id_shapes().items():

        def fresh(shape: Any = shape) -> list[Any]:
            return [dataclasses.replace(shape, seed=seed) for seed in range(args.ids)]

        tasks = fresh()
        assert [t.task_id for t in tasks] == [old_task_id(t) for t in tasks], name
        old = best_us_per_item(lambda tasks: len([old_task_id(t) for t in tasks]), args.repeat, fresh)
        new = best_us_per_item(lambda tasks: len([t.task_id for t in tasks]), args.repeat, fresh)
        print(f"{name:<26} {old:>8.2f} {new:>8.2f} {old / new:>8.1f}x")


def grid_job(tasks: int) -> str:
    prompts = ", ".join(f'"prompt number {i}, a watercolor painting"' for i in range(PROMPTS))
    return f"""
name: planning
model: tiny
scheduler: euler
defaults: {{width: 64, height: 64, steps: 20, negative_prompt: blurry}}
sweep:
  prompt: [{prompts}]
  seed: {{range: [0, {tasks // PROMPTS}]}}
"""


def consume(tasks: Iterable[Any], each: Callable[[Any], Any] | None = None) -> int:
    """Run through ``tasks`` without keeping them (as the driver streams them); how many there were."""
    count = 0
    for task in tasks:
        if each is not None:
            each(task)
        count += 1
    return count


def bench_expansion(args: argparse.Namespace) -> None:
    from farm.spec import parse_job

    print(f"\nexpansion: 100 prompts x N/100 seeds, tiny 64x64; us of CPU per task, best of {args.repeat}")
    print(f"{'tasks':>10} {'parse s':>8} {'expand':>8} {'+ id':>8} {'+ old id':>9}")
    for count in args.tasks:
        start = time.process_time()
        spec = parse_job(grid_job(count))
        parse = time.process_time() - start
        expand = best_us_per_item(lambda _, spec=spec: consume(spec.tasks()), args.repeat)
        with_id = best_us_per_item(lambda _, spec=spec: consume(spec.tasks(), lambda t: t.task_id), args.repeat)
        with_old = best_us_per_item(lambda _, spec=spec: consume(spec.tasks(), old_task_id), args.repeat)
        print(f"{spec.count():>10,} {parse:>8.3f} {expand:>8.2f} {with_id:>8.2f} {with_old:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        bench_ids(args)
        bench_expansion(args)
        return 0

    return in_own_farm_home(run)


if __name__ == "__main__":
    sys.exit(main())
