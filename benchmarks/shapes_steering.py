"""Shapes steering: do img2img, variation sweeps, walks and the colour loss do on `shapes` what they claim? (issue 17)

Four measures, each through farm's own render core as an actor runs it (``farm.render.render_batch`` on
the CPU in float32, tasks built the way the spec builds them), read by the OpenCV checker
(scripts/shapes/checker.py, no learned model):

- **img2img**: a red circle drawn by the dataset (medium or large, at a random place of the 3x3 grid, on a
  background that suits red and blue alike) rendered again with the prompt "a blue circle" at strength 0.7.
  Counted: the shape now reads blue; it kept its place (its centre within ``PLACE_TOLERANCE`` of the
  side from the source's); it still reads as a circle.
- **variations**: a prompt and seed swept towards a variation seed, strength 0, 0.1, ..., 1. Each step's
  change (mean absolute pixel difference between neighbours) against the full swap's (strength 0 vs 1):
  smooth when every step changes the image less than the full swap does.
- **walk**: ``walk_frame`` (what ``kind: walk`` renders) from one prompt and seed to another in
  ``--frames`` steps. It passes through both when its first frame reads as the first prompt and its last
  as the second (colour and shape); also printed: how often the reading changes along the way.
- **colour loss**: the same prompts and seeds without and with ``guidance_loss: {name: color, target:
  [null, null, 0.9]}`` (the notebook's "make it blue", its scale 200 every 10 steps). Bluer: the mean of
  blue minus the mean of red and green, over the image, goes up.

Goals (``GOALS``; ``--strict`` exits 1 when one is missed).

Run: ``python benchmarks/shapes_steering.py [MODEL] [--count 16] [--steps 20] [--json]``; MODEL defaults to
the ``shapes`` preset. ``FARM_HOME`` is pointed at a temporary folder when unset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shapes_quality import model_facts, run_strict  # noqa: E402  (this script's folder is on sys.path)

from scripts.shapes import checker, dataset  # noqa: E402

GOALS = {
    "img2img_blue": 0.9,  # share of red circles that read blue after img2img
    "img2img_place": 0.9,  # ... whose centre stayed put
    "variation_smooth": 1.0,  # share of sweeps whose every step changes the image less than the full swap
    "walk_through_both": 0.9,  # share of walks whose first frame reads as prompt A and last as prompt B
    "color_bluer": 0.9,  # share of images the colour loss made bluer
}
STRENGTH = 0.7
# A kept place: the centre moved by less than this fraction of the side (a grid step is 0.22).
PLACE_TOLERANCE = 0.08
VARIATION_STRENGTHS = tuple(round(0.1 * k, 1) for k in range(11))
COLOR_TARGET = (None, None, 0.9)
# Seeds from their own range, past anything training drew (it draws from numpy streams, not these seeds).
FIRST_SEED = 2_000_000
CASE_SEED = 2_000_003


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="shapes", help="a preset name or model folder (default shapes)")
    parser.add_argument("--count", type=int, default=16, help="cases per measure (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--scheduler", default="euler", help="a farm scheduler name (default euler)")
    parser.add_argument("--frames", type=int, default=8, help="walk frames from one prompt to the next (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a CPU actor)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    for name in ("count", "steps", "frames", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1")
    return args


class Renderer:
    """Render tasks through farm's render core, in batches as the driver would group them."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        import torch

        from farm.models import load_components, resolve_model

        torch.set_num_threads(args.threads)
        self.args = args
        self.model = model
        resolved = resolve_model(model)
        self.side, self.shapes = model_facts(model, Path(resolved.path))
        self.components = load_components(resolved, "cpu", "float32")
        self.render_s = 0.0
        self.images = 0

    def task(self, prompt: str, seed: int, **fields: Any) -> Any:
        from farm.spec import RenderTask

        a, side = self.args, self.side
        return RenderTask(self.model, a.scheduler, prompt, "", seed, a.steps, a.guidance, side, side, **fields)

    def render(self, tasks: list[Any], init_images: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Images in task order; tasks grouped by batch key, at most 8 to a batch."""
        from farm.render import render_batch

        init_images = init_images or [None] * len(tasks)
        groups: dict[tuple, list[int]] = {}
        for i, task in enumerate(tasks):
            groups.setdefault(task.batch_key, []).append(i)
        images: list[np.ndarray | None] = [None] * len(tasks)
        start = time.perf_counter()
        for members in groups.values():
            for first in range(0, len(members), 8):
                chunk = members[first : first + 8]
                result = render_batch(self.components, [tasks[i] for i in chunk], [init_images[i] for i in chunk])
                for i, image in zip(chunk, result.images, strict=True):
                    images[i] = image
        self.render_s += time.perf_counter() - start
        self.images += len(tasks)
        return images  # type: ignore[return-value]


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference, 0-255."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def blueness(image: np.ndarray) -> float:
    """Mean of blue minus the mean of red and green, 0-255 units: up when an image turns bluer."""
    x = image.astype(np.float32)
    return float((x[..., 2] - (x[..., 0] + x[..., 1]) / 2).mean())


def img2img_figures(renderer: Renderer, count: int, side: int) -> dict[str, Any]:
    """A red circle -> "a blue circle" at STRENGTH: turned blue, kept its place, still a circle."""
    from farm.spec import img2img_start_step

    backgrounds = [b for b in dataset.ALLOWED_BACKGROUNDS["red"] if b in dataset.ALLOWED_BACKGROUNDS["blue"]]
    sources, tasks = [], []
    start_step = img2img_start_step(renderer.args.steps, STRENGTH)  # as a job resolves strength
    for i in range(count):
        rng = np.random.default_rng([CASE_SEED, 1, i])
        position = tuple(dataset.POSITIONS)[int(rng.integers(len(dataset.POSITIONS)))]
        size = ("medium", "large")[int(rng.integers(2))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        fx, fy = dataset.POSITIONS[position]
        drawn = dataset.Attributes(
            "circle", "red", background, size, position, (fx * side, fy * side), dataset.SIZES[size] * side,
            dataset.COLOURS["red"], dataset.COLOURS[background], (),
        )  # fmt: skip
        sources.append(dataset.render(drawn, side))
        tasks.append(
            renderer.task(
                "a blue circle", FIRST_SEED + i, init_image=f"red-circle-{i}.png", strength=STRENGTH,
                start_step=start_step,
            )
        )  # fmt: skip
    images = renderer.render(tasks, sources)
    blue = place = circle = 0
    moves = []
    for source, image in zip(sources, images, strict=True):
        before, after = checker.read(source), checker.read(image)
        blue += after.colour == "blue"
        circle += after.shape == "circle"
        if after.colour is not None:
            move = float(
                np.hypot(after.features["x"] - before.features["x"], after.features["y"] - before.features["y"])
            )
            moves.append(move)
            place += move < PLACE_TOLERANCE
    return {
        "cases": count,
        "strength": STRENGTH,
        "img2img_blue": blue / count,
        "img2img_place": place / count,
        "img2img_circle": circle / count,
        "median_move": float(np.median(moves)) if moves else None,
    }


def case_prompt(rng: np.random.Generator, shapes: Sequence[str], side: int) -> tuple[str, dataset.Attributes]:
    drawn = dataset.draw_attributes(rng, shapes, side, "all")
    return dataset.caption(drawn.shape, drawn.colour, None, drawn.background, None), drawn


def variation_figures(renderer: Renderer, count: int, shapes: Sequence[str], side: int) -> dict[str, Any]:
    """Sweeps from a seed towards a variation seed: each step's change against the full swap's."""
    tasks = []
    for i in range(count):
        prompt, _ = case_prompt(np.random.default_rng([CASE_SEED, 2, i]), shapes, side)
        seed, other = FIRST_SEED + 2 * i, FIRST_SEED + 2 * i + 1
        tasks += [renderer.task(prompt, seed, variation_seed=other, variation_strength=s) for s in VARIATION_STRENGTHS]
    images = renderer.render(tasks)
    per = len(VARIATION_STRENGTHS)
    smooth, ratios = 0, []
    for i in range(count):
        sweep = images[i * per : (i + 1) * per]
        full = difference(sweep[0], sweep[-1])
        steps = [difference(a, b) for a, b in zip(sweep, sweep[1:], strict=False)]
        ratio = max(steps) / full if full > 0 else float("inf")
        ratios.append(ratio)
        smooth += ratio < 1.0
    return {
        "cases": count,
        "strengths": list(VARIATION_STRENGTHS),
        "variation_smooth": smooth / count,
        "largest_step_over_full_median": float(np.median(ratios)),
        "largest_step_over_full_max": float(np.max(ratios)),
    }


def walk_figures(renderer: Renderer, count: int, frames: int, shapes: Sequence[str], side: int) -> dict[str, Any]:
    """Walks from one prompt and seed to another: first frame reads as A, last as B."""
    from farm.spec.animation import walk_frame

    tasks, truths = [], []
    for i in range(count):
        rng = np.random.default_rng([CASE_SEED, 3, i])
        while True:  # two prompts apart in colour and shape, so "reads as B" cannot happen by staying at A
            (a, drawn_a), (b, drawn_b) = case_prompt(rng, shapes, side), case_prompt(rng, shapes, side)
            if drawn_a.colour != drawn_b.colour and drawn_a.shape != drawn_b.shape:
                break
        stops = ((a, FIRST_SEED + 2 * i), (b, FIRST_SEED + 2 * i + 1))
        fields = [walk_frame(*stops, k / frames) for k in range(frames)] + [walk_frame(stops[1], stops[1], 0.0)]
        tasks += [renderer.task(**f) for f in fields]
        truths.append((drawn_a, drawn_b))
    images = renderer.render(tasks)
    per = frames + 1
    through, changes = 0, []
    for i, (drawn_a, drawn_b) in enumerate(truths):
        readings = [checker.read(image, shapes) for image in images[i * per : (i + 1) * per]]
        first, last = readings[0], readings[-1]
        through += (first.colour, first.shape) == (drawn_a.colour, drawn_a.shape) and (last.colour, last.shape) == (
            drawn_b.colour,
            drawn_b.shape,
        )
        reads = [(r.colour, r.shape) for r in readings]
        changes.append(sum(x != y for x, y in zip(reads, reads[1:], strict=False)))
    return {
        "cases": count,
        "frames": per,
        "walk_through_both": through / count,
        "reading_changes_median": float(np.median(changes)),
    }


def color_loss_figures(renderer: Renderer, count: int, shapes: Sequence[str], side: int) -> dict[str, Any]:
    """The same prompts and seeds without and with the colour loss towards blue 0.9."""
    from farm.spec import GuidanceLoss

    loss = GuidanceLoss("color", COLOR_TARGET)
    plain, steered = [], []
    for i in range(count):
        prompt, _ = case_prompt(np.random.default_rng([CASE_SEED, 4, i]), shapes, side)
        plain.append(renderer.task(prompt, FIRST_SEED + i))
        steered.append(renderer.task(prompt, FIRST_SEED + i, guidance_loss=loss))
    images = renderer.render(plain + steered)
    before = [blueness(image) for image in images[:count]]
    after = [blueness(image) for image in images[count:]]
    return {
        "cases": count,
        "loss": {"name": loss.name, "target": list(loss.target), "scale": loss.scale, "every": loss.every},
        "color_bluer": sum(b > a for a, b in zip(before, after, strict=True)) / count,
        "blueness_without": float(np.mean(before)),
        "blueness_with": float(np.mean(after)),
        "blue_channel_without": float(np.mean([image[..., 2].mean() for image in images[:count]])),
        "blue_channel_with": float(np.mean([image[..., 2].mean() for image in images[count:]])),
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Every measure on one loaded model; returns the figures."""
    start = time.perf_counter()
    renderer = Renderer(args.model, args)
    load_s = time.perf_counter() - start
    side, shapes = renderer.side, renderer.shapes
    figures = {
        "model": args.model,
        "model_hash": renderer.components.model_hash,
        "size": side,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "img2img": img2img_figures(renderer, args.count, side),
        "variations": variation_figures(renderer, args.count, shapes, side),
        "walk": walk_figures(renderer, args.count, args.frames, shapes, side),
        "color_loss": color_loss_figures(renderer, args.count, shapes, side),
    }
    figures.update(load_s=load_s, render_s_per_image=renderer.render_s / max(renderer.images, 1))
    return figures


def goal_figures(figures: dict[str, Any]) -> dict[str, float]:
    """The figure each goal is about, by goal name."""
    return {
        name: figures[part][name]
        for part in ("img2img", "variations", "walk", "color_loss")
        for name in GOALS
        if name in figures[part]
    }


def report(figures: dict[str, Any], args: argparse.Namespace) -> bool:
    print(
        f"model {figures['model']} (hash {figures['model_hash'][:12]}), {figures['size']}x{figures['size']}, "
        f"{figures['scheduler']} {figures['steps']} steps, guidance {figures['guidance']}; "
        f"load {figures['load_s']:.1f} s, render {1000 * figures['render_s_per_image']:.0f} ms/image"
    )
    i, v, w, c = (figures[k] for k in ("img2img", "variations", "walk", "color_loss"))
    print(
        f"  img2img: {i['cases']} red circles -> 'a blue circle' at strength {i['strength']}: "
        f"blue {100 * i['img2img_blue']:.0f}%, kept place {100 * i['img2img_place']:.0f}% "
        f"(median move {100 * (i['median_move'] or 0):.1f}% of the side), "
        f"still a circle {100 * i['img2img_circle']:.0f}%"
    )
    print(
        f"  variations: {v['cases']} sweeps of {len(v['strengths'])} strengths: every step below the full swap in "
        f"{100 * v['variation_smooth']:.0f}% (largest step / full swap: "
        f"median {v['largest_step_over_full_median']:.2f}, max {v['largest_step_over_full_max']:.2f})"
    )
    print(
        f"  walk: {w['cases']} walks of {w['frames']} frames: through both prompts {100 * w['walk_through_both']:.0f}%"
        f" (the reading changes {w['reading_changes_median']:.0f} times along a walk, median)"
    )
    print(
        f"  colour loss {c['loss']}: bluer {100 * c['color_bluer']:.0f}% of {c['cases']} images; blue - (red+green)/2 "
        f"{c['blueness_without']:.1f} -> {c['blueness_with']:.1f}, blue channel {c['blue_channel_without']:.1f} -> "
        f"{c['blue_channel_with']:.1f} (0-255)"
    )
    met = True
    for name, value in goal_figures(figures).items():
        ok = value >= GOALS[name]
        met &= ok
        print(f"  {name:18s} {100 * value:5.1f}%  goal >= {GOALS[name]:.0%}: {'met' if ok else 'MISSED'}")
    if args.json:
        print(json.dumps(figures))
    return met


def main(argv: Sequence[str] | None = None) -> int:
    return run_strict(evaluate, report, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
