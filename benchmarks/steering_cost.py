"""Steering cost: what each technique adds to a batch's render time, against plain rendering.

What it measures. One batch of ``--batch`` tasks (default 8) on the ``tiny`` preset, euler,
``--steps`` steps at ``--size`` pixels, rendered by ``farm.render.render_batch`` in this
process (no Ray, one torch thread on CPU, as a CPU actor runs), once plain and once per
technique. Each is rendered ``--repeat`` times after one warm-up; the median is reported as
seconds per image and as a ratio to plain. On CUDA it also reports each run's peak GPU memory.

The techniques: a variation seed (slerp), a perturbation, img2img at strength 0.5 (half the
steps run, plus a VAE encode), a two-prompt mix, a token mix, a textual-inversion token, the
color loss every 10 steps and every step (each guidance step decodes x0 and backpropagates
through the VAE decoder), and capturing latents and x0 at every step (2 x steps frames
decoded per image).

Run: ``python benchmarks/steering_cost.py [--batch 8] [--steps 20] [--size 64] [--repeat 3] [--device cpu|cuda]``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from grid_throughput import in_own_farm_home


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="tasks in the batch (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per technique; the median is shown")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    return parser.parse_args(argv)


def techniques(folder: str) -> dict[str, Callable[[Any], Any]]:
    """Technique name -> a function from a plain task to that task with the technique."""
    import dataclasses

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from farm.spec import Embedding, GuidanceLoss, MixPart, TokenMix

    init_path = os.path.join(folder, "init.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(init_path)
    style_path = os.path.join(folder, "style.safetensors")
    save_file({"<style>": torch.randn(32, generator=torch.Generator().manual_seed(0))}, style_path)
    blue = GuidanceLoss(name="color", target=(None, None, 0.9), scale=200.0)

    def with_(**fields: Any) -> Callable[[Any], Any]:
        return lambda task: dataclasses.replace(task, **fields)

    def img2img(task: Any) -> Any:
        start = task.steps - int(task.steps * 0.5)
        return dataclasses.replace(task, init_image=init_path, init_image_sha256="", strength=0.5, start_step=start)

    return {
        "plain": with_(),
        "variation (slerp 0.3)": lambda t: dataclasses.replace(t, variation_seed=t.seed + 1000, variation_strength=0.3),
        "perturbation (0.1)": lambda t: dataclasses.replace(t, variation_seed=t.seed + 1000, perturb_scale=0.1),
        "img2img (strength 0.5)": img2img,
        "prompt mix (2 prompts)": with_(prompt="", mix=(MixPart("a cute dog", 0.5), MixPart("a skunk", 0.5))),
        "token mix": with_(prompt="a cute puppy", token_mix=(TokenMix("puppy", "skunk", 0.5),)),
        "textual inversion": with_(prompt="a <style> dog", embeddings=(Embedding(style_path, ""),)),
        "color loss every 10 steps": with_(guidance_loss=blue),
        "color loss every step": with_(guidance_loss=dataclasses.replace(blue, every=1)),
        "capture latents + x0": with_(capture=("latents", "x0")),
    }


def benchmark(args: argparse.Namespace) -> None:
    import torch

    from farm.embeddings import load_embeddings
    from farm.images import fit_image
    from farm.models import load_components, pick_dtype, resolve_model
    from farm.render import render_batch
    from farm.spec import RenderTask

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # what a CPU actor uses (farm.driver.CPU_THREADS)
    components = load_components(resolve_model("tiny"), device, pick_dtype(device, "auto"))
    folder = tempfile.mkdtemp(prefix="farm-steering-")
    try:
        base = [
            RenderTask("tiny", "euler", "a cute dog", "blurry", seed, args.steps, 7.5, args.size, args.size)
            for seed in range(args.batch)
        ]
        rows = []
        for name, change in techniques(folder).items():
            tasks = [change(t) for t in base]
            init = None
            if tasks[0].init_image:
                with open(tasks[0].init_image, "rb") as f:
                    init = [fit_image(f.read(), args.size, args.size)] * len(tasks)
            embeddings = load_embeddings(tasks[0].embeddings)  # the actor reads them once per model
            times, peaks = [], []
            for run in range(args.repeat + 1):  # the first run warms up caches and kernels
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                render_batch(components, tasks, init, embeddings)
                if device == "cuda":
                    torch.cuda.synchronize()
                    peaks.append(torch.cuda.max_memory_allocated() / 2**20)
                if run:
                    times.append(time.perf_counter() - start)
            rows.append((name, statistics.median(times) / len(tasks), max(peaks) if peaks else None))
        plain = rows[0][1]
        print(
            f"steering cost: tiny {args.size}x{args.size}, {args.steps} steps, euler, batch {args.batch}, "
            f"{device} ({components.dtype}), median of {args.repeat}"
        )
        header = f"{'technique':<28} {'s/image':>9} {'x plain':>8}" + ("  peak MiB" if device == "cuda" else "")
        print(header)
        for name, seconds, peak in rows:
            line = f"{name:<28} {seconds:>9.4f} {seconds / plain:>7.2f}x"
            print(line + (f"  {peak:>8.0f}" if peak is not None else ""))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        benchmark(args)
        return 0

    return in_own_farm_home(run)


if __name__ == "__main__":
    sys.exit(main())
