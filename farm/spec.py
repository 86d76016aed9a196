"""Job YAML -> validated dataclasses -> a lazy stream of fully resolved ``RenderTask``s.

A job names a model and scheduler, gives ``defaults`` for every task field, and sweeps any
field: ``sweep`` is a cartesian product, ``zip`` makes fields vary together. Expansion puts
the fields that break a UNet batch outermost so tasks that can share a batch come out next
to each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import reprlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from farm.models import PRESETS, file_sha256, is_known_model_ref

# Names a job may use; render.py maps each to its diffusers class (a test keeps both in step).
SCHEDULERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m")
# The fields a task had before the steering techniques; the rest are omitted from the
# canonical JSON when unused (RenderTask.canonical_json).
CORE_FIELDS = ("model", "scheduler", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")
# Fields that must match for tasks to share one UNet batch, outermost first. The latter
# ones change the loop itself (where it starts, extra gradient steps, captured frames) or
# the text encoder's vocabulary and sequence length.
BATCH_FIELDS = (
    "model",
    "width",
    "height",
    "steps",
    "scheduler",
    "guidance",
    "start_step",
    "guidance_loss",
    "embeddings",
    "capture",
    "long_prompt",
)
TOP_LEVEL_FIELDS = (
    "name",
    "description",
    "kind",
    "model",
    "model_config",
    "scheduler",
    "defaults",
    "sweep",
    "zip",
    "perturb",
    "animate",
    "walk",
)
# grid: the sweep as written; perturb: one base seed x variation seeds x strengths;
# trajectory: every step captured (README, "Steering"); animate: img2img over a clip's
# frames; walk: text-only frames between prompts and seeds (README, "Animation").
KINDS = ("grid", "perturb", "trajectory", "animate", "walk")
ANIMATION_KINDS = ("animate", "walk")
ANIMATION_MODES = ("independent", "chained")
CAPTURE_KINDS = ("latents", "x0")
LONG_PROMPT_MODES = ("truncate", "chunk")
MIX_MODES = ("sum", "slerp")
# diffusers' img2img default strength, used when a task has an init image and neither
# strength nor start_step.
DEFAULT_STRENGTH = 0.8
# Beyond 10 the base noise is under 10% of the mix: a new image, not a perturbation.
MAX_PERTURB_SCALE = 10.0
# The notebook's "make it blue" numbers: loss scale 200, a guidance step every 10 steps.
DEFAULT_LOSS_SCALE = 200.0
DEFAULT_LOSS_EVERY = 10
# Fields tied together by check_task_fields.
CROSS_FIELDS = {
    "variation_seed",
    "variation_strength",
    "perturb_scale",
    "init_image",
    "strength",
    "start_step",
    "steps",
    "prompt",
    "mix",
    "mix_mode",
    "token_mix",
}
CUSTOM_LOSS = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Torch seeds are 64-bit, but A1111 and most tools use 32-bit seeds; staying in that range
# keeps farm's seeds portable to them.
MAX_SEED = 2**32 - 1
# Beyond these the job is almost certainly a typo (and would exhaust memory or time).
MAX_SIZE = 4096
MAX_STEPS = 1000
# One axis's values are held in memory (the product of axes is not): a million is plenty
# and still small, while {range: [0, 4294967295]} would exhaust memory.
MAX_AXIS_VALUES = 1_000_000
# A job's tasks are counted (and a rerun skips done ones) by walking them all: 100 million
# take minutes, which is nothing next to rendering them; far beyond is a typo in a sweep.
MAX_TASKS = 100_000_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SpecError(Exception):
    """A problem with a job spec, phrased for the user: names the field and what is expected."""


@dataclass(frozen=True)
class MixPart:
    """One prompt of an embedding mix and its weight."""

    prompt: str
    weight: float


@dataclass(frozen=True)
class TokenMix:
    """Blend the token embedding of ``token`` with that of ``other`` wherever ``token`` occurs."""

    token: str
    other: str
    weight: float


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion file; ``token`` None means the name stored in the file (or its stem)."""

    path: str
    sha256: str
    token: str | None = None


@dataclass(frozen=True)
class GuidanceLoss:
    """An extra loss on the decoded predicted x0, its gradient applied to the latents every ``every`` steps."""

    name: str  # "color" or "module:function"
    target: tuple[float | None, ...] = ()
    scale: float = 200.0
    every: int = 10


@dataclass(frozen=True)
class RenderTask:
    """One image to render: every input resolved, nothing left to a default."""

    model: str
    scheduler: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    # Steering techniques (README, "Steering"); each default means "not used".
    variation_seed: int | None = None
    variation_strength: float = 0.0
    perturb_scale: float = 0.0
    init_image: str | None = None
    init_image_sha256: str | None = None
    strength: float | None = None
    start_step: int = 0
    mix: tuple[MixPart, ...] = ()
    mix_mode: str = "sum"
    token_mix: tuple[TokenMix, ...] = ()
    embeddings: tuple[Embedding, ...] = ()
    guidance_loss: GuidanceLoss | None = None
    capture: tuple[str, ...] = ()
    long_prompt: str = "truncate"
    # Animation (README, "Animation"): the output frame number, and for a chained frame the
    # task whose image is blended into the init image (with weight ``blend``) and the task
    # whose image the init image's colours are matched to. Ids, not images, so a whole
    # chained shot is known (and resumable) before any of it is rendered.
    frame: int | None = None
    previous: str | None = None
    blend: float = 0.0
    color_reference: str | None = None

    @cached_property
    def task_id(self) -> str:
        """A hash of the canonical JSON of the task: the same work always has the same id."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    def canonical_json(self) -> str:
        """The task as JSON; technique fields left at their defaults are omitted, so a plain
        task keeps the id it had before those techniques existed."""
        data = self.to_dict()
        for f in dataclasses.fields(self)[len(CORE_FIELDS) :]:
            if getattr(self, f.name) == f.default:
                del data[f.name]
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RenderTask:
        """Rebuild a task from ``to_dict`` or canonical JSON (a manifest row's ``task_json``)."""
        fields = dict(data)
        fields["mix"] = tuple(MixPart(**m) for m in fields.get("mix", ()))
        fields["token_mix"] = tuple(TokenMix(**m) for m in fields.get("token_mix", ()))
        fields["embeddings"] = tuple(Embedding(**e) for e in fields.get("embeddings", ()))
        fields["capture"] = tuple(fields.get("capture", ()))
        loss = fields.get("guidance_loss")
        if loss is not None:
            fields["guidance_loss"] = GuidanceLoss(**{**loss, "target": tuple(loss.get("target", ()))})
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> RenderTask:
        return cls.from_dict(json.loads(text))

    def techniques(self) -> str:
        """The steering techniques this task uses, in a few words (for --dry-run)."""
        parts = []
        if self.variation_seed is not None:
            amount = f"scale {self.perturb_scale:g}" if self.perturb_scale else f"{self.variation_strength:g}"
            parts.append(f"variation {self.variation_seed} at {amount}")
        if self.init_image:
            parts.append(f"img2img {Path(self.init_image).name} from step {self.start_step}")
        if self.mix:
            parts.append(f"{self.mix_mode} of " + " + ".join(f"{m.weight:g} x {m.prompt!r}" for m in self.mix))
        parts += [f"{m.token} ~ {m.other} at {m.weight:g}" for m in self.token_mix]
        parts += [f"embedding {Path(e.path).name}" for e in self.embeddings]
        if self.guidance_loss:
            parts.append(f"loss {self.guidance_loss.name} every {self.guidance_loss.every}")
        if self.capture:
            parts.append(f"capture {'+'.join(self.capture)}")
        if self.long_prompt != "truncate":
            parts.append(f"long prompt {self.long_prompt}")
        if self.frame is not None:
            parts.append(f"frame {self.frame}")
        if self.previous:
            parts.append(f"blend {self.blend:g} of {self.previous[:8]}")
        if self.color_reference:
            parts.append(f"colours of {self.color_reference[:8]}")
        return ", ".join(parts)

    @property
    def batch_key(self) -> tuple:
        return tuple(getattr(self, name) for name in BATCH_FIELDS)


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(RenderTask))
INT_FIELDS = ("seed", "steps", "width", "height", "variation_seed", "start_step", "frame")
SEED_FIELDS = ("seed", "variation_seed")


@dataclass(frozen=True)
class Batch:
    """Tasks rendered together in one UNet batch; ``batch_id`` hashes their ids."""

    batch_id: str
    tasks: tuple[RenderTask, ...]

    @classmethod
    def of(cls, tasks: Iterable[RenderTask]) -> Batch:
        tasks = tuple(tasks)
        return cls(hashlib.sha256(",".join(t.task_id for t in tasks).encode()).hexdigest()[:16], tasks)


@dataclass(frozen=True)
class SeedStep:
    """An animation frame's seed: the shot's seed plus ``offset`` (``seed: iter``)."""

    offset: int


@dataclass(frozen=True)
class Animation:
    """The frames of one shot of an animate or walk job; every sweep combination is a shot.

    ``frames`` holds, per output frame, the task fields it sets (schedules already read),
    the same field names for every frame.
    """

    frames: tuple[tuple[tuple[str, Any], ...], ...]
    mode: str = "independent"  # or chained: each frame's init image takes in the frame before
    fps: float = 12.0
    color_coherence: bool = False


@dataclass(frozen=True)
class JobSpec:
    """A parsed, validated job. ``axes`` are the sweep axes, already in expansion order."""

    name: str
    defaults: dict[str, Any]
    axes: tuple[tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]], ...]
    model_config: str | None = None
    description: str = ""
    source: str = field(default="", repr=False)
    kind: str = "grid"
    # sha256 of every init image the job names (path -> hash), taken when the job is read.
    hashes: dict[str, str] = field(default_factory=dict, repr=False)
    animation: Animation | None = None

    @property
    def frames_per_shot(self) -> int:
        """Tasks per shot: an animation's frame count, else 1 (every task its own)."""
        return len(self.animation.frames) if self.animation else 1

    def count(self) -> int:
        """The number of tasks, without expanding them."""
        return math.prod(len(values) for _, values in self.axes) * self.frames_per_shot

    def tasks(self, random_base: int = 0) -> Iterator[RenderTask]:
        """Expand lazily; ``random_base`` fixes what every ``seed: random`` becomes.

        An animation's frames are the innermost axis, so a shot's frames come out together,
        in order; a chained frame names the task before it (and frame 0) by id.
        """
        names = [n for axis_names, _ in self.axes for n in axis_names]
        frames = self.animation.frames if self.animation else ((),)
        chained = self.animation is not None and self.animation.mode == "chained"
        index = 0
        for shot_index, combo in enumerate(itertools.product(*(values for _, values in self.axes))):
            shot = dict(self.defaults)
            shot.update(zip(names, itertools.chain.from_iterable(combo), strict=True))
            if self.animation and shot["seed"] == "random":  # one seed per shot, as a fixed seed is
                shot["seed"] = random_seed(random_base, f"shot:{shot_index}")
            first: RenderTask | None = None
            previous: RenderTask | None = None
            for frame, frame_fields in enumerate(frames):
                fields = dict(shot)
                fields.update(frame_fields)
                if self.animation is not None:
                    fields["frame"] = frame
                for name in SEED_FIELDS:
                    if fields[name] == "random":
                        # The plain seed keeps its original slot so existing runs draw the same seeds.
                        slot = f"task:{index}" + ("" if name == "seed" else f":{name}")
                        fields[name] = random_seed(random_base, slot)
                    elif isinstance(fields[name], RandomSlot):
                        fields[name] = random_seed(random_base, fields[name].slot)
                if isinstance(fields["seed"], SeedStep):
                    offset = fields["seed"].offset
                    fields["seed"] = (_resolved_seed(shot["seed"], random_base) + offset) % (MAX_SEED + 1)
                resolve_img2img(fields, self.hashes)
                if chained and previous is not None and first is not None:
                    fields.update(previous=previous.task_id)
                    if self.animation.color_coherence:  # type: ignore[union-attr]
                        fields.update(color_reference=first.task_id)
                else:
                    fields["blend"] = 0.0  # frame 0 has nothing before it to blend in
                task = RenderTask(**fields)
                first = first or task
                previous = task
                index += 1
                yield task


def resolve_img2img(fields: dict[str, Any], hashes: dict[str, str]) -> None:
    """Fill in the init image's hash, and both ``strength`` and ``start_step`` (both are recorded).

    ``strength`` follows diffusers: int(steps x strength) steps run, so the loop starts at
    ``steps - int(steps x strength)``; ``start_step`` is the notebook's "start at step 10 of 50".
    """
    if fields["init_image"] is None:
        fields["start_step"] = 0
        return
    fields["init_image_sha256"] = hashes[fields["init_image"]]
    steps = fields["steps"]
    if fields["start_step"] is None:
        if fields["strength"] is None:
            fields["strength"] = DEFAULT_STRENGTH
        fields["start_step"] = steps - min(int(steps * fields["strength"]), steps)
    else:
        fields["strength"] = (steps - fields["start_step"]) / steps


def _resolved_seed(seed: Any, random_base: int) -> int:
    return random_seed(random_base, seed.slot) if isinstance(seed, RandomSlot) else seed


@dataclass(frozen=True)
class RandomSlot:
    """One ``random`` entry in a seed sweep: a single seed shared across the other axes."""

    slot: str


def random_seed(base: int, slot: str) -> int:
    """A seed drawn for ``seed: random``: fixed for a run (and its resume) by ``base``."""
    return int.from_bytes(hashlib.sha256(f"{base}:{slot}".encode()).digest()[:4], "big")


# ---------------------------------------------------------------------------------------
# Loading and validation


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file; every problem is a ``SpecError`` naming the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read job file ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from exc
    return parse_job(text, default_name=path.stem, where=str(path), base_dir=path.parent)


def parse_job(text: str, default_name: str = "job", where: str = "job", base_dir: Path | None = None) -> JobSpec:
    """Parse job YAML text into a ``JobSpec``; relative file paths are relative to ``base_dir`` (the job's folder)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise SpecError(f"{where}: invalid YAML{at}: {problem}") from exc
    except ValueError as exc:  # an int of more than 4300 digits (Python's int-from-text limit)
        raise SpecError(f"{where}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    except RecursionError as exc:
        raise SpecError(f"{where}: invalid YAML: nested too deeply") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of fields (name, model, defaults, sweep, ...)")
    unknown = [k for k in data if k not in TOP_LEVEL_FIELDS]
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown field; expected one of {', '.join(TOP_LEVEL_FIELDS)}")

    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        source = "" if "name" in data else f" (none given, and the file name {default_name!r} cannot serve)"
        raise SpecError(f"name: expected letters, digits, '_', '-' or '.' (it names the output folder){source}")

    kind = data.get("kind", "grid")
    if kind not in KINDS:
        raise SpecError(f"kind: unknown kind {_show(kind)}; expected one of {', '.join(KINDS)}")
    for section in ("perturb", *ANIMATION_KINDS):
        if section in data and kind != section:
            raise SpecError(f"{section}: only for kind: {section}")
    defaults = _parse_defaults(data)
    axes = _parse_sweep(_or_empty(data, "sweep", {}), "sweep") + _parse_zip(_or_empty(data, "zip", []))
    if kind == "perturb":
        axes += _parse_perturb(data.get("perturb"), axes, defaults)
    if kind == "trajectory" and "capture" not in defaults_given(data) and not _swept(axes, "capture"):
        defaults["capture"] = CAPTURE_KINDS
    names = [n for axis_names, _ in axes for n in axis_names]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise SpecError(f"sweep.{sorted(repeated)[0]}: swept twice (in sweep and zip, or twice in zip)")
    animation = None
    if kind in ANIMATION_KINDS:
        from farm.animation import parse_animation

        animation, materialise = parse_animation(kind, data.get(kind), defaults, axes, base_dir or Path.cwd())
    count = math.prod(len(values) for _, values in axes) * (len(animation.frames) if animation else 1)
    if count > MAX_TASKS:
        raise SpecError(f"sweep: {count:.3g} tasks; at most {MAX_TASKS:,} in one job (split it into several)")
    hashes = _resolve_files(defaults, axes, base_dir or Path.cwd())
    check_combinations(defaults, axes + frame_axis(animation))
    model_config = data.get("model_config")
    if model_config is not None and not isinstance(model_config, str):
        raise SpecError("model_config: expected a path to a diffusers folder")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError("description: expected text")
    if animation is not None:  # last: only a job that passed every check decodes its source
        hashes |= materialise()
    return JobSpec(
        name=name,
        defaults=defaults,
        axes=tuple(_order_axes(axes)),
        model_config=model_config,
        description=description,
        source=text,
        kind=kind,
        hashes=hashes,
        animation=animation,
    )


def frame_axis(animation: Animation | None) -> list:
    """An animation's frames as one zipped axis, for the checks across fields."""
    if animation is None or not animation.frames[0]:
        return []
    names = tuple(name for name, _ in animation.frames[0])
    return [(names, tuple(tuple(value for _, value in frame) for frame in animation.frames))]


def defaults_given(data: dict[str, Any]) -> dict[str, Any]:
    given = data.get("defaults")
    return given if isinstance(given, dict) else {}


def _swept(axes: list, name: str) -> bool:
    return any(name in axis_names for axis_names, _ in axes)


def _parse_perturb(section: Any, axes: list, defaults: dict[str, Any]) -> list:
    """``kind: perturb``: one base seed, N variation seeds x a list of strengths."""
    if not isinstance(section, dict):
        raise SpecError("perturb: expected a mapping with seeds, strengths and optionally mode (slerp or scale)")
    unknown = [k for k in section if k not in ("seeds", "strengths", "mode")]
    if unknown:
        raise SpecError(f"perturb.{unknown[0]}: unknown field; expected seeds, strengths, mode")
    for name in ("seed", "variation_seed", "variation_strength", "perturb_scale"):
        if _swept(axes, name):
            raise SpecError(f"sweep.{name}: a perturb job has one base seed and sweeps variations in perturb:")
    mode = section.get("mode", "slerp")
    if mode not in ("slerp", "scale"):
        raise SpecError(f"perturb.mode: expected slerp or scale, got {_show(mode)}")
    if "seeds" not in section or "strengths" not in section:
        raise SpecError("perturb: needs seeds (a list, {range: ...} or {random: N}) and strengths (a list)")
    if defaults["seed"] == "random":  # one base seed for the whole job, drawn once
        defaults["seed"] = RandomSlot("defaults.seed")
    strength_field = "variation_strength" if mode == "slerp" else "perturb_scale"
    seeds = sweep_values("variation_seed", section["seeds"], "perturb.seeds")
    strengths = sweep_values(strength_field, section["strengths"], "perturb.strengths")
    return [(("variation_seed",), tuple((v,) for v in seeds)), ((strength_field,), tuple((v,) for v in strengths))]


def _resolve_files(defaults: dict[str, Any], axes: list, base_dir: Path) -> dict[str, str]:
    """Make init image and embedding paths absolute, check they exist, and hash them."""
    hashes: dict[str, str] = {}

    def resolve(path: str, where: str) -> str:
        full = Path(path).expanduser()
        full = full if full.is_absolute() else base_dir / full
        try:
            if not full.is_file():
                raise SpecError(f"{where}: no such file: {path}")
            resolved = str(full.resolve())
            if resolved not in hashes:
                hashes[resolved] = file_sha256(resolved)
        except OSError as exc:
            raise SpecError(f"{where}: cannot read {path} ({exc.strerror or exc})") from exc
        return resolved

    def fix(key: str, value: Any, where: str) -> Any:
        if key == "init_image" and value is not None:
            return resolve(value, where)
        if key == "embeddings":
            out = []
            for i, e in enumerate(value):
                path = resolve(e.path, f"{where}[{i}]")
                out.append(Embedding(path=path, sha256=hashes[path], token=e.token))
            return tuple(out)
        return value

    for key in ("init_image", "embeddings"):
        defaults[key] = fix(key, defaults[key], f"defaults.{key}")
    for i, (names, rows) in enumerate(axes):
        if "init_image" in names or "embeddings" in names:
            fixed = tuple(
                tuple(fix(n, v, f"sweep.{n}[{j}]") for n, v in zip(names, row, strict=True))
                for j, row in enumerate(rows)
            )
            axes[i] = (names, fixed)
    return hashes


def check_combinations(defaults: dict[str, Any], axes: list) -> None:
    """Checks across fields, on every combination of the values of the fields involved.

    Each value is first reduced to what the checks look at (is a variation seed given, is the
    prompt empty, ...), so a sweep of 50,000 seeds or prompts reduces to one or two values and
    the product of the axes involved stays small, however large the job.
    """
    relevant = [(names, rows) for names, rows in axes if CROSS_FIELDS & set(names)]
    reduced_axes = []
    for names, rows in relevant:
        kept = [i for i, n in enumerate(names) if n in CROSS_FIELDS]
        reduced = {tuple(reduce_for_checks(names[i], row[i]) for i in kept) for row in rows}
        reduced_axes.append(([names[i] for i in kept], sorted(reduced, key=repr)))
    base = {n: reduce_for_checks(n, v) if n in CROSS_FIELDS else v for n, v in defaults.items()}
    names = [n for axis_names, _ in reduced_axes for n in axis_names]
    for combo in itertools.product(*(rows for _, rows in reduced_axes)):
        fields = dict(base)
        fields.update(zip(names, itertools.chain.from_iterable(combo), strict=True))
        check_task_fields(fields)


def reduce_for_checks(name: str, value: Any) -> Any:
    """A stand-in for ``value`` that check_task_fields judges exactly as it judges ``value``."""
    if name in ("variation_seed", "init_image", "strength"):
        return None if value is None else 0
    if name in ("variation_strength", "perturb_scale", "prompt"):
        return bool(value)
    if name == "token_mix":
        return bool(value)
    if name == "mix":
        return tuple(MixPart("", float((m.weight > 0) - (m.weight < 0))) for m in value)
    return value  # steps, start_step, mix_mode: compared by value


def check_task_fields(f: dict[str, Any]) -> None:
    """The rules that tie one task's technique fields together."""
    if (f["variation_strength"] or f["perturb_scale"]) and f["variation_seed"] is None:
        name = "variation_strength" if f["variation_strength"] else "perturb_scale"
        raise SpecError(f"{name}: needs a variation_seed (the seed whose noise is blended in)")
    if f["variation_strength"] and f["perturb_scale"]:
        raise SpecError("perturb_scale: use variation_strength (slerp) or perturb_scale (scale), not both")
    if f["strength"] is not None and f["start_step"] is not None:
        raise SpecError("start_step: give strength or start_step, not both")
    for name in ("strength", "start_step"):
        if f[name] is not None and f["init_image"] is None:
            raise SpecError(f"{name}: needs an init_image")
    if f["start_step"] is not None and f["start_step"] > f["steps"]:
        raise SpecError(f"start_step: {f['start_step']} is past the last step (steps: {f['steps']})")
    if f["mix"]:
        if f["prompt"]:
            raise SpecError("mix: replaces prompt; leave prompt empty when mixing")
        if f["token_mix"]:
            raise SpecError("token_mix: applies to prompt; it cannot be combined with mix")
        if f["mix_mode"] == "slerp" and len(f["mix"]) != 2:
            raise SpecError("mix_mode: slerp blends exactly two prompts; give mix two entries")
        if f["mix_mode"] == "slerp" and (min(m.weight for m in f["mix"]) < 0 or max(m.weight for m in f["mix"]) <= 0):
            raise SpecError("mix_mode: slerp needs weights of 0 or more, at least one above 0")


DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "scheduler": "pndm",
    "prompt": "",
    "negative_prompt": "",
    "seed": 0,
    "steps": 20,
    "guidance": 7.5,
    "width": 512,
    "height": 512,
    **{f.name: f.default for f in dataclasses.fields(RenderTask) if f.name not in CORE_FIELDS},
    # None until resolve_img2img: "not given", so strength's default can apply.
    "start_step": None,
}
# Filled in from the file when the job is read, never written by the user.
DERIVED_FIELDS = ("init_image_sha256", "frame", "previous", "blend", "color_reference")
USER_FIELDS = tuple(name for name in TASK_FIELDS if name not in DERIVED_FIELDS)


def _parse_defaults(data: dict[str, Any]) -> dict[str, Any]:
    defaults_in = _or_empty(data, "defaults", {})
    if not isinstance(defaults_in, dict):
        raise SpecError("defaults: expected a mapping of task fields")
    fields = dict(DEFAULTS)
    for key in ("model", "scheduler"):
        if key in data:
            fields[key] = check_value(key, data[key], key)
    for key, value in defaults_in.items():
        if key in DERIVED_FIELDS:
            what = "computed from the file" if key == "init_image_sha256" else "set by an animate or walk job"
            raise SpecError(f"defaults.{key}: {what}; leave it out")
        if key not in TASK_FIELDS:
            raise SpecError(f"defaults.{key}: unknown task field; expected one of {', '.join(USER_FIELDS)}")
        if key in ("model", "scheduler") and key in data:
            raise SpecError(f"defaults.{key}: also given at the top level; give it once")
        fields[key] = check_value(key, value, f"defaults.{key}")
    return fields


def _parse_sweep(sweep: Any, where: str) -> list[tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]]:
    if not isinstance(sweep, dict):
        raise SpecError(f"{where}: expected a mapping of task field -> values")
    axes = []
    for key, spec in sweep.items():
        values = sweep_values(key, spec, f"{where}.{key}")
        axes.append(((key,), tuple((v,) for v in values)))
    return axes


def _or_empty(data: dict[str, Any], key: str, empty: Any) -> Any:
    """A section's value; a key written with nothing after it (``sweep:``) means empty."""
    value = data.get(key)
    return empty if value is None else value


def _parse_zip(zipped: Any) -> list[tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]]:
    """``zip`` is one mapping (one group) or a list of mappings (several groups)."""
    if not isinstance(zipped, dict | list):
        raise SpecError("zip: expected a mapping of task field -> values, or a list of such mappings")
    groups = zipped if isinstance(zipped, list) else [zipped]
    axes = []
    for i, group in enumerate(groups):
        where = "zip" if isinstance(zipped, dict) else f"zip[{i}]"
        if not isinstance(group, dict) or not group:
            raise SpecError(f"{where}: expected a mapping of task field -> values of equal length")
        columns = {key: sweep_values(key, spec, f"{where}.{key}", unique=False) for key, spec in group.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            detail = ", ".join(f"{k}: {len(v)}" for k, v in columns.items())
            raise SpecError(f"{where}: zipped fields need the same number of values ({detail})")
        rows = tuple(zip(*columns.values(), strict=True))
        _refuse_repeats(rows, where)
        axes.append((tuple(columns), rows))
    return axes


def _refuse_repeats(values: tuple | list, where: str) -> None:
    """The same value twice on an axis would be the same task twice: rendered twice, two rows."""
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        key = repr(value)
        if key in seen:
            raise SpecError(f"{where}[{i}]: repeats [{seen[key]}] ({_show(value)}); each value once")
        seen[key] = i


def _order_axes(axes: list) -> list:
    """Batch-breaking axes first (in BATCH_FIELDS order), the rest as written."""

    def rank(axis: tuple) -> int:
        ranks = [BATCH_FIELDS.index(n) for n in axis[0] if n in BATCH_FIELDS]
        return min(ranks) if ranks else len(BATCH_FIELDS)

    return sorted(axes, key=rank)  # sorted() is stable: equal ranks keep the spec's order


def sweep_values(key: str, spec: Any, where: str, unique: bool = True) -> list[Any]:
    """A sweep axis: a list, ``{range: [start, stop, step]}``, ``{linspace: [a, b, n]}`` or ``{random: n}``."""
    if key not in TASK_FIELDS or key in DERIVED_FIELDS:
        raise SpecError(f"{where}: unknown task field; expected one of {', '.join(USER_FIELDS)}")
    if isinstance(spec, list):
        if not spec:
            raise SpecError(f"{where}: empty list; give at least one value")
        values = spec
    elif isinstance(spec, dict) and len(spec) == 1:
        ((form, args),) = spec.items()
        values = _generated_values(key, form, args, where)
    else:
        raise SpecError(f"{where}: expected a list, {{range: [start, stop, step]}}, or {{linspace: [a, b, n]}}")
    out = []
    for i, value in enumerate(values):
        if key in SEED_FIELDS and value == "random":
            out.append(RandomSlot(f"{where}[{i}]"))
        else:
            out.append(check_value(key, value, f"{where}[{i}]"))
    if unique:  # a zipped column may repeat a value; its rows may not (checked by the caller)
        _refuse_repeats(out, where)
    return out


def _generated_values(key: str, form: str, args: Any, where: str) -> list[Any]:
    numbers = isinstance(args, list) and all(_is_finite(a) for a in args)
    if form == "range":
        if not numbers or len(args) not in (2, 3):
            raise SpecError(f"{where}.range: expected [start, stop] or [start, stop, step]")
        start, stop, step = (*args, 1) if len(args) == 2 else args
        if step == 0:
            raise SpecError(f"{where}.range: step must not be 0")
        count = math.ceil((stop - start) / step)
        if count <= 0:
            raise SpecError(f"{where}.range: [{start}, {stop}, {step}] gives no values")
        if count > MAX_AXIS_VALUES:
            raise SpecError(f"{where}.range: {count} values; at most {MAX_AXIS_VALUES} on one axis")
        return [_tidy(start + i * step) for i in range(count)]
    if form == "linspace":
        if not numbers or len(args) != 3 or not isinstance(args[2], int) or not 1 <= args[2] <= MAX_AXIS_VALUES:
            raise SpecError(
                f"{where}.linspace: expected [first, last, count] with a whole count from 1 to {MAX_AXIS_VALUES}"
            )
        a, b, n = args
        return [_tidy(a + (b - a) * i / (n - 1)) if n > 1 else a for i in range(n)]
    if form == "random" and key in SEED_FIELDS:
        if not isinstance(args, int) or isinstance(args, bool) or not 1 <= args <= MAX_AXIS_VALUES:
            raise SpecError(f"{where}.random: expected a whole number of seeds from 1 to {MAX_AXIS_VALUES}")
        return ["random"] * args
    raise SpecError(
        f"{where}: unknown form {_show(form)}; expected range, linspace" + (" or random" if key in SEED_FIELDS else "")
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is neither infinite, NaN, nor an int too large for a float (10**400)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _tidy(value: float) -> float | int:
    """Round away float noise from range/linspace arithmetic (0.1 * 3 -> 0.3)."""
    return round(value, 10) if isinstance(value, float) else value


def check_value(key: str, value: Any, where: str) -> Any:
    """Validate one value of a task field and return it normalised (ints as ints, floats as floats)."""
    if key in INT_FIELDS and isinstance(value, float) and value.is_integer():
        value = int(value)  # linspace and float ranges give 64.0 for a width of 64
    if key in ("prompt", "negative_prompt"):
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected text, got {_kind(value)}")
        return value
    if key == "seed":
        if value == "random":
            return value
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
            raise SpecError(f"{where}: expected a whole number from 0 to {MAX_SEED} or 'random', got {_show(value)}")
        return value
    if key == "steps":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_STEPS:
            raise SpecError(f"{where}: expected a whole number of steps from 1 to {MAX_STEPS}, got {_show(value)}")
        return value
    if key == "guidance":
        if not _is_finite(value) or not 0 <= value <= 100:
            raise SpecError(f"{where}: expected a number from 0 to 100, got {_show(value)}")
        return float(value)
    if key in ("width", "height"):
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= MAX_SIZE or value % 8:
            raise SpecError(f"{where}: expected a multiple of 8 from 8 to {MAX_SIZE} pixels, got {_show(value)}")
        return value
    if key == "scheduler":
        if value not in SCHEDULERS:
            raise SpecError(f"{where}: unknown scheduler {_show(value)}; expected one of {', '.join(SCHEDULERS)}")
        return value
    if key == "model":
        if not isinstance(value, str) or not is_known_model_ref(value):
            raise SpecError(
                f"{where}: unknown model {_show(value)}; expected a preset ({', '.join(PRESETS)}), "
                "a diffusers folder, a .safetensors file or a hub id (org/name)"
            )
        return value
    return check_technique(key, value, where)


def check_technique(key: str, value: Any, where: str) -> Any:
    """Validate one value of a steering-technique field (README, "Steering")."""
    if key == "variation_seed":
        if value is None or value == "random":
            return value
        return check_value("seed", value, where)
    if key in ("variation_strength", "strength"):
        if key == "strength" and value is None:
            return None
        return _number(value, where, 0.0, 1.0)
    if key == "perturb_scale":
        return _number(value, where, 0.0, MAX_PERTURB_SCALE)
    if key == "start_step":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STEPS:
            raise SpecError(f"{where}: expected a whole step number from 0 to the task's steps, got {_show(value)}")
        return value
    if key == "blend":
        return _number(value, where, 0.0, 1.0)
    if key == "init_image":
        if value is not None and (not isinstance(value, str) or not value):
            raise SpecError(f"{where}: expected a path to an image file")
        return value
    if key in ("mix_mode", "long_prompt"):
        choices = MIX_MODES if key == "mix_mode" else LONG_PROMPT_MODES
        if value not in choices:
            raise SpecError(f"{where}: expected one of {', '.join(choices)}, got {_show(value)}")
        return value
    if key == "mix":
        return tuple(
            _parse_mix_part(part, f"{where}[{i}]")
            for i, part in enumerate(_list(value, where, "entries", allow_empty=True))
        )
    if key == "token_mix":
        if isinstance(value, dict):
            return (_parse_token_mix(value, where),)
        items = _list(value, where, "mappings", allow_empty=True)
        return tuple(_parse_token_mix(item, f"{where}[{i}]") for i, item in enumerate(items))
    if key == "embeddings":
        return tuple(
            _parse_embedding(e, f"{where}[{i}]") for i, e in enumerate(_list(value, where, "paths", allow_empty=True))
        )
    if key == "guidance_loss":
        return None if value is None else _parse_loss(value, where)
    if key == "capture":
        kinds = [value] if isinstance(value, str) else _list(value, where, "kinds", allow_empty=True)
        for i, kind in enumerate(kinds):
            if kind not in CAPTURE_KINDS:
                raise SpecError(f"{where}[{i}]: expected one of {', '.join(CAPTURE_KINDS)}, got {_show(kind)}")
        if len(set(kinds)) != len(kinds):
            raise SpecError(f"{where}: each kind once")
        return tuple(kinds)
    raise SpecError(f"{where}: unknown task field")  # pragma: no cover - guarded by callers


def _number(value: Any, where: str, low: float, high: float) -> float:
    if not _is_finite(value) or not low <= value <= high:
        raise SpecError(f"{where}: expected a number from {low:g} to {high:g}, got {_show(value)}")
    return float(value)


def _list(value: Any, where: str, what: str, allow_empty: bool = False) -> list[Any]:
    if value is None and allow_empty:
        return []
    if not isinstance(value, list) or (not value and not allow_empty):
        raise SpecError(f"{where}: expected a list of {what}")
    return value


def _mapping(value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping with {', '.join(allowed)}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown field; expected {', '.join(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise SpecError(f"{where}.{missing[0]}: missing")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: expected text, got {_kind(value)}")
    return value


def _parse_mix_part(value: Any, where: str) -> MixPart:
    part = _mapping(value, where, ("prompt", "weight"), ("prompt", "weight"))
    if not isinstance(part["prompt"], str):
        raise SpecError(f"{where}.prompt: expected text, got {_kind(part['prompt'])}")
    return MixPart(prompt=part["prompt"], weight=_number(part["weight"], f"{where}.weight", -10.0, 10.0))


def _parse_token_mix(value: Any, where: str) -> TokenMix:
    item = _mapping(value, where, ("token", "with", "weight"), ("token", "with"))
    return TokenMix(
        token=_text(item["token"], f"{where}.token"),
        other=_text(item["with"], f"{where}.with"),
        weight=_number(item.get("weight", 0.5), f"{where}.weight", -10.0, 10.0),
    )


def _parse_embedding(value: Any, where: str) -> Embedding:
    """A path, or {path, token}; the path is made absolute and hashed by _resolve_files."""
    if isinstance(value, str):
        return Embedding(path=_text(value, where), sha256="")
    item = _mapping(value, where, ("path", "token"), ("path",))
    token = item.get("token")
    return Embedding(
        path=_text(item["path"], f"{where}.path"),
        sha256="",
        token=None if token is None else _text(token, f"{where}.token"),
    )


def _parse_loss(value: Any, where: str) -> GuidanceLoss:
    loss = _mapping(value, where, ("name", "target", "scale", "every"), ("name",))
    name = loss["name"]
    if name != "color" and (not isinstance(name, str) or not CUSTOM_LOSS.fullmatch(name)):
        raise SpecError(f"{where}.name: expected color or module:function, got {_show(name)}")
    target = loss.get("target", [])
    if not isinstance(target, list) or not all(t is None or _is_finite(t) for t in target):
        raise SpecError(f"{where}.target: expected a list of numbers (null to leave a channel free)")
    if name == "color" and (
        len(target) != 3 or all(t is None for t in target) or any(t is not None and not 0 <= t <= 1 for t in target)
    ):
        raise SpecError(f"{where}.target: expected [red, green, blue], each from 0 to 1 or null, at least one number")
    every = loss.get("every", DEFAULT_LOSS_EVERY)
    if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= MAX_STEPS:
        raise SpecError(f"{where}.every: expected a whole number of steps from 1 to {MAX_STEPS}, got {_show(every)}")
    return GuidanceLoss(
        name=name,
        target=tuple(None if t is None else float(t) for t in target),
        scale=_number(loss.get("scale", DEFAULT_LOSS_SCALE), f"{where}.scale", 0.0, 1e6),
        every=every,
    )


# Error messages quote a value only this far: a YAML anchor bomb is small as a graph of
# shared objects but exponential as text, and a plain repr() would expand it.
def _show(value: Any) -> str:
    shown = reprlib.Repr()  # Python 3.11's Repr takes no arguments: set the limits one by one
    shown.maxlevel, shown.maxlist, shown.maxdict, shown.maxstring, shown.maxother, shown.maxlong = 2, 4, 4, 300, 60, 40
    return shown.repr(value)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)
