"""Job YAML -> a validated ``JobSpec`` -> a lazy stream of fully resolved ``RenderTask``s.

A job names a model and scheduler, gives ``defaults`` for every task field, and sweeps any
field: ``sweep`` is a cartesian product, ``zip`` makes fields vary together, ``perturb``
sweeps variation seeds and strengths around one base seed, and an ``animate:`` or ``walk:``
section (read by ``animation.py``) gives every sweep combination a shot of frames. Expansion
puts the fields that break a UNet batch outermost so tasks that can share a batch come out
next to each other. This module owns the sections and the checks across fields; one value's
checks are in ``fields.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from farm.models import ModelFacts
from farm.spec.animation import parse_animation
from farm.spec.family import apply_family_defaults, check_families, read_families
from farm.spec.fields import (
    ANIMATION_KINDS,
    CAPTURE_KINDS,
    DEFAULT_STRENGTH,
    KINDS,
    MAX_AXIS_VALUES,
    MAX_LCM_STEPS,
    MAX_TASKS,
    NAME,
    SpecError,
    check_value,
    entry_weight,
    img2img_start_step,
    is_finite,
    parse_safety_check,
    schedule_type_error,
    show,
    whole,
    with_entry_weight,
)
from farm.spec.files import check_source_controls, resolve_files, resolve_folder, resolve_source_controls
from farm.spec.task import (
    BATCH_FIELDS,
    CORE_FIELDS,
    DERIVED_FIELDS,
    SEED_FIELDS,
    TASK_FIELDS,
    USER_FIELDS,
    Animation,
    MixPart,
    RandomSlot,
    RenderTask,
    SafetyCheck,
    SeedStep,
    frame_axis,
    random_seed,
    resolve_seeds,
)

TOP_LEVEL_FIELDS = tuple(
    "name description kind model model_config scheduler defaults sweep zip perturb animate walk safety_check".split()
)
# Fields tied together by check_task_fields.
CROSS_FIELDS = set(
    "motion scheduler schedule_type variation_seed variation_strength perturb_scale init_image strength start_step "
    "steps prompt mix mix_mode token_mix".split()
)
DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "scheduler": "pndm",
    "prompt": "",
    "negative_prompt": "",
    "seed": 0,
    "steps": 20,
    "guidance": 7.5,
    # None: the model's native size (family.apply_family_defaults).
    "width": None,
    "height": None,
    **{f.name: f.default for f in dataclasses.fields(RenderTask) if f.name not in CORE_FIELDS},
    # None until resolve_img2img: "not given", so strength's default can apply.
    "start_step": None,
}

# One sweep axis: the field names it sets together, and per value a tuple of one value per name.
Axis = tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]


@dataclass(frozen=True)
class JobSpec:
    """A parsed, validated job. ``axes`` are the sweep axes, already in expansion order."""

    name: str
    defaults: dict[str, Any]
    axes: tuple[Axis, ...]
    model_config: str | None = None
    description: str = ""
    source: str = field(default="", repr=False)
    kind: str = "grid"
    # sha256 of every init image the job names (path -> hash), taken when the job is read.
    hashes: dict[str, str] = field(default_factory=dict, repr=False)
    animation: Animation | None = None
    # What each model's files say (family, native size), read with the job (family.read_families).
    facts: dict[str, ModelFacts | None] = field(default_factory=dict, repr=False)
    safety_check: SafetyCheck | None = None

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
        resolvers = Resolvers.of(self)
        grid = frames == ((),)  # each shot is one task: its fields need no copy
        defaults = dict(self.defaults)
        if not resolvers.img2img:
            defaults["start_step"] = 0  # as resolve_img2img sets it for a task without an init image
        index = 0
        for shot_index, combo in enumerate(itertools.product(*(values for _, values in self.axes))):
            shot = dict(defaults)
            shot.update(zip(names, itertools.chain.from_iterable(combo), strict=True))
            if self.animation and shot["seed"] == "random":  # one seed per shot, as a fixed seed is
                shot["seed"] = random_seed(random_base, f"shot:{shot_index}")
            first: RenderTask | None = None
            previous: RenderTask | None = None
            for frame, frame_fields in enumerate(frames):
                fields = shot if grid else dict(shot)
                fields.update(frame_fields)
                if self.animation is not None:
                    fields["frame"] = frame
                if resolvers.seeds:
                    resolve_seeds(fields, shot["seed"], index, random_base)
                if resolvers.entry_weights:
                    apply_entry_weights(fields)
                if resolvers.family:
                    apply_family_defaults(fields, self.facts)
                if resolvers.img2img:
                    resolve_img2img(fields, self.hashes)
                if resolvers.source_controls:
                    resolve_source_controls(fields)
                if chained and previous is not None and first is not None:
                    fields.update(previous=previous.task_id)
                    if self.animation.color_coherence:  # type: ignore[union-attr]
                        fields.update(color_reference=first.task_id)
                else:
                    fields["blend"] = 0.0  # frame 0 has nothing before it to blend in
                task = RenderTask.from_fields(fields)
                first = first or task
                previous = task
                index += 1
                yield task


@dataclass(frozen=True)
class Resolvers:
    """Which of the helpers that resolve a task's fields can change anything in a job: expansion skips
    the others (a grid of prompts and seeds at a given size, however large, needs none of them)."""

    seeds: bool  # a random seed, or an animation's seed steps
    entry_weights: bool  # a swept entry weight (loras.0.weight)
    family: bool  # a size left to the model, or an SDXL model
    img2img: bool  # an init image, 2D motion or a start_step (else every start_step is 0)
    source_controls: bool  # a ControlNet (its image may be each frame's own source)

    @classmethod
    def of(cls, spec: JobSpec) -> Resolvers:
        axes = [*spec.axes, *frame_axis(spec.animation)]
        swept = {n for names, _ in axes for n in names}

        def values(name: str) -> Iterator[Any]:
            return every_value(name, spec.defaults, axes)

        return cls(
            seeds=any(v == "random" or isinstance(v, RandomSlot | SeedStep) for n in SEED_FIELDS for v in values(n)),
            entry_weights=any("." in n for n in swept),
            family=any(v is None for n in ("width", "height") for v in values(n))
            or any(fact is not None and fact.family == "sdxl" for fact in spec.facts.values()),
            img2img=any(spec.defaults[n] is not None or n in swept for n in ("init_image", "motion", "start_step")),
            source_controls=any(values("controlnet")),
        )


def every_value(name: str, defaults: dict[str, Any], axes: list[Axis]) -> Iterator[Any]:
    """Every value field ``name`` takes in a job: its default and the values of each axis that sets it."""
    yield defaults[name]
    for names, rows in axes:
        if name in names:
            column = names.index(name)
            yield from (row[column] for row in rows)


def shots(spec: JobSpec, tasks: Iterable[RenderTask]) -> Iterator[list[RenderTask]]:
    """An animation's tasks cut into shots (every sweep combination's frames, in order)."""
    shot: list[RenderTask] = []
    for task in tasks:
        shot.append(task)
        if len(shot) == spec.frames_per_shot:
            yield shot
            shot = []


def apply_entry_weights(fields: dict[str, Any]) -> None:
    """Swept entry weights (``loras.0.weight``) -> the weight of that entry of the field."""
    for key in [k for k in fields if "." in k]:
        name, index = entry_weight(key)  # type: ignore[misc]  # only such keys have dots
        fields[name] = with_entry_weight(name, fields[name], index, fields.pop(key))


def resolve_img2img(fields: dict[str, Any], hashes: dict[str, str]) -> None:
    """Fill in the init image's hash, and both ``strength`` and ``start_step`` (both are recorded).

    ``strength`` follows diffusers: int(steps x strength) steps run, so the loop starts at
    ``steps - int(steps x strength)``; ``start_step`` is the notebook's "start at step 10 of 50".
    """
    if fields["init_image"] is None and fields["motion"] is None:
        fields["start_step"] = 0
        return
    if fields["init_image"] is not None:  # else a 2D-motion frame: img2img of the frame before
        fields["init_image_sha256"] = hashes[fields["init_image"]]
    steps = fields["steps"]
    if fields["start_step"] is None:
        if fields["strength"] is None:
            fields["strength"] = DEFAULT_STRENGTH
        fields["start_step"] = img2img_start_step(steps, fields["strength"])
    else:
        fields["strength"] = (steps - fields["start_step"]) / steps


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
        raise SpecError(f"kind: unknown kind {show(kind)}; expected one of {', '.join(KINDS)}")
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
    check_entry_weights(names, defaults)
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise SpecError(f"sweep.{sorted(repeated)[0]}: swept twice (in sweep and zip, or twice in zip)")
    animation = None
    if kind in ANIMATION_KINDS:
        animation, materialise = parse_animation(kind, data.get(kind), defaults, axes, base_dir or Path.cwd())
    count = math.prod(len(values) for _, values in axes) * (len(animation.frames) if animation else 1)
    if count > MAX_TASKS:
        raise SpecError(f"sweep: {count:.3g} tasks; at most {MAX_TASKS:,} in one job (split it into several)")
    hashes = resolve_files(defaults, axes, base_dir or Path.cwd())
    check_combinations(defaults, axes + frame_axis(animation))
    check_source_controls(kind, defaults, axes)
    model_config = data.get("model_config")
    if model_config is not None and not isinstance(model_config, str):
        raise SpecError("model_config: expected a path to a diffusers folder")
    safety = parse_safety_check(data.get("safety_check"))
    if safety is not None and safety.checker is not None:
        safety = dataclasses.replace(safety, checker=str(resolve_folder(safety.checker, base_dir or Path.cwd())))
    facts = read_families(defaults, axes, model_config)
    check_families(facts, defaults, axes + frame_axis(animation))
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
        facts=facts,
        safety_check=safety,
    )


def check_entry_weights(names: list[str], defaults: dict[str, Any]) -> None:
    """A swept ``loras.N.weight`` needs entry N in ``defaults.loras``, and loras itself left unswept."""
    for name in names:
        entry = entry_weight(name)
        if entry is None:
            continue
        field_name, index = entry
        if field_name in names:
            raise SpecError(f"sweep.{name}: {field_name} is swept too; sweep the weight or the list, not both")
        count = len(defaults[field_name])
        if index >= count:
            raise SpecError(f"sweep.{name}: defaults.{field_name} has {count} entries (numbered from 0)")


def defaults_given(data: dict[str, Any]) -> dict[str, Any]:
    given = data.get("defaults")
    return given if isinstance(given, dict) else {}


def _swept(axes: list[Axis], name: str) -> bool:
    return any(name in axis_names for axis_names, _ in axes)


def _parse_perturb(section: Any, axes: list[Axis], defaults: dict[str, Any]) -> list[Axis]:
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
        raise SpecError(f"perturb.mode: expected slerp or scale, got {show(mode)}")
    if "seeds" not in section or "strengths" not in section:
        raise SpecError("perturb: needs seeds (a list, {range: ...} or {random: N}) and strengths (a list)")
    if defaults["seed"] == "random":  # one base seed for the whole job, drawn once
        defaults["seed"] = RandomSlot("defaults.seed")
    strength_field = "variation_strength" if mode == "slerp" else "perturb_scale"
    seeds = sweep_values("variation_seed", section["seeds"], "perturb.seeds")
    strengths = sweep_values(strength_field, section["strengths"], "perturb.strengths")
    return [(("variation_seed",), tuple((v,) for v in seeds)), ((strength_field,), tuple((v,) for v in strengths))]


# ---------------------------------------------------------------------------------------
# Checks across fields


def check_combinations(defaults: dict[str, Any], axes: list[Axis]) -> None:
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
    if name in ("variation_seed", "init_image", "strength", "motion"):
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
    problem = schedule_type_error(f["scheduler"], f["schedule_type"])
    if problem:
        raise SpecError(f"schedule_type: {problem}")
    if f["scheduler"] == "lcm" and f["steps"] > MAX_LCM_STEPS:
        raise SpecError(f"steps: lcm takes at most {MAX_LCM_STEPS} steps (the schedule it was distilled from)")
    if (f["variation_strength"] or f["perturb_scale"]) and f["variation_seed"] is None:
        name = "variation_strength" if f["variation_strength"] else "perturb_scale"
        raise SpecError(f"{name}: needs a variation_seed (the seed whose noise is blended in)")
    if f["variation_strength"] and f["perturb_scale"]:
        raise SpecError("perturb_scale: use variation_strength (slerp) or perturb_scale (scale), not both")
    if f["strength"] is not None and f["start_step"] is not None:
        raise SpecError("start_step: give strength or start_step, not both")
    for name in ("strength", "start_step"):
        if f[name] is not None and f["init_image"] is None and f["motion"] is None:
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


# ---------------------------------------------------------------------------------------
# Sections: defaults, sweep, zip


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


def _parse_sweep(sweep: Any, where: str) -> list[Axis]:
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


def _parse_zip(zipped: Any) -> list[Axis]:
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
            raise SpecError(f"{where}[{i}]: repeats [{seen[key]}] ({show(value)}); each value once")
        seen[key] = i


def _order_axes(axes: list[Axis]) -> list[Axis]:
    """Batch-breaking axes first (in BATCH_FIELDS order), the rest as written."""

    def rank(axis: Axis) -> int:
        fields = [n.split(".")[0] for n in axis[0]]  # loras.0.weight breaks batches as loras does
        ranks = [BATCH_FIELDS.index(n) for n in fields if n in BATCH_FIELDS]
        return min(ranks) if ranks else len(BATCH_FIELDS)

    return sorted(axes, key=rank)  # sorted() is stable: equal ranks keep the spec's order


def sweep_values(key: str, spec: Any, where: str, unique: bool = True) -> list[Any]:
    """A sweep axis: a list, ``{range: [start, stop, step]}``, ``{linspace: [a, b, n]}`` or ``{random: n}``."""
    entry = entry_weight(key)
    if (key not in TASK_FIELDS or key in DERIVED_FIELDS) and (entry is None or entry[0] == "mix"):
        raise SpecError(
            f"{where}: unknown task field; expected one of {', '.join(USER_FIELDS)}, loras.N.weight "
            "or controlnet.N.scale"
        )
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
    numbers = isinstance(args, list) and all(is_finite(a) for a in args)
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
    # These two messages predate whole()'s ", got ..." and are kept word for word.
    if form == "linspace":
        expected = f"[first, last, count] with a whole count from 1 to {MAX_AXIS_VALUES}"
        if not numbers or len(args) != 3:
            raise SpecError(f"{where}.linspace: expected {expected}")
        a, b, n = args
        whole(n, f"{where}.linspace", 1, MAX_AXIS_VALUES, expected, quote=False)
        return [_tidy(a + (b - a) * i / (n - 1)) if n > 1 else a for i in range(n)]
    if form == "random" and key in SEED_FIELDS:
        expected = f"a whole number of seeds from 1 to {MAX_AXIS_VALUES}"
        return ["random"] * whole(args, f"{where}.random", 1, MAX_AXIS_VALUES, expected, quote=False)
    raise SpecError(
        f"{where}: unknown form {show(form)}; expected range, linspace" + (" or random" if key in SEED_FIELDS else "")
    )


def _tidy(value: float) -> float | int:
    """Round away float noise from range/linspace arithmetic (0.1 * 3 -> 0.3)."""
    return round(value, 10) if isinstance(value, float) else value
