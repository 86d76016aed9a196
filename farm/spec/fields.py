"""The values a job may write, one at a time: ``SpecError``, the limits and the names a field
may take, the checks of one task field's value (``check_value``), the parsers of one small
value (a mix part, a token mix, an embedding, a guidance loss), and the bounded display that
error messages quote values with.

Every check raises a ``SpecError`` whose message names where the value is and what is
expected; tests assert on that text, so the wording here is part of the interface.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from typing import Any

from farm.errors import FarmError
from farm.models import is_known_model_ref
from farm.presets import CONTROLNET_PRESETS, PRESETS
from farm.spec.task import (
    INT_FIELDS,
    PAIR_FIELDS,
    ControlNetUnit,
    Embedding,
    GuidanceLoss,
    Lora,
    MixPart,
    SafetyCheck,
    TokenMix,
)

# Names a job may use; samplers.py maps each to its diffusers class (a test keeps both in step).
SCHEDULERS = (
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_sde",
    "unipc",
    "lcm",
)
# How a scheduler spaces its sigmas, as A1111's "Schedule type" names it: automatic is the
# scheduler's own spacing (diffusers' default), karras and exponential its use_*_sigmas options.
SCHEDULE_TYPES = ("automatic", "karras", "exponential")
# The schedule types each sampler takes: karras and exponential set diffusers' use_karras_sigmas /
# use_exponential_sigmas, which only the schedulers that space sigmas themselves have (their __init__
# arguments in diffusers 0.42; tests/test_samplers.py checks this table against them).
SCHEDULE_TYPES_OF: dict[str, tuple[str, ...]] = {
    "ddim": ("automatic",),
    "pndm": ("automatic",),
    "lms": ("automatic", "karras", "exponential"),
    "euler": ("automatic", "karras", "exponential"),
    "euler_a": ("automatic",),
    "heun": ("automatic", "karras", "exponential"),
    "dpmpp_2m": ("automatic", "karras", "exponential"),
    "dpmpp_2m_sde": ("automatic", "karras", "exponential"),
    "dpmpp_sde": ("automatic", "karras", "exponential"),
    "unipc": ("automatic", "karras", "exponential"),
    "lcm": ("automatic",),
}
# LCM distils a 50-step schedule (its original_inference_steps): diffusers refuses more steps.
MAX_LCM_STEPS = 50
# A1111 lets clip skip go to 12, the layer count of SD 1.x's text encoder; past the encoder's own
# depth a task fails when it renders (the encoder is known only then).
MAX_CLIP_SKIP = 12
# A LoRA's weight: A1111 and diffusers take any number; past +-10 an adapter swamps the model.
MAX_LORA_WEIGHT = 10.0
# A ControlNet's scale (A1111's "Control Weight" goes to 2); past 5 the control image swamps the prompt.
MAX_CONTROLNET_SCALE = 5.0
# How a control image is prepared before it is fitted (motion.PREPROCESSORS; a test keeps both in step).
CONTROLNET_PREPROCESSORS = ("none", "canny")
CONTROLNET_FIELDS = ("model", "image", "preprocess", "low_threshold", "high_threshold", "scale", "start", "end")
# A1111's extra-networks tag in a prompt (<lora:name:weight>, <lyco:...>): farm would render it as
# words, so a prompt holding one is refused with the loras: entry to write instead.
# What a job's safety check does with a flagged image (docs/models.md, "Safety checker").
SAFETY_ACTIONS = ("keep", "blur", "withhold")
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?[^>]*>", re.IGNORECASE)
# grid: the sweep as written; perturb: one base seed x variation seeds x strengths;
# trajectory: every step captured (docs/steering.md); animate: img2img over a clip's
# frames; walk: text-only frames between prompts and seeds (docs/animation.md).
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

# What a count of denoising steps must be: a task's steps, and how often a guidance loss runs.
WHOLE_STEPS = f"a whole number of steps from 1 to {MAX_STEPS}"
# Whole-number task fields: (lowest, highest, a multiple of, what the message says is
# expected). start_step's real bound is the task's steps, which check_task_fields compares
# once both are known; here it is only kept within MAX_STEPS.
WHOLE_FIELDS: dict[str, tuple[int, int, int, str]] = {
    "steps": (1, MAX_STEPS, 1, WHOLE_STEPS),
    "width": (8, MAX_SIZE, 8, f"a multiple of 8 from 8 to {MAX_SIZE} pixels"),
    "height": (8, MAX_SIZE, 8, f"a multiple of 8 from 8 to {MAX_SIZE} pixels"),
    "start_step": (0, MAX_STEPS, 1, "a whole step number from 0 to the task's steps"),
}
# Numeric technique fields: (lowest, highest).
NUMBER_FIELDS: dict[str, tuple[float, float]] = {
    "variation_strength": (0.0, 1.0),
    "strength": (0.0, 1.0),
    "perturb_scale": (0.0, MAX_PERTURB_SCALE),
    "blend": (0.0, 1.0),
}
# Technique fields that take one of a few names.
CHOICE_FIELDS: dict[str, tuple[str, ...]] = {
    "mix_mode": MIX_MODES,
    "long_prompt": LONG_PROMPT_MODES,
    "schedule_type": SCHEDULE_TYPES,
}
# A prompt mix's and a token mix's weights: negative weights subtract a concept.
MAX_MIX_WEIGHT = 10.0


# One entry's weight in a list-valued field, swept or scheduled on its own: ``loras.0.weight``
# (and ``mix.1.weight``), the dotted form A1111-style X/Y plots of a LoRA's weight need.
ENTRY_WEIGHT = re.compile(r"^(?:(loras|mix)\.(\d{1,3})\.weight|(controlnet)\.(\d{1,3})\.scale)$")
ENTRY_WEIGHT_LIMITS = {"loras": MAX_LORA_WEIGHT, "mix": MAX_MIX_WEIGHT, "controlnet": MAX_CONTROLNET_SCALE}
# The attribute of an entry that a dotted key sets.
ENTRY_ATTRIBUTE = {"loras": "weight", "mix": "weight", "controlnet": "scale"}


class SpecError(FarmError):
    """A problem with a job spec, phrased for the user: names the field and what is expected."""


# ---------------------------------------------------------------------------------------
# One value of a task field


def check_value(key: str, value: Any, where: str) -> Any:
    """Validate one value of a task field and return it normalised (ints as ints, floats as floats)."""
    if key in INT_FIELDS and isinstance(value, float) and value.is_integer():
        value = int(value)  # linspace and float ranges give 64.0 for a width of 64
    if key in ("prompt", "negative_prompt"):
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected text, got {show_type(value)}")
        return check_prompt_text(value, where)
    if key == "seed":
        if value == "random":
            return value
        return whole(value, where, 0, MAX_SEED, f"a whole number from 0 to {MAX_SEED} or 'random'")
    if key in WHOLE_FIELDS:
        low, high, multiple, expected = WHOLE_FIELDS[key]
        return whole(value, where, low, high, expected, multiple=multiple)
    if key == "guidance":
        if not is_finite(value) or not 0 <= value <= 100:
            raise SpecError(f"{where}: expected a number from 0 to 100, got {show(value)}")
        return float(value)
    if key == "scheduler":
        if value not in SCHEDULERS:
            raise SpecError(f"{where}: unknown scheduler {show(value)}; expected one of {', '.join(SCHEDULERS)}")
        return value
    if key == "model":
        if not isinstance(value, str) or not is_known_model_ref(value):
            raise SpecError(
                f"{where}: unknown model {show(value)}; expected a preset ({', '.join(PRESETS)}), "
                "a diffusers folder, a .safetensors file or a hub id (org/name)"
            )
        return value
    return check_technique(key, value, where)


def img2img_start_step(steps: int, strength: float) -> int:
    """The step an img2img loop starts at: as diffusers, int(steps x strength) of the steps run."""
    return steps - min(int(steps * strength), steps)


def schedule_type_error(name: str, schedule_type: str) -> str | None:
    """The one-line reason sampler ``name`` cannot take ``schedule_type``, or None when it can."""
    if schedule_type in SCHEDULE_TYPES_OF[name]:
        return None
    if schedule_type not in SCHEDULE_TYPES:
        return f"unknown schedule type {schedule_type!r}; expected {', '.join(SCHEDULE_TYPES)}"
    takers = [n for n, types in SCHEDULE_TYPES_OF.items() if schedule_type in types]
    return f"sampler {name} has no {schedule_type} schedule type; samplers with one: {', '.join(takers)}"


def entry_weight(key: str) -> tuple[str, int] | None:
    """(field, index) for a dotted entry key like ``loras.0.weight`` or ``controlnet.0.scale``, else None."""
    match = ENTRY_WEIGHT.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        return None
    name, index = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return name, int(index)


def with_entry_weight(name: str, entries: tuple, index: int, value: float) -> tuple:
    """``entries`` of field ``name`` (LoRAs, mix parts, ControlNets) with entry ``index``'s weight
    (a ControlNet's scale) set to ``value``."""
    attribute = ENTRY_ATTRIBUTE[name]
    return tuple(dataclasses.replace(e, **{attribute: value}) if i == index else e for i, e in enumerate(entries))


def check_technique(key: str, value: Any, where: str) -> Any:
    """Validate one value of a steering-technique field (docs/steering.md)."""
    if key == "variation_seed":
        if value is None or value == "random":
            return value
        return check_value("seed", value, where)
    if key in NUMBER_FIELDS:
        if key == "strength" and value is None:  # not given: start_step, or the default, decides
            return None
        return number(value, where, *NUMBER_FIELDS[key])
    if key in WHOLE_FIELDS:  # start_step, when called directly rather than through check_value
        low, high, multiple, expected = WHOLE_FIELDS[key]
        return whole(value, where, low, high, expected, multiple=multiple)
    if key == "init_image":
        if value is not None and (not isinstance(value, str) or not value):
            raise SpecError(f"{where}: expected a path to an image file")
        return value
    if key in CHOICE_FIELDS:
        return choice(value, where, CHOICE_FIELDS[key])
    if key == "mix":
        return tuple(
            _parse_mix_part(part, f"{where}[{i}]")
            for i, part in enumerate(_list(value, where, "entries", allow_empty=True))
        )
    if key == "token_mix":
        if isinstance(value, dict):  # one mapping is a list of one
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
            choice(kind, f"{where}[{i}]", CAPTURE_KINDS)
        if len(set(kinds)) != len(kinds):
            raise SpecError(f"{where}: each kind once")
        return tuple(kinds)
    if entry_weight(key) is not None:
        limit = ENTRY_WEIGHT_LIMITS[key.split(".")[0]]
        return number(value, where, -limit, limit)
    if key == "clip_skip":
        return None if value is None else whole(value, where, 1, MAX_CLIP_SKIP)
    if key == "loras":
        return tuple(
            _parse_lora(e, f"{where}[{i}]") for i, e in enumerate(_list(value, where, "LoRA files", allow_empty=True))
        )
    if key in PAIR_FIELDS:
        return None if value is None else _parse_pair(key, value, where)
    if key == "controlnet":
        return tuple(
            _parse_controlnet(unit, f"{where}[{i}]")
            for i, unit in enumerate(_list(value, where, "ControlNets", allow_empty=True))
        )
    raise SpecError(f"{where}: unknown task field")  # pragma: no cover - guarded by callers


def check_prompt_text(text: str, where: str) -> str:
    """``text`` unless it holds an A1111 ``<lora:name:weight>`` tag, which farm would render as words."""
    tag = LORA_TAG.search(text)
    if tag is None:
        return text
    weight = tag.group(2) or "1"
    raise SpecError(
        f"{where}: {show(tag.group(0))} is A1111's LoRA tag, which farm does not read from prompts; "
        f"remove it and write loras: [{{path: {tag.group(1)}.safetensors, weight: {weight}}}]"
    )


# ---------------------------------------------------------------------------------------
# Checks of one value, shared by every section that reads numbers, names and switches


def whole(
    value: Any,
    where: str,
    low: int,
    high: int | None = None,
    expected: str | None = None,
    *,
    multiple: int = 1,
    quote: bool = True,
) -> int:
    """``value`` if it is a whole number from ``low`` to ``high`` (no upper bound if None) and a
    multiple of ``multiple``; else a SpecError saying ``expected`` (by default "a whole number
    from low [to high]") and, unless ``quote`` is False, the value given.

    A bool is refused although Python counts it as an int: ``steps: yes`` is a typo, not 1.
    """
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
        or value % multiple
    ):
        if expected is None:
            expected = f"a whole number from {low}" + ("" if high is None else f" to {high}")
        raise SpecError(f"{where}: expected {expected}" + (f", got {show(value)}" if quote else ""))
    return value


def number(value: Any, where: str, low: float, high: float) -> float:
    """``value`` as a float if it is a finite number from ``low`` to ``high``."""
    if not is_finite(value) or not low <= value <= high:
        raise SpecError(f"{where}: expected a number from {low:g} to {high:g}, got {show(value)}")
    return float(value)


def flag(value: Any, where: str) -> bool:
    """``value`` if it is true or false (YAML's yes and no included, as PyYAML reads them)."""
    if not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false, got {show(value)}")
    return value


def choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise SpecError(f"{where}: expected one of {', '.join(choices)}, got {show(value)}")
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A number that is neither infinite, NaN, nor an int too large for a float (10**400)."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _list(value: Any, where: str, what: str, allow_empty: bool = False) -> list[Any]:
    if value is None and allow_empty:  # a key written with nothing after it
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
        raise SpecError(f"{where}: expected text, got {show_type(value)}")
    return value


# ---------------------------------------------------------------------------------------
# Small values made of a few fields


def _parse_mix_part(value: Any, where: str) -> MixPart:
    part = _mapping(value, where, ("prompt", "weight"), ("prompt", "weight"))
    if not isinstance(part["prompt"], str):
        raise SpecError(f"{where}.prompt: expected text, got {show_type(part['prompt'])}")
    return MixPart(
        prompt=part["prompt"], weight=number(part["weight"], f"{where}.weight", -MAX_MIX_WEIGHT, MAX_MIX_WEIGHT)
    )


def _parse_token_mix(value: Any, where: str) -> TokenMix:
    item = _mapping(value, where, ("token", "with", "weight"), ("token", "with"))
    return TokenMix(
        token=_text(item["token"], f"{where}.token"),
        other=_text(item["with"], f"{where}.with"),
        weight=number(item.get("weight", 0.5), f"{where}.weight", -MAX_MIX_WEIGHT, MAX_MIX_WEIGHT),
    )


def _parse_embedding(value: Any, where: str) -> Embedding:
    """A path, or {path, token}; job.py makes the path absolute and hashes the file."""
    if isinstance(value, str):
        return Embedding(path=_text(value, where), sha256="")
    item = _mapping(value, where, ("path", "token"), ("path",))
    token = item.get("token")
    return Embedding(
        path=_text(item["path"], f"{where}.path"),
        sha256="",
        token=None if token is None else _text(token, f"{where}.token"),
    )


def _parse_lora(value: Any, where: str) -> Lora:
    """A path, or {path, weight}; job.py makes the path absolute and hashes the file."""
    if isinstance(value, str):
        return Lora(path=_text(value, where), sha256="")
    item = _mapping(value, where, ("path", "weight"), ("path",))
    weight = number(item.get("weight", 1.0), f"{where}.weight", -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
    return Lora(path=_text(item["path"], f"{where}.path"), sha256="", weight=weight)


def _parse_controlnet(value: Any, where: str) -> ControlNetUnit:
    """{model, image, preprocess, low_threshold, high_threshold, scale, start, end}; files.py makes the
    image's path absolute and hashes it (``source``: an animate job's own frame, resolved per frame)."""
    unit = _mapping(value, where, CONTROLNET_FIELDS, ("model", "image"))
    model = unit["model"]
    if not isinstance(model, str) or not (model in CONTROLNET_PRESETS or is_known_model_ref(model)):
        raise SpecError(
            f"{where}.model: unknown ControlNet {show(model)}; expected a preset ({', '.join(CONTROLNET_PRESETS)}), "
            "a diffusers ControlNet folder, a .safetensors file or a hub id (org/name)"
        )
    low = whole(unit.get("low_threshold", 100), f"{where}.low_threshold", 0, 255)
    high = whole(unit.get("high_threshold", 200), f"{where}.high_threshold", low, 255)
    start = number(unit.get("start", 0.0), f"{where}.start", 0.0, 1.0)
    end = number(unit.get("end", 1.0), f"{where}.end", 0.0, 1.0)
    if start >= end:
        raise SpecError(f"{where}.end: {end:g} is not after start ({start:g}); the ControlNet would act on no step")
    return ControlNetUnit(
        model=model,
        image=_text(unit["image"], f"{where}.image"),
        image_sha256="",
        preprocess=choice(unit.get("preprocess", "none"), f"{where}.preprocess", CONTROLNET_PREPROCESSORS),
        low_threshold=low,
        high_threshold=high,
        scale=number(unit.get("scale", 1.0), f"{where}.scale", 0.0, MAX_CONTROLNET_SCALE),
        start=start,
        end=end,
    )


def _parse_pair(key: str, value: Any, where: str) -> tuple[int, int]:
    """SDXL micro-conditioning: [height, width] (sizes, from 1) or [top, left] (a crop, from 0)."""
    low, expected = (
        (0, "[top, left], two whole numbers from 0")
        if key == "crops_coords_top_left"
        else (
            1,
            "[height, width], two whole numbers from 1",
        )
    )
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise SpecError(f"{where}: expected {expected}, got {show(value)}")
    return (
        whole(value[0], f"{where}[0]", low, 1_000_000, expected),
        whole(value[1], f"{where}[1]", low, 1_000_000, expected),
    )


def parse_safety_check(value: Any, where: str = "safety_check") -> SafetyCheck | None:
    """``safety_check: blur`` (an action), or {action, checker}; false or nothing: no check."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        return SafetyCheck(action=choice(value, where, SAFETY_ACTIONS))
    item = _mapping(value, where, ("action", "checker"), ())
    checker = item.get("checker")
    return SafetyCheck(
        action=choice(item.get("action", "blur"), f"{where}.action", SAFETY_ACTIONS),
        checker=None if checker is None else _text(checker, f"{where}.checker"),
    )


def _parse_loss(value: Any, where: str) -> GuidanceLoss:
    loss = _mapping(value, where, ("name", "target", "scale", "every"), ("name",))
    name = loss["name"]
    if name != "color" and (not isinstance(name, str) or not CUSTOM_LOSS.fullmatch(name)):
        raise SpecError(f"{where}.name: expected color or module:function, got {show(name)}")
    target = loss.get("target", [])
    if not isinstance(target, list) or not all(t is None or is_finite(t) for t in target):
        raise SpecError(f"{where}.target: expected a list of numbers (null to leave a channel free)")
    if name == "color" and (
        len(target) != 3 or all(t is None for t in target) or any(t is not None and not 0 <= t <= 1 for t in target)
    ):
        raise SpecError(f"{where}.target: expected [red, green, blue], each from 0 to 1 or null, at least one number")
    every = whole(loss.get("every", DEFAULT_LOSS_EVERY), f"{where}.every", 1, MAX_STEPS, WHOLE_STEPS)
    return GuidanceLoss(
        name=name,
        target=tuple(None if t is None else float(t) for t in target),
        scale=number(loss.get("scale", DEFAULT_LOSS_SCALE), f"{where}.scale", 0.0, 1e6),
        every=every,
    )


# ---------------------------------------------------------------------------------------
# Values in messages


# Error messages quote a value only this far: a YAML anchor bomb is small as a graph of
# shared objects but exponential as text, and a plain repr() would expand it.
def show(value: Any) -> str:
    shown = reprlib.Repr()  # Python 3.11's Repr takes no arguments: set the limits one by one
    shown.maxlevel, shown.maxlist, shown.maxdict, shown.maxstring, shown.maxother, shown.maxlong = 2, 4, 4, 300, 60, 40
    return shown.repr(value)


def show_type(value: Any) -> str:
    """What a value is, for "expected text, got a mapping"."""
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)
