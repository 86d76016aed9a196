"""Shapes quality: does a model trained by scripts/shapes/train.py draw what its prompts say? (issue 17)

What it measures. ``--count`` prompts in the shapes grammar ("a [size] <colour> <shape> on a <colour>
background[, <position>]": the background always named, size and position each half the time), by
default only (shape, colour, background) combinations the training split never held
(``dataset.triples(shapes, "heldout")``), each rendered once with a seed the training never used
(10^6 + i), through farm's own render core as an actor runs it (``farm.models.resolve_model`` +
``load_components`` on the CPU in float32, ``farm.render.render_batch``), at the model's native size.
Each image goes to the OpenCV checker (scripts/shapes/checker.py, no learned model), which reads the
background (the border's dominant named colour), the shape's colour (the dominant non-background
colour) and the shape (by its outline: circularity, corners, solidity, holes) and, where the prompt
names them, its size and position. Printed: the pass rate per attribute against the goals, the shape
confusion, the prompts that failed (``--show``), the render time.

Goals (issue 17): colour >= 90%, background >= 90%, shape >= 70%. ``--strict`` exits 1 when one is missed.

Run: ``python benchmarks/shapes_quality.py MODEL [--count 96] [--steps 20] [--guidance 7.5]
[--scheduler euler] [--split heldout|train|all] [--batch 8] [--threads 1] [--sheet sheet.png] [--json]``.
MODEL is a diffusers folder written by scripts/shapes/train.py (its train.json gives the native size
and the shapes it knows) or a preset name. ``FARM_HOME`` is pointed at a temporary folder when unset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grid_throughput import in_own_farm_home  # noqa: E402  (this script's folder is on sys.path)

from scripts.shapes import checker, dataset  # noqa: E402

GOALS = {"colour": 0.90, "background": 0.90, "shape": 0.70}
# Prompts come from their own stream and render seeds start at 10^6: neither is anything training drew.
PROMPT_SEED = 1_000_003
FIRST_SEED = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a diffusers folder from scripts/shapes/train.py, or a preset name")
    parser.add_argument("--count", type=int, default=96, help="prompts, one image each (default 96)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--scheduler", default="euler", help="a farm scheduler name (default euler)")
    parser.add_argument("--split", choices=dataset.SPLITS, default="heldout", help="combinations to prompt")
    parser.add_argument("--size", type=int, help="width = height (default: the model's native size)")
    parser.add_argument("--shapes", help="comma-separated shapes to prompt (default: the model's, from train.json)")
    parser.add_argument("--batch", type=int, default=8, help="tasks per render_batch (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a CPU actor)")
    parser.add_argument("--sheet", help="write the images as one PNG contact sheet (8 a row, prompt order)")
    parser.add_argument("--show", type=int, default=12, help="failed prompts to print (default 12)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    for name in ("count", "steps", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1")
    return args


def model_facts(model: str, folder: Path) -> tuple[int, list[str]]:
    """The side a job on ``model`` renders at when it gives no size (farm's reading of its configs, VAE factor
    included), and the shapes it was trained on: train.json's, else the dataset's default."""
    from farm.models import reference_facts
    from farm.spec.family import native_size

    record = folder / "train.json"
    shapes = json.loads(record.read_text())["vocabulary"]["shapes"] if record.is_file() else dataset.DEFAULT_SHAPES
    return native_size(reference_facts(model))[0], list(shapes)


def prompts(count: int, shapes: list[str], size: int, split: str) -> list[tuple[str, dict[str, Any]]]:
    """``count`` prompts and the attributes each names (None: not named), from PROMPT_SEED."""
    made = []
    for i in range(count):
        rng = np.random.default_rng([PROMPT_SEED, i])
        drawn = dataset.draw_attributes(rng, shapes, size, split)
        named_size, named_position = rng.random(2) < 0.5
        truth = {
            "shape": drawn.shape,
            "colour": drawn.colour,
            "background": drawn.background,
            "size": drawn.size if named_size else None,
            "position": drawn.position if named_position else None,
        }
        text = dataset.caption(drawn.shape, drawn.colour, truth["size"], drawn.background, truth["position"])
        made.append((text, truth))
    return made


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Render the prompts through farm's render core and check every image; returns the figures."""
    import torch

    torch.set_num_threads(args.threads)
    from farm.models import load_components, resolve_model
    from farm.render import render_batch
    from farm.spec import RenderTask

    model = resolve_model(args.model)
    native, trained_shapes = model_facts(args.model, Path(model.path))
    size = args.size or native
    shapes = args.shapes.split(",") if args.shapes else trained_shapes
    start = time.perf_counter()
    components = load_components(model, "cpu", "float32")
    load_s = time.perf_counter() - start
    asked = prompts(args.count, shapes, size, args.split)
    images, render_s = [], 0.0
    for first in range(0, len(asked), args.batch):
        tasks = [
            RenderTask(args.model, args.scheduler, text, "", FIRST_SEED + i, args.steps, args.guidance, size, size)
            for i, (text, _) in enumerate(asked[first : first + args.batch], start=first)
        ]
        start = time.perf_counter()
        images.extend(render_batch(components, tasks).images)
        render_s += time.perf_counter() - start
    results, readings = [], []
    for image, (_, truth) in zip(images, asked, strict=True):
        results.append(checker.check(image, truth, shapes))
        readings.append(checker.read(image, shapes))
    rates = checker.pass_rates(results)
    confusion = Counter((truth["shape"], reading.shape) for (_, truth), reading in zip(asked, readings, strict=True))
    failures = [
        {"index": i, "prompt": text, "failed": {k: getattr(readings[i], k) for k, ok in results[i].items() if not ok}}
        for i, (text, _) in enumerate(asked)
        if not all(results[i].values())
    ]
    if args.sheet:
        write_sheet(args.sheet, images)
    return {
        "model": args.model,
        "model_hash": components.model_hash,
        "size": size,
        "shapes": shapes,
        "split": args.split,
        "count": len(asked),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "rates": {k: {"passed": p, "checked": n, "rate": p / n} for k, (p, n) in rates.items()},
        "confusion": {
            f"{a}->{b}": n for (a, b), n in sorted(confusion.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        },
        "failures": failures,
        "load_s": load_s,
        "render_s_per_image": render_s / len(asked),
    }


def write_sheet(path: str, images: list[np.ndarray]) -> None:
    import cv2

    side = images[0].shape[0] + 2
    columns = 8
    rows = -(-len(images) // columns)
    sheet = np.full((rows * side, columns * side, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = (i // columns) * side, (i % columns) * side
        sheet[y : y + image.shape[0], x : x + image.shape[1]] = image
    cv2.imwrite(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def report(figures: dict[str, Any], args: argparse.Namespace) -> bool:
    print(
        f"model {figures['model']} (hash {figures['model_hash'][:12]}), {figures['size']}x{figures['size']}, "
        f"shapes {','.join(figures['shapes'])}; {figures['count']} prompts ({figures['split']} combinations), "
        f"seeds {FIRST_SEED}.., {figures['scheduler']} {figures['steps']} steps, guidance {figures['guidance']}"
    )
    print(f"load {figures['load_s']:.1f} s, render {1000 * figures['render_s_per_image']:.0f} ms/image")
    met = True
    for name in checker.ATTRIBUTES:
        if name not in figures["rates"]:
            continue
        r = figures["rates"][name]
        goal = GOALS.get(name)
        verdict = "" if goal is None else (f"goal >= {goal:.0%}: " + ("met" if r["rate"] >= goal else "MISSED"))
        met &= goal is None or r["rate"] >= goal
        print(f"  {name:10s} {r['passed']:4d}/{r['checked']:<4d} {100 * r['rate']:5.1f}%  {verdict}")
    print("  shape asked->read: " + ", ".join(f"{k} {v}" for k, v in figures["confusion"].items()))
    for failure in figures["failures"][: args.show]:
        print(f"  #{failure['index']} {failure['prompt']!r}: read {failure['failed']}")
    if args.json:
        print(json.dumps({k: v for k, v in figures.items() if k != "failures"}))
    return met


def run_strict(
    evaluate: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any], argparse.Namespace], bool],
    args: argparse.Namespace,
) -> int:
    """``report(evaluate(args), args)`` in a FARM_HOME of its own; exit code 1 under --strict when a goal is missed."""

    def run() -> int:
        met = report(evaluate(args), args)
        return 1 if args.strict and not met else 0

    return in_own_farm_home(run)


def main(argv: list[str] | None = None) -> int:
    return run_strict(evaluate, report, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
