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
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from farm.models import PRESETS, is_known_model_ref

# Names a job may use; render.py maps each to its diffusers class (a test keeps both in step).
SCHEDULERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m")
# Fields that must match for tasks to share one UNet batch, outermost first.
BATCH_FIELDS = ("model", "width", "height", "steps", "scheduler", "guidance")
TOP_LEVEL_FIELDS = ("name", "description", "model", "model_config", "scheduler", "defaults", "sweep", "zip")
# Torch seeds are 64-bit, but A1111 and most tools use 32-bit seeds; staying in that range
# keeps farm's seeds portable to them.
MAX_SEED = 2**32 - 1
# Beyond these the job is almost certainly a typo (and would exhaust memory or time).
MAX_SIZE = 4096
MAX_STEPS = 1000
# One axis's values are held in memory (the product of axes is not): a million is plenty
# and still small, while {range: [0, 4294967295]} would exhaust memory.
MAX_AXIS_VALUES = 1_000_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SpecError(Exception):
    """A problem with a job spec, phrased for the user: names the field and what is expected."""


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

    @cached_property
    def task_id(self) -> str:
        """A hash of the canonical JSON of the task: the same work always has the same id."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def batch_key(self) -> tuple:
        return tuple(getattr(self, name) for name in BATCH_FIELDS)


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(RenderTask))
INT_FIELDS = ("seed", "steps", "width", "height")


@dataclass(frozen=True)
class Batch:
    """Tasks rendered together in one UNet batch; ``batch_id`` hashes their ids."""

    batch_id: str
    tasks: tuple[RenderTask, ...]


@dataclass(frozen=True)
class JobSpec:
    """A parsed, validated job. ``axes`` are the sweep axes, already in expansion order."""

    name: str
    defaults: dict[str, Any]
    axes: tuple[tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]], ...]
    model_config: str | None = None
    description: str = ""
    source: str = field(default="", repr=False)

    def count(self) -> int:
        """The number of tasks, without expanding them."""
        return math.prod(len(values) for _, values in self.axes)

    def tasks(self, random_base: int = 0) -> Iterator[RenderTask]:
        """Expand lazily; ``random_base`` fixes what every ``seed: random`` becomes."""
        names = [n for axis_names, _ in self.axes for n in axis_names]
        for index, combo in enumerate(itertools.product(*(values for _, values in self.axes))):
            fields = dict(self.defaults)
            fields.update(zip(names, itertools.chain.from_iterable(combo), strict=True))
            if fields["seed"] == "random":
                fields["seed"] = random_seed(random_base, f"task:{index}")
            elif isinstance(fields["seed"], RandomSlot):
                fields["seed"] = random_seed(random_base, fields["seed"].slot)
            yield RenderTask(**fields)


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
    return parse_job(text, default_name=path.stem, where=str(path))


def parse_job(text: str, default_name: str = "job", where: str = "job") -> JobSpec:
    """Parse job YAML text into a ``JobSpec``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{where}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of fields (name, model, defaults, sweep, ...)")
    unknown = [k for k in data if k not in TOP_LEVEL_FIELDS]
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown field; expected one of {', '.join(TOP_LEVEL_FIELDS)}")

    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME.match(name):
        source = "" if "name" in data else f" (none given, and the file name {default_name!r} cannot serve)"
        raise SpecError(f"name: expected letters, digits, '_', '-' or '.' (it names the output folder){source}")

    defaults = _parse_defaults(data)
    axes = _parse_sweep(_or_empty(data, "sweep", {}), "sweep") + _parse_zip(_or_empty(data, "zip", []))
    names = [n for axis_names, _ in axes for n in axis_names]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise SpecError(f"sweep.{sorted(repeated)[0]}: swept twice (in sweep and zip, or twice in zip)")
    model_config = data.get("model_config")
    if model_config is not None and not isinstance(model_config, str):
        raise SpecError("model_config: expected a path to a diffusers folder")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError("description: expected text")
    return JobSpec(
        name=name,
        defaults=defaults,
        axes=tuple(_order_axes(axes)),
        model_config=model_config,
        description=description,
        source=text,
    )


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
}


def _parse_defaults(data: dict[str, Any]) -> dict[str, Any]:
    defaults_in = _or_empty(data, "defaults", {})
    if not isinstance(defaults_in, dict):
        raise SpecError("defaults: expected a mapping of task fields")
    fields = dict(DEFAULTS)
    for key in ("model", "scheduler"):
        if key in data:
            fields[key] = check_value(key, data[key], key)
    for key, value in defaults_in.items():
        if key not in TASK_FIELDS:
            raise SpecError(f"defaults.{key}: unknown task field; expected one of {', '.join(TASK_FIELDS)}")
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
            raise SpecError(f"{where}[{i}]: repeats [{seen[key]}] ({value!r}); each value once")
        seen[key] = i


def _order_axes(axes: list) -> list:
    """Batch-breaking axes first (in BATCH_FIELDS order), the rest as written."""

    def rank(axis: tuple) -> int:
        ranks = [BATCH_FIELDS.index(n) for n in axis[0] if n in BATCH_FIELDS]
        return min(ranks) if ranks else len(BATCH_FIELDS)

    return sorted(axes, key=rank)  # sorted() is stable: equal ranks keep the spec's order


def sweep_values(key: str, spec: Any, where: str, unique: bool = True) -> list[Any]:
    """A sweep axis: a list, ``{range: [start, stop, step]}``, ``{linspace: [a, b, n]}`` or ``{random: n}``."""
    if key not in TASK_FIELDS:
        raise SpecError(f"{where}: unknown task field; expected one of {', '.join(TASK_FIELDS)}")
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
        if key == "seed" and value == "random":
            out.append(RandomSlot(f"{where}[{i}]"))
        else:
            out.append(check_value(key, value, f"{where}[{i}]"))
    if unique:  # a zipped column may repeat a value; its rows may not (checked by the caller)
        _refuse_repeats(out, where)
    return out


def _generated_values(key: str, form: str, args: Any, where: str) -> list[Any]:
    numbers = isinstance(args, list) and all(_is_number(a) and math.isfinite(a) for a in args)
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
    if form == "random" and key == "seed":
        if not isinstance(args, int) or isinstance(args, bool) or not 1 <= args <= MAX_AXIS_VALUES:
            raise SpecError(f"{where}.random: expected a whole number of seeds from 1 to {MAX_AXIS_VALUES}")
        return ["random"] * args
    raise SpecError(
        f"{where}: unknown form {form!r}; expected range, linspace" + (" or random" if key == "seed" else "")
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
            raise SpecError(f"{where}: expected a whole number from 0 to {MAX_SEED} or 'random', got {value!r}")
        return value
    if key == "steps":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_STEPS:
            raise SpecError(f"{where}: expected a whole number of steps from 1 to {MAX_STEPS}, got {value!r}")
        return value
    if key == "guidance":
        if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 100:
            raise SpecError(f"{where}: expected a number from 0 to 100, got {value!r}")
        return float(value)
    if key in ("width", "height"):
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= MAX_SIZE or value % 8:
            raise SpecError(f"{where}: expected a multiple of 8 from 8 to {MAX_SIZE} pixels, got {value!r}")
        return value
    if key == "scheduler":
        if value not in SCHEDULERS:
            raise SpecError(f"{where}: unknown scheduler {value!r}; expected one of {', '.join(SCHEDULERS)}")
        return value
    if key == "model":
        if not isinstance(value, str) or not is_known_model_ref(value):
            raise SpecError(
                f"{where}: unknown model {value!r}; expected a preset ({', '.join(PRESETS)}), "
                "a diffusers folder, a .safetensors file or a hub id (org/name)"
            )
        return value
    raise SpecError(f"{where}: unknown task field")  # pragma: no cover - guarded by callers


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)
