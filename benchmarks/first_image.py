"""First image: how long a big sweep waits for its first image, against a one-image job.

What it measures. Two jobs on the ``tiny`` preset (64x64, 20 steps), each through the real
``farm render`` command in a fresh process, as a user runs it:

- **one task**: a one-image job, end to end (the command's whole run: imports, Ray start,
  actor start and model load, the render, Ray's shutdown);
- **big sweep**: ``--tasks`` tasks (default 10^6: 100 prompts x 10,000 seeds), from the
  command's start to its first PNG on disk; the run is then stopped with Ctrl-C (it saves what
  it finished, as any interrupted run does).

Goal (issue 16): the big sweep's first image within 1.5x of the one-task job's end-to-end time.
Before planning streamed, a 10^6-task sweep computed every task id before Ray started: 101.8 s
to its first image against 20.7 s for one task on the 2-core development machine.

Run: ``python benchmarks/first_image.py [--tasks 1000000] [--repeat 1]``. ``FARM_HOME`` is pointed
at a temporary folder when unset (the preset is built there once, before the timed runs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grid_throughput import busy_cpus, in_own_farm_home, warn_if_busy

PROMPTS = 100
# How often the big sweep's images folder is looked at while waiting for its first PNG (s).
POLL_SECONDS = 0.05
# A run that shows no image in this long is stuck: it is stopped and reported.
TIMEOUT_SECONDS = 600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000, help="tasks in the big sweep (default 10^6)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each job; the median is shown (default 1)")
    return parser.parse_args(argv)


def job_yaml(name: str, prompts: int, seeds: int) -> str:
    lines = "\n".join(f"    - prompt number {i}, a watercolor painting of a castle" for i in range(prompts))
    return (
        f"name: {name}\nmodel: tiny\nscheduler: euler\ndefaults: {{steps: 20, width: 64, height: 64}}\n"
        f"sweep:\n  prompt:\n{lines}\n  seed: {{range: [0, {seeds}]}}\n"
    )


def farm_command(job: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "farm.cli", "render", str(job), "--out", str(out), "--no-progress"]


def one_task(folder: Path) -> tuple[float, dict[str, float]]:
    """Seconds for a one-image job, command start to exit, and where its run's time went
    (summary.json: Ray's start, the whole start-up, the first image, the run)."""
    job = folder / "one.yaml"
    job.write_text(job_yaml("one", 1, 1))
    start = time.perf_counter()
    subprocess.run(farm_command(job, folder / "out-one"), check=True, capture_output=True)
    seconds = time.perf_counter() - start
    summary = json.loads((folder / "out-one" / "one" / "summary.json").read_text())
    return seconds, {key: summary[key] for key in ("ray_start_s", "startup_s", "first_image_s", "elapsed_s")}


def big_sweep(folder: Path, tasks: int) -> float:
    """Seconds from the command's start to the big sweep's first PNG; then the run is stopped."""
    job = folder / "big.yaml"
    prompts = min(PROMPTS, tasks)
    job.write_text(job_yaml("big", prompts, tasks // prompts))
    images = folder / "out-big" / "big" / "images"
    start = time.perf_counter()
    proc = subprocess.Popen(farm_command(job, folder / "out-big"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not (images.is_dir() and any(p.suffix == ".png" for p in images.iterdir())):
            if proc.poll() is not None:
                raise RuntimeError(f"farm render ended before its first image: {proc.stdout.read().decode()}")
            if time.perf_counter() - start > TIMEOUT_SECONDS:
                raise RuntimeError(f"no image after {TIMEOUT_SECONDS} s")
            time.sleep(POLL_SECONDS)
        return time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)  # saves what it finished, shuts Ray down
        proc.communicate(timeout=120)


def benchmark(args: argparse.Namespace) -> int:
    from farm.presets import ensure_tiny

    ensure_tiny()  # built once, outside the timed runs
    busy_before = busy_cpus()
    ones, bigs, splits = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="farm-first-image-") as tmp:
            seconds, split = one_task(Path(tmp))
            ones.append(seconds)
            splits.append(split)
            bigs.append(big_sweep(Path(tmp), args.tasks))
    one, big = statistics.median(ones), statistics.median(bigs)
    split = {key: statistics.median(s[key] for s in splits) for key in splits[0]}
    print(f"first image: tiny 64x64, 20 steps, farm render in a fresh process; {os.cpu_count()} CPUs")
    print(f"  one task, end to end:                 {one:6.1f} s")
    print(
        f"    of which run_job {split['elapsed_s']:.1f} s: Ray {split['ray_start_s']:.1f} s, actor (imports, "
        f"model load) {split['startup_s'] - split['ray_start_s']:.1f} s, first image at "
        f"{split['first_image_s']:.1f} s; the rest: the command's imports, reading the job, Ray's shutdown"
    )
    print(f"  {args.tasks} tasks, to the first image:  {big:6.1f} s")
    print(f"  ratio: {big / one:.2f}x  (goal <= 1.5x)")
    warn_if_busy(busy_before)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_own_farm_home(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
