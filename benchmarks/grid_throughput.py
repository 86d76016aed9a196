"""Grid throughput: farm against a plain diffusers loop on the same grid.

What it measures. One grid job on the ``tiny`` preset (by default 32 images: 4 prompts x
8 seeds, the euler scheduler, guidance 7.5, 64x64, 10 steps) is rendered two ways:

- **plain loop**: in this process, ``StableDiffusionPipeline.from_pretrained`` with the same
  scheduler farm builds, then one ``pipe(...)`` call per image with its own seeded CPU
  generator, as a naive user would write it. The loop is timed alone; model load is shown
  separately (torch and diffusers are already imported by then, so it excludes import time).
- **farm**: ``farm.driver.run_job`` end to end into a fresh output folder: actor start and
  model load, batched rendering, PNG and manifest writing. Ray is started here first (and
  ``run_job`` reuses it), so the time of ``run_job`` alone excludes Ray's start-up; the
  end-to-end time (Ray start + ``run_job`` + Ray shutdown) is shown too. ``run_job`` includes
  the actors' own imports of torch and diffusers.

The headline ratio is farm's images/s in its rendering phase (once the actors are up:
rendering, PNG and manifest writing, scheduling through Ray) over the plain loop's images/s
(loop only): both exclude start-up. Goal: at least 1.0x, i.e. batching and prompt caching
pay for Ray's per-batch overhead. The end-to-end ratio counts every start-up cost on both
sides (for the plain loop, a fresh process's imports are measured in a subprocess): Ray and
actor start-up are a fixed cost of several seconds, so it favours farm only on larger grids.

Run: ``python benchmarks/grid_throughput.py [--images 32] [--actors N] [--batch-size 8]``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset, so a fresh
machine works: the ``tiny`` preset is built there on first use, outside the timed sections.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

PROMPTS = (
    "a cute shiba inu",
    "an alien riding a giant flying beetle in space, digital art",
    "a watercolor painting of a castle at sunset",
    "a photo of an astronaut riding a horse",
)
NEGATIVE_PROMPT = "blurry, low quality"
SCHEDULER = "euler"
GUIDANCE = 7.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images in the grid (default 32)")
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--actors", type=int, default=None, help="farm actors (default: farm's, one per CPU core)")
    parser.add_argument("--batch-size", type=int, default=8, help="farm batch size (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode; the median is reported (default 1)")
    args = parser.parse_args(argv)
    for name in ("images", "steps", "actors", "batch_size", "repeat"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected at least 1")
    if args.size < 8 or args.size % 8:
        parser.error("--size: expected a multiple of 8")
    return args


def grid_yaml(images: int, size: int, steps: int) -> str:
    """A prompts x seeds grid of exactly ``images`` tasks (4 prompts when ``images`` allows)."""
    prompts = next(n for n in (4, 3, 2, 1) if images % n == 0)
    seeds = images // prompts
    prompt_lines = "\n".join(f"    - {p}" for p in PROMPTS[:prompts])
    return f"""\
name: grid_throughput
model: tiny
scheduler: {SCHEDULER}
defaults:
  negative_prompt: {NEGATIVE_PROMPT}
  steps: {steps}
  guidance: {GUIDANCE}
  width: {size}
  height: {size}
sweep:
  prompt:
{prompt_lines}
  seed: {{range: [1, {seeds + 1}]}}
"""


def load_plain_pipeline() -> Any:
    """The naive user's pipeline: from_pretrained, scheduler swapped to farm's kind."""
    from diffusers import StableDiffusionPipeline

    from farm.presets import ensure_tiny
    from farm.samplers import build_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny(), safety_checker=None, local_files_only=True)
    pipe.scheduler = build_scheduler(SCHEDULER, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_plain(spec: Any) -> tuple[float, float]:
    """(load seconds, loop seconds) for one image per ``pipe(...)`` call."""
    import torch

    start = time.perf_counter()
    pipe = load_plain_pipeline()
    load_s = time.perf_counter() - start
    tasks = list(spec.tasks())
    start = time.perf_counter()
    for task in tasks:
        pipe(
            task.prompt,
            negative_prompt=task.negative_prompt,
            num_inference_steps=task.steps,
            guidance_scale=task.guidance,
            width=task.width,
            height=task.height,
            generator=torch.Generator("cpu").manual_seed(task.seed),
        )
    loop_s = time.perf_counter() - start
    del pipe
    return load_s, loop_s


def run_farm(spec: Any, actors: int | None, batch_size: int) -> tuple[float, float, float, float, float]:
    """(Ray start, run_job, actor start-up, Ray shutdown, render_batch) seconds, into a fresh output folder.

    Actor start-up is the part of ``run_job`` before the first batch is sent: actor processes
    importing torch and diffusers and loading the model. The rest of ``run_job`` is the
    rendering phase (rendering, PNG and manifest writing, scheduling), what a long job sees.
    The last figure is the time the actors spent in ``render_batch`` (from the manifest's
    per-image ``seconds``), summed and divided by the actor count.
    """
    import ray

    from farm.driver import RenderOptions, run_job
    from farm.manifest import read_manifest

    out = tempfile.mkdtemp(prefix="farm-bench-out-")
    try:
        start = time.perf_counter()
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
        ray_start_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            summary = run_job(spec, RenderOptions(out=out, actors=actors, batch_size=batch_size, progress=False))
            job_s = time.perf_counter() - start
        finally:
            start = time.perf_counter()
            ray.shutdown()
            ray_stop_s = time.perf_counter() - start
        if summary.rendered != spec.count() or summary.failed or summary.skipped:
            raise SystemExit(
                f"farm run incomplete: rendered {summary.rendered}, failed {summary.failed}, "
                f"skipped {summary.skipped} of {spec.count()}; errors: {summary.errors[:3]}"
            )
        render_s = sum(read_manifest(summary.job_root, ["seconds"]).column("seconds").to_pylist()) / summary.actors
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return ray_start_s, job_s, summary.startup, ray_stop_s, render_s


def import_seconds() -> float:
    """What a fresh process pays to import the diffusers stack (the plain loop paid it before timing)."""
    code = "import torch, diffusers, transformers; from diffusers import StableDiffusionPipeline"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs other work keeps busy, from /proc/stat over ``seconds``; None off Linux."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total_a, idle_a = sample()
        time.sleep(seconds)
        total_b, idle_b = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total_b - total_a
    return (os.cpu_count() or 1) * (total - (idle_b - idle_a)) / total if total > 0 else None


def rate(images: int, seconds: float) -> str:
    return f"{images / seconds:.2f}" if seconds > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_own_farm_home(lambda: benchmark(args))


def in_own_farm_home(run: Callable[[], int]) -> int:
    """``run()`` with $FARM_HOME in a temporary folder (removed after), unless the caller set one:
    presets built for a benchmark never land in the user's cache."""
    own_home = not os.environ.get("FARM_HOME")
    if own_home:
        os.environ["FARM_HOME"] = tempfile.mkdtemp(prefix="farm-bench-home-")
    try:
        return run()
    finally:
        if own_home:
            shutil.rmtree(os.environ["FARM_HOME"], ignore_errors=True)


def benchmark(args: argparse.Namespace) -> int:
    from farm.presets import ensure_tiny
    from farm.spec import parse_job

    spec = parse_job(grid_yaml(args.images, args.size, args.steps))
    n = spec.count()
    busy_before = busy_cpus()
    start = time.perf_counter()
    ensure_tiny()  # built once (on a fresh FARM_HOME) outside every timed section
    build_s = time.perf_counter() - start

    plain_load, plain_loop, ray_start, farm_job, farm_up, ray_stop, farm_render = [], [], [], [], [], [], []
    for _ in range(args.repeat):
        load_s, loop_s = run_plain(spec)
        plain_load.append(load_s)
        plain_loop.append(loop_s)
        start_s, job_s, up_s, stop_s, render_s = run_farm(spec, args.actors, args.batch_size)
        ray_start.append(start_s)
        farm_job.append(job_s)
        farm_up.append(up_s)
        ray_stop.append(stop_s)
        farm_render.append(render_s)
    imports_s = import_seconds()

    med = statistics.median
    load_s, loop_s = med(plain_load), med(plain_loop)
    start_s, job_s, stop_s, render_s = med(ray_start), med(farm_job), med(ray_stop), med(farm_render)
    up_s = med(farm_up)
    phase_s = med(j - u for j, u in zip(farm_job, farm_up, strict=True))
    farm_total = med(a + b + c for a, b, c in zip(ray_start, farm_job, ray_stop, strict=True))
    plain_total = imports_s + med(a + b for a, b in zip(plain_load, plain_loop, strict=True))

    print(
        f"grid: {n} images, tiny {args.size}x{args.size}, {args.steps} steps, {SCHEDULER}, guidance {GUIDANCE}; "
        f"farm: {args.actors or 'default'} actor(s), batch size {args.batch_size}; {os.cpu_count()} CPUs; "
        f"median of {args.repeat} run(s); FARM_HOME={os.environ['FARM_HOME']} (tiny ready in {build_s:.1f} s)"
    )
    rows = [
        ("plain: imports (fresh process)", "-", imports_s, "-"),
        ("plain: model load", "-", load_s, "-"),
        ("plain: loop", str(n), loop_s, rate(n, loop_s)),
        ("plain: end to end (imports + load + loop)", str(n), plain_total, rate(n, plain_total)),
        ("farm: Ray start", "-", start_s, "-"),
        ("farm: run_job (excl. Ray start)", str(n), job_s, rate(n, job_s)),
        ("farm:   actor start-up (imports + load)", "-", up_s, "-"),
        ("farm:   rendering phase", str(n), phase_s, rate(n, phase_s)),
        ("farm:   of which render_batch per actor", str(n), render_s, rate(n, render_s)),
        ("farm: Ray shutdown", "-", stop_s, "-"),
        ("farm: end to end", str(n), farm_total, rate(n, farm_total)),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'mode':<{width}}  {'images':>6}  {'seconds':>8}  {'images/s':>8}")
    for mode, images, seconds, per_s in rows:
        print(f"{mode:<{width}}  {images:>6}  {seconds:>8.2f}  {per_s:>8}")
    print(f"ratio farm/plain, rendering phase vs loop (images/s): {loop_s / phase_s:.2f}x  (goal >= 1.0x)")
    print(f"ratio farm/plain, run_job vs loop (images/s):         {loop_s / job_s:.2f}x")
    print(f"ratio farm/plain, end to end (images/s):              {plain_total / farm_total:.2f}x")
    # Other work on the CPUs skews both modes badly (torch's threads contend), the plain loop most.
    warn_if_busy(busy_before)
    return 0


def warn_if_busy(busy_before: float | None) -> None:
    """Warn when other work kept over a quarter of the CPUs busy before or after the runs."""
    busy = [b for b in (busy_before, busy_cpus()) if b is not None]
    if busy and max(busy) > 0.25 * (os.cpu_count() or 1):
        before_after = " / ".join(f"{b:.1f}" for b in busy)
        print(f"warning: other work kept {before_after} of {os.cpu_count()} CPUs busy (before / after the runs);")
        print("         these figures are probably skewed: rerun on an idle machine")


if __name__ == "__main__":
    sys.exit(main())
