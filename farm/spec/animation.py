"""Animation jobs: the ``animate:`` and ``walk:`` sections of a job, read into per-frame task fields.

``kind: animate`` pushes every frame of a clip (a video file or a folder of images) through
img2img, with keyframed schedules, prompts keyed by frame and a seed per frame;
``mode: chained`` blends each frame's init image with the frame rendered before it.
``kind: walk`` is text only: N frames between each pair of prompts and seeds, by slerp of
the prompt embeddings and of the starting noise. Every sweep combination is one shot.
Both produce an ``Animation`` (task.py), whose frames ``JobSpec.tasks`` (job.py) expands.

This module reads only its own sections; it imports the values (task.py) and the checks of
one value (fields.py), never job.py, which calls ``parse_animation``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farm.models import farm_home, file_sha256
from farm.schedules import ScheduleError, parse_keyed_prompts, parse_schedule, prompt_at
from farm.spec.fields import (
    ANIMATION_MODES,
    MAX_SEED,
    SpecError,
    check_value,
    choice,
    entry_weight,
    flag,
    is_number,
    show,
    whole,
    with_entry_weight,
)
from farm.spec.task import INT_FIELDS, Animation, MixPart, SeedStep

ANIMATE_FIELDS = (
    "source",
    "start",
    "end",
    "stride",
    "fps",
    "mode",
    "prompts",
    "prompt_blend",
    "seed",
    "blend",
    "color_coherence",
    "flow",
    "schedules",
    "frames",
    "motion",
)
WALK_FIELDS = ("prompts", "seeds", "frames", "loop", "fps", "schedules")
# Optical flow methods a chained frame's previous image can be warped by (farm.motion; OpenCV).
FLOW_METHODS = ("farneback", "dis")
# Deforum's 2D motion schedules and their still values: zoom per frame (1: none), angle in
# degrees, translation in pixels per frame.
MOTION_FIELDS = ("zoom", "angle", "translation_x", "translation_y")
MOTION_DEFAULTS = {"zoom": "0:(1)", "angle": "0:(0)", "translation_x": "0:(0)", "translation_y": "0:(0)"}
# A motion frame's default img2img strength (the share of steps run): Deforum's default strength
# schedule, 0.65, keeps 65% of the warped frame before, which is diffusers' strength 0.35.
MOTION_STRENGTH = 0.35
# Numbers a schedule may drive, frame by frame. Width and height are left out (a video has
# one size), and seeds have their own key (``seed: fixed | iter | schedule``).
SCHEDULE_FIELDS = ("guidance", "strength", "start_step", "steps", "variation_strength", "perturb_scale")
# Deforum's default frame rate; a video source gives its own.
DEFAULT_FPS = 12.0
MAX_FPS = 240.0
# Chained frames: the share of the frame rendered before that goes into the next init image.
DEFAULT_BLEND = 0.5
# One shot's frames are held in memory as field tuples; a day of video at 1 fps is 86,400.
MAX_FRAMES = 100_000
# What OpenCV is asked to decode; anything else is refused before it tries.
VIDEO_READ_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg")


# Called once every check has passed: decodes a video's frames into the cache, and hashes
# every source frame (path -> sha256). A refused job writes nothing, not even to the cache.
Materialise = Callable[[], dict[str, str]]


def parse_animation(
    kind: str, section: Any, defaults: dict[str, Any], axes: list, base_dir: Path
) -> tuple[Animation, Materialise]:
    """Read an ``animate:`` or ``walk:`` section -> (the animation, what makes its source frames)."""
    if not isinstance(section, dict):
        needs = "source (a video or a folder of images)" if kind == "animate" else "prompts (a list)"
        raise SpecError(f"{kind}: expected a mapping with {needs}")
    allowed = ANIMATE_FIELDS if kind == "animate" else WALK_FIELDS
    unknown = [k for k in section if k not in allowed]
    if unknown:
        raise SpecError(f"{kind}.{unknown[0]}: unknown field; expected one of {', '.join(allowed)}")
    swept = {n for names, _ in axes for n in names}
    if kind == "animate":
        animation, materialise = _parse_animate(section, defaults, swept, base_dir)
    else:
        animation, materialise = _parse_walk(section, defaults, swept), dict
    # A swept field that every frame sets anyway would give each shot the same tasks.
    for name, _ in animation.frames[0]:
        if name in swept:
            raise SpecError(f"sweep.{name}: this {kind} job sets {name} on every frame; it cannot also be swept")
    return animation, materialise


def _parse_animate(
    section: dict[str, Any], defaults: dict[str, Any], swept: set[str], base_dir: Path
) -> tuple[Animation, Materialise]:
    # 1. The source frames
    if defaults["init_image"] is not None or "init_image" in swept:
        raise SpecError("init_image: an animate job's init images are its source frames (animate.source)")
    if "motion" in section or "frames" in section:
        return _parse_motion(section, defaults, swept), dict
    if "source" not in section:
        raise SpecError(
            "animate.source: missing; give a video file or a folder of images, "
            "or frames and motion for an animation from text"
        )
    paths, source_fps, materialise = read_source(section["source"], section, base_dir)

    # 2. Mode, frame rate, blend and colour coherence
    mode = choice(section.get("mode", "independent"), "animate.mode", ANIMATION_MODES)
    for name in ("blend", "color_coherence", "flow"):
        if name in section and mode != "chained":
            raise SpecError(f"animate.{name}: only for mode: chained (it reads the frame rendered before)")
    color_coherence = flag(section.get("color_coherence", False), "animate.color_coherence")
    fps = _fps(section, "animate", source_fps)

    # 3. Per-frame fields: source frame, prompt, seed, schedules, blend
    frames: list[dict[str, Any]] = [{"init_image": str(p)} for p in paths]
    _apply_prompts(section, defaults, swept, frames)
    _apply_seed(section.get("seed", "fixed"), swept, frames)
    _apply_schedules("animate", section.get("schedules"), defaults, swept, frames)
    if mode == "chained":
        blend = _schedule("animate.blend", section.get("blend", DEFAULT_BLEND))
        for k, frame in enumerate(frames):
            frame["blend"] = check_value("blend", round(blend.value_at(k), 10), f"animate.blend (frame {k})")
        if "flow" in section:
            method = choice(section["flow"], "animate.flow", FLOW_METHODS)
            frames[0].update(flow=None, flow_from=None)  # frame 0 has no frame before it to warp
            for before, frame in zip(frames, frames[1:], strict=False):
                frame.update(flow=method, flow_from=before["init_image"])
    animation = Animation(
        frames=tuple(tuple(sorted(f.items())) for f in frames), mode=mode, fps=fps, color_coherence=color_coherence
    )
    return animation, materialise


def _parse_motion(section: dict[str, Any], defaults: dict[str, Any], swept: set[str]) -> Animation:
    """An animation from text with Deforum's 2D motion: frame 0 is txt2img; each next frame is
    img2img of the frame before, warped by that frame's zoom, angle and translation."""
    # 1. No source: the frames are a count, chained by nature
    for name in ("source", "mode", "blend", "flow", "start", "end", "stride"):
        if name in section:
            raise SpecError(
                f"animate.{name}: not with motion; an animation from text (frames and motion) has no source "
                "clip and is chained by nature"
            )
    count = whole(
        section.get("frames"), "animate.frames", 1, MAX_FRAMES, f"a whole number of frames from 1 to {MAX_FRAMES}"
    )
    motion = section.get("motion", {})
    if not isinstance(motion, dict):
        raise SpecError(
            f'animate.motion: expected a mapping of {", ".join(MOTION_FIELDS)} -> schedule, like zoom: "0:(1.02)"'
        )
    unknown = [k for k in motion if k not in MOTION_FIELDS]
    if unknown:
        raise SpecError(f"animate.motion.{unknown[0]}: unknown field; expected one of {', '.join(MOTION_FIELDS)}")
    schedules = {
        name: _schedule(f"animate.motion.{name}", motion.get(name, MOTION_DEFAULTS[name])) for name in MOTION_FIELDS
    }

    # 2. Per-frame fields: prompt, seed, schedules, then the motion and strength of every frame after the first
    frames: list[dict[str, Any]] = [{} for _ in range(count)]
    _apply_prompts(section, defaults, swept, frames)
    _apply_seed(section.get("seed", "fixed"), swept, frames)
    _apply_schedules("animate", section.get("schedules"), defaults, swept, frames)
    for k, frame in enumerate(frames):
        if k == 0:  # txt2img: nothing before it to warp
            frame.update(motion=None, strength=None, start_step=None)
            continue
        values = tuple(round(float(schedules[name].value_at(k)), 10) for name in MOTION_FIELDS)
        if not all(math.isfinite(v) for v in values) or values[0] <= 0:
            raise SpecError(f"animate.motion (frame {k}): expected finite numbers and a zoom above 0, got {values}")
        frame["motion"] = values
        if frame.get("start_step") is None and frame.get("strength") is None:
            frame["strength"] = defaults["strength"] if defaults["strength"] is not None else MOTION_STRENGTH
        frame.setdefault("start_step", None)
        frame.setdefault("strength", None)
    return Animation(
        frames=tuple(tuple(sorted(f.items())) for f in frames),
        mode="chained",
        fps=_fps(section, "animate"),
        color_coherence=flag(section.get("color_coherence", False), "animate.color_coherence"),
    )


def read_source(source: Any, section: dict[str, Any], base_dir: Path) -> tuple[list[Path], float | None, Materialise]:
    """The source frames' paths (absolute) between start, end and stride, the video's frame
    rate over the stride, and what decodes and hashes them (a video's frames are decoded
    once, into a cache named by the video's hash, so a rerun finds the same files)."""
    # Here, not at the top: farm.video loads numpy and PIL, which a job without a source
    # never needs, so ``import farm.spec`` stays as light as it was before the package.
    from farm.images import check_input_pixels
    from farm.video import VideoError, extract_frames, list_image_folder, probe_video, video_frame_size

    if not isinstance(source, str) or not source:
        raise SpecError("animate.source: expected a path to a video file or a folder of images")
    path = Path(source).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    start = whole(section.get("start", 0), "animate.start", 0)
    stride = whole(section.get("stride", 1), "animate.stride", 1)
    end = section.get("end")
    try:
        if path.is_dir():
            files = list_image_folder(path)
            total, fps = len(files), None
        elif path.is_file():
            if path.suffix.lower() not in VIDEO_READ_SUFFIXES:
                raise SpecError(f"animate.source: {source}: expected a video ({', '.join(VIDEO_READ_SUFFIXES)})")
            try:  # before probe_video, which decodes every frame at full size
                check_input_pixels(*video_frame_size(path))
            except ValueError as exc:
                raise SpecError(f"animate.source: {source}: {exc}") from exc
            info = probe_video(path)
            total, fps, files = info.frame_count, info.fps, None
        else:
            raise SpecError(f"animate.source: no such file or folder: {source}")
        end = total if end is None else whole(end, "animate.end", 1)
        if start >= total or end > total or start >= end:
            raise SpecError(
                f"animate: frames {start} to {end} (end exclusive) are not within the source's {total} frames"
            )
        indices = list(range(start, end, stride))
        if len(indices) > MAX_FRAMES:
            raise SpecError(f"animate: {len(indices)} frames; at most {MAX_FRAMES} in one shot")
        if files is not None:
            chosen = [files[i] for i in indices]
            return chosen, None, lambda: hash_files(chosen, check_size=True)
        folder = farm_home() / "frames" / file_sha256(path)

        def materialise() -> dict[str, str]:
            try:
                return hash_files(extract_frames(path, indices, folder))
            except VideoError as exc:
                raise SpecError(f"animate.source: {exc}") from exc
            except OSError as exc:  # the frame cache cannot be written
                raise SpecError(f"animate.source: cannot decode into {folder} ({exc.strerror or exc})") from exc

        return [folder / f"{i:06d}.png" for i in indices], (fps / stride if fps else None), materialise
    except VideoError as exc:
        raise SpecError(f"animate.source: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"animate.source: cannot read {source} ({exc.strerror or exc})") from exc


def hash_files(paths: list[Path], check_size: bool = False) -> dict[str, str]:
    """path -> sha256 of each source frame; with ``check_size`` (a folder's own images, which farm
    did not decode), each is first refused if its header says it is over the input pixel limit."""
    from farm.images import check_input_image

    hashes: dict[str, str] = {}
    try:
        for path in paths:
            if check_size:
                check_input_image(path)
            hashes[str(path)] = file_sha256(path)
    except ValueError as exc:
        raise SpecError(f"animate.source: {path}: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"animate.source: cannot read {exc.filename} ({exc.strerror or exc})") from exc
    return hashes


def _apply_prompts(section: dict[str, Any], defaults: dict[str, Any], swept: set[str], frames: list[dict]) -> None:
    """Prompts keyed by frame: held until the next key, or blended by prompt mixing (``prompt_blend``)."""
    blend = flag(section.get("prompt_blend", False), "animate.prompt_blend")
    if "prompts" not in section:
        if blend:
            raise SpecError("animate.prompt_blend: needs animate.prompts (prompts keyed by frame)")
        return
    for name in ("prompt", "mix"):
        if name in swept or (name == "mix" and defaults["mix"]):
            raise SpecError(f"animate.prompts: sets each frame's prompt; {name} cannot also be given")
    try:
        keys = parse_keyed_prompts(section["prompts"])
    except ScheduleError as exc:
        raise SpecError(f"animate.prompts: {exc}") from exc
    for k, frame in enumerate(frames):
        parts = prompt_at(keys, k, blend)
        if len(parts) == 1:
            frame.update(prompt=parts[0][0], mix=())
        else:  # a mix replaces the prompt (an empty prompt says so)
            frame.update(prompt="", mix=tuple(MixPart(p, w) for p, w in parts))


def _apply_seed(seed: Any, swept: set[str], frames: list[dict]) -> None:
    """``fixed``: the shot's seed on every frame; ``iter``: +1 a frame; or a schedule."""
    if seed == "fixed":
        return
    if "seed" in swept:
        raise SpecError("animate.seed: seed is swept (one shot per seed); use seed: fixed, or stop sweeping it")
    if seed == "iter":
        for k, frame in enumerate(frames):
            frame["seed"] = SeedStep(k)
        return
    if not isinstance(seed, str) or ":" not in seed:
        raise SpecError(f'animate.seed: expected fixed, iter or a schedule like "0:(1), 10:(20)", got {show(seed)}')
    schedule = _schedule("animate.seed", seed)
    for k, frame in enumerate(frames):
        frame["seed"] = _seed(schedule.value_at(k), f"animate.seed (frame {k})")


def _apply_schedules(kind: str, schedules: Any, defaults: dict[str, Any], swept: set[str], frames: list[dict]) -> None:
    """Keyframed numbers (Deforum's ``"0:(0.65), 10:(0.4)"``), one value per frame."""
    if schedules is None:
        return
    if not isinstance(schedules, dict):
        raise SpecError(f'{kind}.schedules: expected a mapping of field -> schedule, like strength: "0:(0.65)"')
    for name, text in schedules.items():
        where = f"{kind}.schedules.{name}"
        entry = entry_weight(name)
        if name not in SCHEDULE_FIELDS and entry is None:
            raise SpecError(
                f"{where}: not a field a schedule can drive; expected one of {', '.join(SCHEDULE_FIELDS)}, "
                "mix.N.weight, loras.N.weight or controlnet.N.scale"
            )
        field_name = name if entry is None else entry[0]
        if name in swept or field_name in swept:
            raise SpecError(f"{where}: {field_name} is also swept; schedule it or sweep it")
        if name in frames[0] or field_name in frames[0]:
            raise SpecError(f"{where}: this {kind} job already sets {field_name} on every frame")
        schedule = _schedule(where, text)
        if entry is not None:
            entries = defaults[field_name]
            if entry[1] >= len(entries):
                raise SpecError(f"{where}: defaults.{field_name} has {len(entries)} entries (numbered from 0)")
            for k, frame in enumerate(frames):
                weight = check_value(name, round(schedule.value_at(k), 10), f"{where} (frame {k})")
                frame[field_name] = with_entry_weight(field_name, frame.get(field_name, entries), entry[1], weight)
            continue
        for k, frame in enumerate(frames):
            # Rounded as range and linspace values are: 0.575, not 0.5750000000000001.
            value = round(schedule.value_at(k)) if name in INT_FIELDS else round(schedule.value_at(k), 10)
            frame[name] = check_value(name, value, f"{where} (frame {k})")


def _parse_walk(section: dict[str, Any], defaults: dict[str, Any], swept: set[str]) -> Animation:
    """N frames from each prompt and seed to the next: slerp of the prompt embeddings and of the noise."""
    for name in ("prompt", "mix", "seed", "variation_seed", "variation_strength", "perturb_scale", "init_image"):
        if name in swept:
            raise SpecError(f"sweep.{name}: a walk sets {name} on every frame (walk.prompts and walk.seeds)")
    if defaults["mix"] or defaults["init_image"] is not None:
        name = "mix" if defaults["mix"] else "init_image"
        raise SpecError(f"defaults.{name}: a walk is text only, between walk.prompts")
    prompts = section.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise SpecError("walk.prompts: expected a list of prompts (text)")
    seeds_in = section.get("seeds", defaults["seed"])
    if seeds_in == "random":
        raise SpecError("walk.seeds: expected whole numbers; a walk needs its seeds written down")
    seeds = seeds_in if isinstance(seeds_in, list) else [seeds_in] * len(prompts)
    if len(seeds) != len(prompts):
        raise SpecError(f"walk.seeds: {len(seeds)} seeds for {len(prompts)} prompts; give one seed, or one per prompt")
    seeds = [_seed(s, f"walk.seeds[{i}]") for i, s in enumerate(seeds)]
    steps = whole(section.get("frames", 8), "walk.frames", 1)
    loop = flag(section.get("loop", False), "walk.loop")
    stops = list(zip(prompts, seeds, strict=True)) + ([(prompts[0], seeds[0])] if loop else [])
    if len(set(stops)) < 2:
        raise SpecError("walk.prompts: a walk needs two different stops (two prompts, or two seeds in walk.seeds)")
    count = (len(stops) - 1) * steps + (0 if loop else 1)
    if count > MAX_FRAMES:  # checked before the frames are made: they are held in memory
        raise SpecError(f"walk: {count} frames; at most {MAX_FRAMES} in one shot")
    frames = [walk_frame(a, b, k / steps) for a, b in itertools.pairwise(stops) for k in range(steps)]
    if not loop:
        frames.append(walk_frame(stops[-1], stops[-1], 0.0))
    _apply_schedules("walk", section.get("schedules"), defaults, swept, frames)
    return Animation(frames=tuple(tuple(sorted(f.items())) for f in frames), fps=_fps(section, "walk"))


def walk_frame(a: tuple[str, int], b: tuple[str, int], t: float) -> dict[str, Any]:
    """The fields of the frame at ``t`` (0 to 1) from prompt and seed ``a`` to ``b``.

    At t = 0 it is ``a``'s own task (no mix, no variation), so a walk's key frames are the
    images those prompts and seeds give alone.
    """
    (prompt_a, seed_a), (prompt_b, seed_b) = a, b
    frame: dict[str, Any] = {
        "prompt": prompt_a,
        "mix": (),
        "mix_mode": "sum",
        "seed": seed_a,
        "variation_seed": None,
        "variation_strength": 0.0,
    }
    if t > 0 and prompt_a != prompt_b:
        frame.update(prompt="", mix=(MixPart(prompt_a, 1.0 - t), MixPart(prompt_b, t)), mix_mode="slerp")
    if t > 0 and seed_a != seed_b:
        frame.update(variation_seed=seed_b, variation_strength=t)
    return frame


def _fps(section: dict[str, Any], kind: str, source_fps: float | None = None) -> float:
    """``fps`` as given, else the source video's (over the stride), else DEFAULT_FPS."""
    if "fps" not in section:
        return source_fps if source_fps and math.isfinite(source_fps) and source_fps > 0 else DEFAULT_FPS
    fps = section["fps"]
    if not is_number(fps) or not 0 < fps <= MAX_FPS:
        raise SpecError(f"{kind}.fps: expected frames per second above 0, at most {MAX_FPS:g}, got {show(fps)}")
    return float(fps)


def _schedule(where: str, text: Any):
    try:
        return parse_schedule(text)
    except ScheduleError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _seed(value: Any, where: str) -> int:
    """A frame's seed; a schedule's value between two keys is rounded to the nearest seed."""
    if isinstance(value, float) and math.isfinite(value):
        value = round(value)
    return whole(value, where, 0, MAX_SEED)
