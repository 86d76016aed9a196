"""Job specs: job YAML -> validated frozen dataclasses -> a lazy stream of ``RenderTask``s.

The package is the "values" layer (docs/architecture.md): it imports no torch, ray or
diffusers. Its modules, each importing only those above it in this list:

- ``task``: RenderTask, Batch, the small values a task holds, the field-name tuples, task ids.
- ``fields``: SpecError, limits and name lists, the checks and parsers of one value.
- ``animation``: the ``animate:`` and ``walk:`` sections -> an Animation's per-frame fields.
- ``files``: the files a job names (init images, textual inversion, LoRAs) made absolute and hashed.
- ``family``: what a job's models decide (native size, SDXL's micro-conditioning, refused fields).
- ``job``: the job file and its sections -> JobSpec, sweep expansion, checks across fields.

Callers import from here (``from farm.spec import RenderTask, load_job``); the names below
are the package's public interface.
"""

from __future__ import annotations

from farm.spec.animation import DEFAULT_FPS, parse_animation
from farm.spec.fields import (
    ANIMATION_KINDS,
    ANIMATION_MODES,
    CAPTURE_KINDS,
    DEFAULT_LOSS_EVERY,
    DEFAULT_LOSS_SCALE,
    DEFAULT_STRENGTH,
    KINDS,
    LONG_PROMPT_MODES,
    MAX_AXIS_VALUES,
    MAX_CLIP_SKIP,
    MAX_LORA_WEIGHT,
    MAX_PERTURB_SCALE,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MAX_TASKS,
    MIX_MODES,
    SAFETY_ACTIONS,
    SCHEDULE_TYPES,
    SCHEDULE_TYPES_OF,
    SCHEDULERS,
    SpecError,
    check_technique,
    check_value,
    img2img_start_step,
    schedule_type_error,
)
from farm.spec.job import (
    DEFAULTS,
    TOP_LEVEL_FIELDS,
    JobSpec,
    check_combinations,
    load_job,
    parse_job,
    resolve_img2img,
    shots,
    sweep_values,
)
from farm.spec.task import (
    BATCH_FIELDS,
    CORE_FIELDS,
    DERIVED_FIELDS,
    INT_FIELDS,
    SEED_FIELDS,
    TASK_FIELDS,
    USER_FIELDS,
    Animation,
    Batch,
    ControlNetUnit,
    Embedding,
    GuidanceLoss,
    Lora,
    MixPart,
    RandomSlot,
    RenderTask,
    SafetyCheck,
    SeedStep,
    TokenMix,
    random_seed,
)

__all__ = [
    "DEFAULT_FPS",
    "ANIMATION_KINDS",
    "ANIMATION_MODES",
    "BATCH_FIELDS",
    "CAPTURE_KINDS",
    "CORE_FIELDS",
    "DEFAULTS",
    "DEFAULT_LOSS_EVERY",
    "DEFAULT_LOSS_SCALE",
    "DEFAULT_STRENGTH",
    "DERIVED_FIELDS",
    "INT_FIELDS",
    "KINDS",
    "LONG_PROMPT_MODES",
    "MAX_AXIS_VALUES",
    "MAX_PERTURB_SCALE",
    "MAX_SEED",
    "MAX_SIZE",
    "MAX_STEPS",
    "MAX_TASKS",
    "MAX_CLIP_SKIP",
    "MAX_LORA_WEIGHT",
    "MIX_MODES",
    "SAFETY_ACTIONS",
    "SCHEDULE_TYPES",
    "SCHEDULE_TYPES_OF",
    "SCHEDULERS",
    "SEED_FIELDS",
    "TASK_FIELDS",
    "TOP_LEVEL_FIELDS",
    "USER_FIELDS",
    "Animation",
    "Batch",
    "ControlNetUnit",
    "Embedding",
    "GuidanceLoss",
    "JobSpec",
    "Lora",
    "MixPart",
    "RandomSlot",
    "RenderTask",
    "SafetyCheck",
    "SeedStep",
    "SpecError",
    "TokenMix",
    "check_combinations",
    "check_technique",
    "check_value",
    "img2img_start_step",
    "load_job",
    "parse_animation",
    "parse_job",
    "random_seed",
    "resolve_img2img",
    "schedule_type_error",
    "shots",
    "sweep_values",
]
