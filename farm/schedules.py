"""Keyframed schedules for animation jobs, in Deforum's syntax.

A numeric field of an animation job may be a constant or a schedule such as ``"0:(0.65), 10:(0.4)"``:
values at output frames, linear in between and held before the first key and after the last. A prompt
may be keyed the same way (``{0: "a forest", 24: "a city"}``), held until the next key or blended
towards it. Deforum evaluates the text in parentheses as a math expression of ``t``; the farm takes
numbers only, so a task stays plain data that hashes and reproduces the same everywhere.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass

from farm.errors import FarmError

# Where a message quotes the user's text, it shows at most this many characters of it.
_SHOWN_CHARS = 60
# A plain decimal number; stricter than float(), which also takes "nan", "inf", "1_000" and padding.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# What float() reads as non-finite, so the message can say so rather than call it an expression.
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
# ASCII only: str.isdigit() and \d also take other scripts' digits, which int() then reads.
_FRAME = re.compile(r"[0-9]+")
_EXAMPLE = "'0:(0.65), 10:(0.4)'"


class ScheduleError(FarmError, ValueError):
    """A schedule that cannot be read; the message says why, without naming the field (the caller prefixes where)."""


def _show(value: object) -> str:
    """The value quoted for a message, cut to a bounded length so one long field cannot flood the log."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an int of more than 4300 digits (Python's int-to-text limit)
        text = f"<{type(value).__name__} too long to show>"
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    # repr escapes newlines, so the message stays on one line; a non-text value is already a repr.
    return repr(text) if isinstance(value, str) else text


@dataclass(frozen=True)
class Schedule:
    """Values keyed by output frame: linear between keys, held before the first key and after the last."""

    keys: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        """Check the invariants value_at relies on, so a hand-built Schedule cannot break it."""
        if not self.keys:
            raise ScheduleError("a schedule needs at least one key")
        frames = [frame for frame, _ in self.keys]
        for frame, value in self.keys:
            if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
                raise ScheduleError(f"frame {frame!r} is not a non-negative integer")
            if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
                raise ScheduleError(f"value {value!r} at frame {frame} is not a finite float")
        if frames != sorted(set(frames)):
            raise ScheduleError(f"frames {frames} are not sorted and unique")

    def value_at(self, frame: int) -> float:
        """The value at an output frame; at a key exactly the stored float."""
        if frame < 0:
            raise ValueError(f"frame {frame} is negative")
        frames = [key for key, _ in self.keys]
        index = bisect_right(frames, frame) - 1
        if index < 0:
            return self.keys[0][1]
        k0, v0 = self.keys[index]
        # At a key, or past the last one: the stored value itself, with no arithmetic to perturb it.
        if k0 == frame or index == len(self.keys) - 1:
            return v0
        k1, v1 = self.keys[index + 1]
        return v0 + (v1 - v0) * (frame - k0) / (k1 - k0)

    def values(self, count: int) -> list[float]:
        """The values at frames 0 to count - 1."""
        if count < 0:
            raise ValueError(f"count {count} is negative")
        return [self.value_at(frame) for frame in range(count)]


def is_schedule_text(value: object) -> bool:
    """Whether a field's value is schedule text rather than a plain value (a number never holds ':')."""
    return isinstance(value, str) and ":" in value


def _number(text: str, where: str) -> float:
    """A finite float from the text of one number; where says what to quote if it is not one."""
    stripped = text.strip()
    if _NON_FINITE.fullmatch(stripped):
        raise ScheduleError(f"{where}: {stripped!r} is not a finite number")
    if not _NUMBER.fullmatch(stripped):
        if not stripped:
            raise ScheduleError(f"{where}: a value is empty")
        # Anything else that is not a plain number is an expression (sin(t), 0.5*2, ...) or junk.
        raise ScheduleError(
            f"{where}: {_show(stripped)} is not a number (math expressions are not supported; give numbers)"
        )
    value = float(stripped)
    if not math.isfinite(value):  # 1e999 reads as inf
        raise ScheduleError(f"{where}: {_show(stripped)} is not a finite number")
    return value


def _split_items(text: str) -> list[str]:
    """The text cut at commas outside parentheses, so an expression's own commas stay in its item."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth <= 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return items


def _parse_item(item: str, where: str) -> tuple[int, float]:
    """One ``frame:(value)`` item."""
    frame_text, colon, rest = item.partition(":")
    frame_text, rest = frame_text.strip(), rest.strip()
    shown = _show(item.strip())
    if not colon:
        raise ScheduleError(f"{where}: item {shown} has no ':'; write frame:(value)")
    if not _FRAME.fullmatch(frame_text):
        if frame_text.startswith("-") and _FRAME.fullmatch(frame_text[1:]):
            raise ScheduleError(f"{where}: frame {frame_text!r} in item {shown} is negative")
        raise ScheduleError(f"{where}: frame {_show(frame_text)} in item {shown} is not a non-negative integer")
    if not (rest.startswith("(") and rest.endswith(")")):
        raise ScheduleError(f"{where}: item {shown} needs parentheses around the value; write frame:(value)")
    if ":" in rest:
        raise ScheduleError(f"{where}: item {shown} holds more than one frame; separate items with commas")
    if rest.count("(") != rest.count(")"):
        raise ScheduleError(f"{where}: item {shown} has unbalanced parentheses")
    inner = rest[1:-1]
    if "(" in inner or ")" in inner:
        raise ScheduleError(f"{where}: item {shown}: math expressions are not supported; give numbers")
    # A frame past any video's length is a typo; capping the digits also keeps int() under its text limit.
    if len(frame_text) > 9:
        raise ScheduleError(f"{where}: frame {_show(frame_text)} in item {shown} is too large")
    return int(frame_text), _number(inner, where)


def _parse_text(text: str) -> Schedule:
    """Schedule text: either one number (a constant) or comma-separated ``frame:(value)`` items."""
    where = f"schedule {_show(text)}"
    stripped = text.strip()
    if not stripped:
        raise ScheduleError(f"{where} is empty; give a number or frame:(value) items like {_EXAMPLE}")
    if ":" not in stripped:
        return Schedule(((0, _number(stripped, where)),))
    items = _split_items(stripped)
    # One trailing comma is allowed (Deforum's examples often have one); any other empty item is a typo.
    if len(items) > 1 and not items[-1].strip():
        items.pop()
    keys: dict[int, float] = {}
    for item in items:
        if not item.strip():
            raise ScheduleError(f"{where} has an empty item between commas")
        frame, value = _parse_item(item, where)
        if frame in keys:
            raise ScheduleError(f"{where} gives frame {frame} twice")
        keys[frame] = value
    return Schedule(tuple(sorted(keys.items())))


def parse_schedule(value: object) -> Schedule:
    """A Schedule from a job field: a number (a constant), the text of one, or Deforum schedule text."""
    if isinstance(value, str):
        return _parse_text(value)
    # bool is an int subclass, but `true` in a YAML job is a mistake, not the number 1.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too big for a float
            raise ScheduleError(f"{_show(value)} is too large") from None
        if not math.isfinite(number):
            raise ScheduleError(f"{_show(value)} is not a finite number")
        return Schedule(((0, number),))
    raise ScheduleError(
        f"expected a number or schedule text like {_EXAMPLE}, got {type(value).__name__} {_show(value)}"
    )


def _prompt_frame(key: object) -> int:
    """A keyed prompt's frame: an int, or the digit string YAML gives for a quoted key."""
    if isinstance(key, str):
        stripped = key.strip()
        if _FRAME.fullmatch(stripped) and len(stripped) <= 9:
            return int(stripped)
        if stripped.startswith("-") and _FRAME.fullmatch(stripped[1:]):
            raise ScheduleError(f"prompt frame {_show(key)} is negative")
        raise ScheduleError(f"prompt frame {_show(key)} is not a non-negative integer")
    if isinstance(key, bool) or not isinstance(key, int):
        raise ScheduleError(f"prompt frame {_show(key)} is not a non-negative integer")
    if key < 0:
        raise ScheduleError(f"prompt frame {key} is negative")
    return key


def parse_keyed_prompts(value: object) -> tuple[tuple[int, str], ...]:
    """Prompts keyed by output frame, sorted, from a mapping of frame to text or one text (keyed at 0)."""
    if isinstance(value, str):
        return ((0, value),)
    if not isinstance(value, Mapping):
        raise ScheduleError(
            f"expected a prompt or a mapping of frame to prompt, got {type(value).__name__} {_show(value)}"
        )
    if not value:
        raise ScheduleError("the mapping of frame to prompt is empty")
    prompts: dict[int, str] = {}
    for key, prompt in value.items():
        frame = _prompt_frame(key)
        if not isinstance(prompt, str):
            raise ScheduleError(f"prompt at frame {frame} is {type(prompt).__name__} {_show(prompt)}, not text")
        # 24 and "24" (or "024") name the same frame; which one wins would depend on key order.
        if frame in prompts:
            raise ScheduleError(f"prompt frame {frame} is given twice (as {_show(key)} and another key)")
        prompts[frame] = prompt
    return tuple(sorted(prompts.items()))


def prompt_at(keys: tuple[tuple[int, str], ...], frame: int, blend: bool) -> tuple[tuple[str, float], ...]:
    """The prompt(s) and weights at an output frame: the held key's, or with blend the two around it."""
    if not keys:
        raise ValueError("no keyed prompts")
    frames = [key for key, _ in keys]
    index = bisect_right(frames, frame) - 1
    if index < 0:
        return ((keys[0][1], 1.0),)
    k0, p0 = keys[index]
    if not blend or k0 == frame or index == len(keys) - 1:
        return ((p0, 1.0),)
    k1, p1 = keys[index + 1]
    if p0 == p1:
        return ((p0, 1.0),)
    t = (frame - k0) / (k1 - k0)
    return ((p0, 1.0 - t), (p1, t))
