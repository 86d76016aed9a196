"""What a job expands to: ``RenderTask`` (one image, every input resolved) and ``Batch``, the
small frozen values a task holds, the field-name tuples the rest of farm reads tasks by, and
the seeds drawn for ``seed: random``.

Plain values only: no YAML and no validation (``fields`` checks values, ``job`` reads the YAML),
so the driver, the actor and the manifest can use tasks without the parser.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

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
    "schedule_type",
    "clip_skip",
    "loras",
    "controlnet_models",
)


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
class Lora:
    """A LoRA file and the weight its adapter is applied with (0: the image without it, exactly)."""

    path: str
    sha256: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet and its control image: diffusers' controlnet_conditioning_scale and
    control_guidance_start/end, the image fitted to the task's size after ``preprocess``."""

    model: str  # a diffusers ControlNet folder, a cached hub id or a .safetensors file
    image: str  # absolute path (an animate job's ``source`` is resolved to each frame's own)
    image_sha256: str
    preprocess: str = "none"  # none or canny
    low_threshold: int = 100  # canny's hysteresis thresholds (OpenCV), 0..255
    high_threshold: int = 200
    scale: float = 1.0  # 0: the image without the ControlNet, exactly
    start: float = 0.0  # the share of the steps before it starts acting
    end: float = 1.0  # the share of the steps after which it stops


@dataclass(frozen=True)
class GuidanceLoss:
    """An extra loss on the decoded predicted x0, its gradient applied to the latents every ``every`` steps."""

    name: str  # "color" or "module:function"
    target: tuple[float | None, ...] = ()
    # Literals, not fields.DEFAULT_LOSS_*: this module imports no other part of farm.spec
    # (a test keeps the two in step).
    scale: float = 200.0
    every: int = 10


@dataclass(frozen=True)
class SafetyCheck:
    """A job's opt-in safety check: what becomes of a flagged image, and whose checker runs."""

    action: str = "blur"  # keep (record the verdict only), blur, or withhold (write no image)
    checker: str | None = None  # a folder with safety_checker/ and feature_extractor/; None: the model's own


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
    # Steering techniques (docs/steering.md); each default means "not used".
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
    # Animation (docs/animation.md): the output frame number, and for a chained frame the
    # task whose image is blended into the init image (with weight ``blend``) and the task
    # whose image the init image's colours are matched to. Ids, not images, so a whole
    # chained shot is known (and resumable) before any of it is rendered.
    frame: int | None = None
    previous: str | None = None
    blend: float = 0.0
    color_reference: str | None = None
    # The models people bring (docs/models.md): sigma spacing as A1111 names it (automatic is the
    # scheduler's own), the CLIP layer the prompt is read from (1: the last, A1111's convention;
    # None: the family's default), LoRA adapters and their weights, and SDXL's micro-conditioning
    # (height, width) / (top, left) pairs, filled with diffusers' defaults for an SDXL model.
    schedule_type: str = "automatic"
    clip_skip: int | None = None
    loras: tuple[Lora, ...] = ()
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    # Animation that holds together (docs/animation.md): ControlNets with their control images.
    controlnet: tuple[ControlNetUnit, ...] = ()
    # A chained frame with flow: the previous frame's image is warped along the optical flow
    # (this method) from source frame ``flow_from`` (the one before) to this frame's source.
    flow: str | None = None
    flow_from: str | None = None
    # A frame of an animation from text after the first: img2img of the frame before, warped by
    # Deforum's 2D motion (zoom, angle in degrees, translation x and y in pixels).
    motion: tuple[float, float, float, float] | None = None

    @cached_property
    def task_id(self) -> str:
        """A hash of the canonical JSON of the task: the same work always has the same id."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    def canonical_json(self) -> str:
        """The task as JSON, keys sorted; technique fields left at their defaults are omitted, so a
        plain task keeps the id it had before those techniques existed.

        The bytes ``json.dumps(to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
        gives (less those fields), joined from per-field fragments (json_fragment) in a fraction of its
        time: a million-task job computes every id before its first image.
        """
        fields = vars(self)  # read as a dict: faster than attribute by attribute
        core = _core_values(fields)
        techniques = _technique_values(fields)
        if techniques == _TECHNIQUE_DEFAULTS:  # most tasks: the core fields only
            return _CORE_JSON % tuple(map(json_fragment, core))
        differs = map(operator.ne, techniques, _TECHNIQUE_DEFAULTS)
        used = itertools.compress(zip(_TECHNIQUE_KEYS, techniques, strict=True), differs)
        items = sorted([*zip(_CORE_KEYS, core, strict=True), *used])  # keys are unique: values are never compared
        return "{" + ",".join([key + json_fragment(value) for key, value in items]) + "}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RenderTask:
        """``RenderTask(**fields)`` for a dict of every field in declaration order (job expansion's), in
        a fraction of the time: the values go straight into the task's ``__dict__``, as unpickling puts
        them, rather than through the frozen ``__init__``'s setattr per field."""
        if tuple(fields) != TASK_FIELDS:  # anything else takes __init__, and its TypeError
            return cls(**fields)
        task = object.__new__(cls)
        task.__dict__.update(fields)
        return task

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RenderTask:
        """Rebuild a task from ``to_dict`` or canonical JSON (a manifest row's ``task_json``)."""
        fields = dict(data)
        fields["mix"] = tuple(MixPart(**m) for m in fields.get("mix", ()))
        fields["token_mix"] = tuple(TokenMix(**m) for m in fields.get("token_mix", ()))
        fields["embeddings"] = tuple(Embedding(**e) for e in fields.get("embeddings", ()))
        fields["capture"] = tuple(fields.get("capture", ()))
        fields["loras"] = tuple(Lora(**entry) for entry in fields.get("loras", ()))
        fields["controlnet"] = tuple(ControlNetUnit(**unit) for unit in fields.get("controlnet", ()))
        if fields.get("motion") is not None:
            fields["motion"] = tuple(fields["motion"])
        for name in PAIR_FIELDS:
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
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
        if self.schedule_type != "automatic":
            parts.append(f"{self.schedule_type} sigmas")
        if self.clip_skip is not None:
            parts.append(f"clip skip {self.clip_skip}")
        parts += [f"lora {Path(lora.path).stem} at {lora.weight:g}" for lora in self.loras]
        if self.frame is not None:
            parts.append(f"frame {self.frame}")
        if self.previous and self.motion is None:
            parts.append(f"blend {self.blend:g} of {self.previous[:8]}")
        if self.color_reference:
            parts.append(f"colours of {self.color_reference[:8]}")
        if self.flow:
            parts.append(f"{self.flow} flow")
        if self.motion is not None:
            parts.append("{} moved: zoom {:g} angle {:g} x {:g} y {:g}".format(self.previous[:8], *self.motion))
        parts += [f"controlnet {Path(u.model).name} at {u.scale:g}" for u in self.controlnet]
        return ", ".join(parts)

    @property
    def controlnet_models(self) -> tuple[str, ...]:
        """The ControlNet models the task runs, in order: a batch shares them (its images differ)."""
        return tuple(unit.model for unit in self.controlnet)

    @property
    def batch_key(self) -> tuple:
        """What tasks sharing one UNet batch share (BATCH_FIELDS, in order): read per task by the driver."""
        return _batch_key(self)


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(RenderTask))
# One C call for the whole key, several times faster than a generator of getattrs (the driver
# reads a key per task while planning a million of them).
_batch_key = operator.attrgetter(*BATCH_FIELDS)
INT_FIELDS = ("seed", "steps", "width", "height", "variation_seed", "start_step", "frame", "clip_skip")
# SDXL's micro-conditioning: two whole numbers each, (height, width) or (top, left) as diffusers orders them.
PAIR_FIELDS = ("original_size", "target_size", "crops_coords_top_left")
SEED_FIELDS = ("seed", "variation_seed")
# Seeds are 32-bit: fields.MAX_SEED + 1 of them (a literal: this module imports no other part of
# farm.spec; a test keeps the two in step).
SEED_COUNT = 2**32
# Filled in from the file when the job is read, never written by the user.
DERIVED_FIELDS = (
    "init_image_sha256",
    "frame",
    "previous",
    "blend",
    "color_reference",
    "flow",
    "flow_from",
    "motion",
)
USER_FIELDS = tuple(name for name in TASK_FIELDS if name not in DERIVED_FIELDS)


# The canonical JSON's parts: getters of a task's core and technique field values from its __dict__,
# each field's '"name":' key, the technique fields' defaults (at which they are left out), and the
# JSON of a task whose techniques are all at their defaults.
_CORE_NAMES = sorted(CORE_FIELDS)
_TECHNIQUE_NAMES = TASK_FIELDS[len(CORE_FIELDS) :]
_core_values = operator.itemgetter(*_CORE_NAMES)
_technique_values = operator.itemgetter(*_TECHNIQUE_NAMES)
_CORE_KEYS = tuple(json.dumps(name) + ":" for name in _CORE_NAMES)
_TECHNIQUE_KEYS = tuple(json.dumps(name) + ":" for name in _TECHNIQUE_NAMES)
_TECHNIQUE_DEFAULTS = tuple(f.default for f in dataclasses.fields(RenderTask)[len(CORE_FIELDS) :])
_CORE_JSON = "{" + ",".join(key + "%s" for key in _CORE_KEYS) + "}"
# How json.dumps writes the floats repr() writes as inf, -inf and nan.
_NON_FINITE = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}
# Fragments already written: strings by value, tuples and frozen dataclasses by identity (a job's
# tasks share its LoRA, ControlNet and mix tuples). Emptied when full, so memory stays bounded.
_CACHE_SIZE = 4096
_strings: dict[str, str] = {}
_shared: dict[int, tuple[Any, str]] = {}


def json_fragment(value: Any) -> str:
    """``value`` as ``json.dumps`` writes it inside a task's canonical JSON (after ``dataclasses.asdict``)."""
    kind = type(value)
    if kind is str:
        text = _strings.get(value)
        if text is None:
            text = _remember(_strings, value, _dumps(value))
        return text
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        text = float.__repr__(value)
        return _NON_FINITE.get(text, text)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is not tuple and not _is_frozen_dataclass(value):  # a list, say: it could change, so never cached
        return _dumps(_as_plain(value))
    hit = _shared.get(id(value))  # the entry holds the value: no other object has its id while it is cached
    if hit is None:
        hit = _remember(_shared, id(value), (value, _dumps(_as_plain(value))))
    return hit[1]


def _remember(cache: dict, key: Any, entry: Any) -> Any:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = entry
    return entry


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_frozen_dataclass(value: Any) -> bool:
    params = getattr(type(value), "__dataclass_params__", None)
    return params is not None and params.frozen


def _as_plain(value: Any) -> Any:
    """``value`` as ``dataclasses.asdict`` leaves it, for json: dataclasses become dicts, all the way down."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_as_plain(v) for v in value]
    if isinstance(value, dict):
        return {_as_plain(k): _as_plain(v) for k, v in value.items()}
    return value


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
class RandomSlot:
    """One ``random`` entry in a seed sweep: a single seed shared across the other axes."""

    slot: str


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


def frame_axis(animation: Animation | None) -> list[tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]]:
    """An animation's frames as one zipped sweep axis (names, rows), for the checks across fields."""
    if animation is None or not animation.frames[0]:
        return []
    names = tuple(name for name, _ in animation.frames[0])
    return [(names, tuple(tuple(value for _, value in frame) for frame in animation.frames))]


def random_seed(base: int, slot: str) -> int:
    """A seed drawn for ``seed: random``: fixed for a run (and its resume) by ``base``."""
    return int.from_bytes(hashlib.sha256(f"{base}:{slot}".encode()).digest()[:4], "big")


def resolve_seeds(fields: dict[str, Any], shot_seed: Any, index: int, random_base: int) -> None:
    """Draw task number ``index``'s ``random`` seeds, and add an animation frame's seed step to its shot's seed."""
    for name in SEED_FIELDS:
        if fields[name] == "random":
            # The plain seed keeps its original slot so existing runs draw the same seeds.
            slot = f"task:{index}" + ("" if name == "seed" else f":{name}")
            fields[name] = random_seed(random_base, slot)
        elif isinstance(fields[name], RandomSlot):
            fields[name] = random_seed(random_base, fields[name].slot)
    if isinstance(fields["seed"], SeedStep):
        seed = random_seed(random_base, shot_seed.slot) if isinstance(shot_seed, RandomSlot) else shot_seed
        fields["seed"] = (seed + fields["seed"].offset) % SEED_COUNT
