"""Animation: flicker and throughput of independent, chained, flow, text-motion and ControlNet frames.

What it measures. ``jobs/assets/clip.mp4`` (24 frames, 12 fps) goes through img2img on the
``tiny`` preset (by default 128x128, 20 steps, euler, strength 0.5, seed 7, one prompt) as an
animate job in several modes, each rendered with ``farm.driver.run_job`` on one Ray started
here (2 actors by default):

- **independent**: every frame its own task, batched and fanned out over all actors;
- **chained**: each frame's init image blends in the frame rendered before (``blend``), so a
  shot renders one frame at a time;
- **chained + colour**: the same, with ``color_coherence`` (LAB matching to frame 0);
- **chained + farneback** / **chained + dis**: the same as chained, with the frame before warped
  along the clip's optical flow (``flow``) before it is blended in;
- **text + 2D motion**: no clip, the same number of frames from text: frame 0 is txt2img, each
  next frame img2img of the one before, zoomed and turned (``motion``; ``--zoom``, ``--angle``);
- **chained + ControlNet**: chained, with a canny ControlNet on each source frame
  (``controlnet: [{model: tiny-controlnet, image: source, preprocess: canny}]``): the embedded
  preset, tiny's UNet as a ControlNet with its zero convolutions randomised from a fixed seed, so it
  steers without having learnt anything.

For each: frames/s once the actors are up, the flicker farm reports (the mean absolute
difference between consecutive output frames, 0-255), and the compensated flicker (the same
once the motion is undone: frame n-1 moved along the source clip's optical flow, Farneback
unless the row's ``flow`` is DIS, or by the frame's 2D motion). Chained mode should flicker less,
and costs throughput, since a shot's frames cannot share a batch or run on two actors at once.
A row whose job cannot run (say, ControlNets not wired into the actors yet) prints its error.

Run: ``python benchmarks/animation.py [--size 128] [--steps 20] [--blend 0.3] [--actors 2]
[--frames 24] [--only independent,chained]``. ``FARM_HOME`` is pointed at a temporary folder
(removed at exit) when unset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "jobs" / "assets" / "clip.mp4"
CLIP_FRAMES = 24
JOB = """
name: {name}
kind: animate
model: tiny
scheduler: euler
defaults: {{steps: {steps}, width: {size}, height: {size}, prompt: "a house, wooden carving", seed: 7,
            strength: {strength}{extra}}}
animate: {animate}
"""
# mode -> (animate section, extra defaults). {end}: the clip's frames used.
SOURCE = "source: {clip}, end: {end}"
CHAINED = SOURCE + ", mode: chained, blend: {blend}"
MODES = {
    "independent": ("{{" + SOURCE + "}}", ""),
    "chained": ("{{" + CHAINED + "}}", ""),
    "chained + colour": ("{{" + CHAINED + ", color_coherence: true}}", ""),
    "chained + farneback": ("{{" + CHAINED + ", flow: farneback}}", ""),
    "chained + dis": ("{{" + CHAINED + ", flow: dis}}", ""),
    "text + 2D motion": ('{{frames: {end}, motion: {{zoom: "0:({zoom})", angle: "0:({angle})"}}}}', ""),
    "chained + ControlNet": (
        "{{" + CHAINED + "}}",
        ", controlnet: [{{model: tiny-controlnet, image: source, preprocess: canny, scale: 1}}]",
    ),
}


def figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--blend", type=float, default=0.3)
    parser.add_argument("--zoom", type=float, default=1.02, help="text + 2D motion: zoom per frame")
    parser.add_argument("--angle", type=float, default=0.5, help="text + 2D motion: degrees per frame")
    parser.add_argument("--frames", type=int, default=CLIP_FRAMES, help=f"the clip's first N frames (1-{CLIP_FRAMES})")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated modes to run (default: all)")
    args = parser.parse_args()
    if not 1 <= args.frames <= CLIP_FRAMES:
        parser.error(f"--frames: 1 to {CLIP_FRAMES}")
    modes = dict(MODES)
    if args.only:
        chosen = [m.strip() for m in args.only.split(",")]
        unknown = [m for m in chosen if m not in MODES]
        if unknown:
            parser.error(f"--only: unknown mode {unknown[0]!r}; modes are {', '.join(MODES)}")
        modes = {m: MODES[m] for m in chosen}

    temporary = None
    if not os.environ.get("FARM_HOME"):
        temporary = tempfile.mkdtemp(prefix="farm-bench-")
        os.environ["FARM_HOME"] = temporary
    import ray

    from farm.driver import RenderOptions, run_job
    from farm.errors import FarmError
    from farm.presets import ensure_tiny
    from farm.spec import load_job

    ensure_tiny()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="farm-anim-") as folder:
            print(
                f"clip {CLIP.name} ({args.frames} frames), {args.size}x{args.size}, {args.steps} steps, "
                f"strength {args.strength}, blend {args.blend}, zoom {args.zoom}, angle {args.angle}, "
                f"{args.actors} actors"
            )
            print(f"{'mode':<21} {'frames':>6} {'frames/s':>9} {'end to end':>11} {'flicker':>8} {'compensated':>12}")
            values = {
                "clip": CLIP,
                "end": args.frames,
                "blend": args.blend,
                "zoom": args.zoom,
                "angle": args.angle,
            }
            for index, (mode, (animate, extra)) in enumerate(modes.items()):
                name = f"mode{index}"
                job = Path(folder, f"{name}.yaml")
                job.write_text(
                    JOB.format(
                        name=name,
                        steps=args.steps,
                        size=args.size,
                        strength=args.strength,
                        extra=extra.format(**values),
                        animate=animate.format(**values),
                    )
                )
                options = RenderOptions(
                    out=str(Path(folder, "out")), actors=args.actors, batch_size=args.batch_size, progress=False
                )
                try:
                    summary = run_job(load_job(job), options)
                except FarmError as exc:  # a row that cannot run says why; the others still run
                    print(f"{mode:<21} error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                if summary.failed or not summary.flicker:
                    reason = summary.errors[0].splitlines()[0][:200] if summary.errors else "no video"
                    print(f"{mode:<21} {summary.failed} of {summary.total} frames failed: {reason}")
                    continue
                compensated = summary.flicker_compensated[0] if summary.flicker_compensated else None
                print(
                    f"{mode:<21} {summary.rendered:>6} {summary.rendering_images_per_second:>9.2f} "
                    f"{summary.images_per_second:>11.2f} {summary.flicker[0]:>8.2f} {figure(compensated):>12}"
                )
    finally:
        ray.shutdown()
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
