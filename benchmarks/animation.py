"""Animation: flicker and throughput of independent against chained frames on the same clip.

What it measures. ``jobs/assets/clip.mp4`` (24 frames, 12 fps) goes through img2img on the
``tiny`` preset (by default 128x128, 20 steps, euler, strength 0.5, seed 7, one prompt) as an
animate job in three modes, each rendered with ``farm.driver.run_job`` on one Ray started
here (2 actors by default):

- **independent**: every frame its own task, batched and fanned out over all actors;
- **chained**: each frame's init image blends in the frame rendered before (``blend``), so a
  shot renders one frame at a time;
- **chained + colour**: the same, with ``color_coherence`` (LAB matching to frame 0).

For each: frames/s once the actors are up, and the flicker farm reports (the mean absolute
difference between consecutive output frames, 0-255). Chained mode should flicker less, and
costs throughput, since a shot's frames cannot share a batch or run on two actors at once.

Run: ``python benchmarks/animation.py [--size 128] [--steps 20] [--blend 0.3] [--actors 2]``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "jobs" / "assets" / "clip.mp4"
JOB = """
name: {name}
kind: animate
model: tiny
scheduler: euler
defaults: {{steps: {steps}, width: {size}, height: {size}, prompt: "a house, wooden carving", seed: 7,
            strength: {strength}}}
animate: {animate}
"""
MODES = {
    "independent": "{{source: {clip}}}",
    "chained": "{{source: {clip}, mode: chained, blend: {blend}}}",
    "chained + colour": "{{source: {clip}, mode: chained, blend: {blend}, color_coherence: true}}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--blend", type=float, default=0.3)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    temporary = None
    if not os.environ.get("FARM_HOME"):
        temporary = tempfile.mkdtemp(prefix="farm-bench-")
        os.environ["FARM_HOME"] = temporary
    import ray

    from farm.driver import RenderOptions, run_job
    from farm.presets import ensure_tiny
    from farm.spec import load_job

    ensure_tiny()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="farm-anim-") as folder:
            print(
                f"clip {CLIP.name}, {args.size}x{args.size}, {args.steps} steps, strength {args.strength}, "
                f"blend {args.blend}, {args.actors} actors"
            )
            print(f"{'mode':<18} {'frames':>6} {'frames/s':>9} {'end to end':>11} {'flicker':>8}")
            for index, (mode, animate) in enumerate(MODES.items()):
                name = f"mode{index}"
                job = Path(folder, f"{name}.yaml")
                text = animate.format(clip=CLIP, blend=args.blend)
                job.write_text(
                    JOB.format(name=name, steps=args.steps, size=args.size, strength=args.strength, animate=text)
                )
                options = RenderOptions(
                    out=str(Path(folder, "out")), actors=args.actors, batch_size=args.batch_size, progress=False
                )
                summary = run_job(load_job(job), options)
                print(
                    f"{mode:<18} {summary.rendered:>6} {summary.rendering_images_per_second:>9.2f} "
                    f"{summary.images_per_second:>11.2f} {summary.flicker[0]:>8.2f}"
                )
    finally:
        ray.shutdown()
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
