"""The training loop of scripts/shapes/train.py and what makes it deterministic and resumable: per-step
seeds, batches drawn inline or ahead by worker processes, the learning-rate schedule, atomic checkpoints."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.shapes import dataset

STAGES = {"vae": 1, "unet": 2, "scale": 3}  # each stage's own stream of data and noise
FINAL_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of the peak learning rate


def step_seed(seed: int, stage: str, step: int) -> int:
    return int(np.random.SeedSequence([seed, STAGES[stage], step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_generators(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    value = step_seed(seed, stage, step)
    return np.random.default_rng(value), torch.Generator().manual_seed(value)


def draw(job: tuple) -> tuple[np.ndarray, list[str], list[dataset.Attributes]]:
    """``dataset.batch_at(*job)``: a module-level function, so worker processes can run it."""
    return dataset.batch_at(*job)


class Images:
    """Batches of the dataset, drawn inline or ahead by ``--workers`` processes: the same batches either way
    (a batch is a pure function of its job: seed, first index, count, resolution, shapes)."""

    def __init__(self, workers: int, ahead: int = 8) -> None:
        # spawn, not fork: the parent holds torch's and OpenCV's thread pools, which a forked child inherits broken.
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers else None
        self.ahead = ahead
        self.pending: dict[tuple, Any] = {}

    def batch(
        self, job_of: Callable[[int], tuple], step: int
    ) -> tuple[np.ndarray, list[str], list[dataset.Attributes]]:
        """Step ``step``'s batch, ``job_of(step)``; the next ``ahead`` steps' are started meanwhile."""
        if self.pool is None:
            return draw(job_of(step))
        for ahead in range(step, step + self.ahead):
            job = job_of(ahead)
            if job not in self.pending:
                self.pending[job] = self.pool.apply_async(draw, (job,))
        return self.pending.pop(job_of(step)).get()

    def each(self, jobs: Sequence[tuple]) -> Any:
        """The batches of ``jobs``, in order."""
        return map(draw, jobs) if self.pool is None else self.pool.imap(draw, jobs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)


def learning_rate(peak: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then a cosine down to FINAL_LR_FRACTION of the peak at the planned last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomic(obj: Any, path: Path) -> None:
    staging = path.with_name(path.name + ".tmp")
    torch.save(obj, staging)
    os.replace(staging, path)


class Stop(Exception):
    """SIGTERM: checkpoint and leave."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Stop()


def format_minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train_loop(
    name: str,
    args: argparse.Namespace,
    steps: int,
    minutes: float,
    step_fn: Callable[[int], dict[str, float]],
    state: dict[str, Any],
    checkpoint: Path,
    make_checkpoint: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``step_fn(step)`` from the checkpointed step until ``steps`` or ``minutes`` of training time;
    checkpoint every ``--checkpoint-minutes`` and on the way out. Returns the stage's record."""
    step, elapsed = state.get("step", 0), state.get("elapsed", 0.0)
    first_step, first_elapsed = step, elapsed  # this invocation's speed is measured from here
    history: list[dict[str, float]] = state.get("history", [])
    window: list[dict[str, float]] = []
    last_save = time.perf_counter()
    stopped = "steps"

    def save() -> None:
        save_atomic({**make_checkpoint(), "step": step, "elapsed": elapsed, "history": history}, checkpoint)

    if step:
        print(f"[{name}] resuming at step {step} ({format_minutes(elapsed)} trained)", flush=True)
    try:
        while step < steps:
            if elapsed >= minutes * 60:
                stopped = "minutes"
                break
            start = time.perf_counter()
            figures = step_fn(step)
            elapsed += time.perf_counter() - start
            step += 1
            window.append(figures)
            if step % args.log_every == 0 or step == steps:
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                history.append(
                    {"step": step, "elapsed": round(elapsed, 2), **{k: round(v, 6) for k, v in mean.items()}}
                )
                shown = " ".join(f"{k} {v:.4f}" for k, v in mean.items())
                per_step = (elapsed - first_elapsed) / (step - first_step)
                print(
                    f"[{name}] step {step}/{steps} {shown} {per_step:.3f} s/step trained {format_minutes(elapsed)}",
                    flush=True,
                )
                window = []
            if time.perf_counter() - last_save > args.checkpoint_minutes * 60:
                save()
                last_save = time.perf_counter()
    except (KeyboardInterrupt, Stop):
        save()
        print(f"[{name}] stopped at step {step}; checkpoint {checkpoint}; run the same command to resume", flush=True)
        raise SystemExit(130) from None
    save()
    if stopped == "minutes":
        print(f"[{name}] the {minutes:g}-minute budget ended the stage at step {step} of {steps}", flush=True)
    return {
        "steps_planned": steps,
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "ended_by": stopped,
        "history": history,
    }
