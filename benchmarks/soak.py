"""Soak: a few hundred tasks while actors die at random and the driver is killed twice.

What it does. A grid job on ``tiny`` (by default 300 tasks at 64x64, 4 steps, batches of 4)
renders through the real ``farm render`` command, in its own process group, three times:

1. the first run is killed (SIGKILL to its whole process group: the driver and its embedded
   Ray, as a crashed machine would lose them) once about a third of the tasks have rows;
2. the second run resumes and is killed the same way at about two thirds;
3. the third run resumes and finishes.

All along, a killer thread SIGKILLs one render actor (``ray::BatchRenderer``) every
``--kill-every`` seconds on average (uniformly 0.5x to 1.5x), so batches are lost mid-render
and retried on the actors Ray restarts. A last run without the killer renders whatever a
batch that lost too many actors left failed (it prints how many it had to).

Then it reads every manifest part as written (not through farm's readers, which show one
row per task) and prints: tasks, ok rows, duplicates (ok rows beyond one per task), lost
(tasks without an ok row) and mismatched (ok rows whose PNG's sha256 differs from the row's).
Nothing lost, nothing twice: the last three must be 0.

Run: ``python benchmarks/soak.py [--seeds 75] [--kill-every 3] [--actors 2]``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

JOB = """
name: soak
model: tiny
scheduler: euler
defaults: {{steps: 4, width: 64, height: 64, guidance: 7.5}}
sweep:
  prompt: [a cute shiba inu, a red house, a blue car, a green tree]
  seed: {{range: [0, {seeds}]}}
"""
PROMPTS = 4


def raw_image_rows(root: Path) -> list[dict]:
    """Every image row of every part file, as written (duplicates included)."""
    import pyarrow.parquet as pq

    rows = []
    for part in sorted((root / "manifest").glob("part-*.parquet")):
        table = pq.read_table(part, columns=["task_id", "status", "capture", "image_path", "image_sha256"])
        rows += [r for r in table.to_pylist() if r["capture"] is None]
    return rows


def ok_rows(root: Path) -> int:
    return sum(r["status"] == "ok" for r in raw_image_rows(root)) if (root / "manifest").exists() else 0


def start(job: Path, out: Path, actors: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "farm.cli", "render", str(job), "--out", str(out), "--actors", str(actors)]
    cmd += ["--batch-size", "4", "--flush-seconds", "1", "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::BatchRenderer"], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def killer(stop: threading.Event, every: float, kills: list[int], rng: random.Random) -> None:
    """SIGKILL one render actor at random intervals until told to stop."""
    while not stop.wait(every * rng.uniform(0.5, 1.5)):
        pids = actor_pids()
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills.append(1)


def run_until(job: Path, out: Path, actors: int, rows_at_least: int | None) -> tuple[str, int | None]:
    """One ``farm render``; with ``rows_at_least``, SIGKILL it (and its Ray) once that many ok rows landed."""
    root = out / "soak"
    proc = start(job, out, actors)
    while proc.poll() is None:
        if rows_at_least is not None and ok_rows(root) >= rows_at_least:
            kill_group(proc)
            return "killed", None
        time.sleep(0.5)
    output = proc.stdout.read() if proc.stdout else ""
    return output.strip().splitlines()[0] if output.strip() else "", proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=75, help="seeds per prompt (4 prompts)")
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between actor kills")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the killer's random seed")
    args = parser.parse_args()
    own_home = "FARM_HOME" not in os.environ
    if own_home:
        os.environ["FARM_HOME"] = tempfile.mkdtemp(prefix="farm-soak-home-")
    work = Path(tempfile.mkdtemp(prefix="farm-soak-"))
    try:
        job = work / "soak.yaml"
        job.write_text(JOB.format(seeds=args.seeds))
        out = work / "out"
        total = PROMPTS * args.seeds
        kills: list[int] = []
        stop = threading.Event()
        thread = threading.Thread(target=killer, args=(stop, args.kill_every, kills, random.Random(args.seed)))
        thread.start()
        start_time = time.perf_counter()
        try:
            for fraction in (1 / 3, 2 / 3, None):
                at = None if fraction is None else int(total * fraction)
                outcome, code = run_until(job, out, args.actors, at)
                print(f"run: {outcome if code is None else f'exit {code}: {outcome}'}", flush=True)
        finally:
            stop.set()
            thread.join()
        outcome, code = run_until(job, out, args.actors, None)  # what too many lost actors left failed
        print(f"last run, no killer: exit {code}: {outcome}", flush=True)
        elapsed = time.perf_counter() - start_time

        rows = raw_image_rows(out / "soak")
        ok = [r for r in rows if r["status"] == "ok"]
        per_task = Counter(r["task_id"] for r in ok)
        mismatched = sum(
            hashlib.sha256((out / "soak" / r["image_path"]).read_bytes()).hexdigest() != r["image_sha256"]
            if (out / "soak" / r["image_path"]).exists()
            else True
            for r in ok
        )
        print(f"actors killed: {len(kills)}; driver killed: 2; {elapsed:.0f} s in all")
        print(f"tasks: {total}")
        print(f"ok rows: {len(ok)}")
        print(f"duplicates: {sum(n - 1 for n in per_task.values())}")
        print(f"lost: {total - len(per_task)}")
        print(f"mismatched: {mismatched}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if own_home:
            shutil.rmtree(os.environ["FARM_HOME"], ignore_errors=True)


if __name__ == "__main__":
    main()
