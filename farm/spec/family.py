"""What a job's models decide: the defaults that depend on a model's family (its native size,
SDXL's micro-conditioning) and the fields a family cannot take.

Read when the job is read, from the model's reference alone (``models.reference_facts`` reads
``model_index.json`` and configs, or a single file's header; no torch), so every task is fully
resolved before it is rendered and its id never depends on the machine that renders it.
"""

from __future__ import annotations

from typing import Any

from farm.models import ModelFacts, reference_facts
from farm.spec.fields import SpecError
from farm.spec.task import PAIR_FIELDS

# The size a task gets when the job gives none and the model's config cannot be read here (a path
# that exists only on the cluster's nodes, a hub id not in this machine's cache): SD 1.x's own.
FALLBACK_SIZE = 512
# A family's own size, for a model whose family is known but not its size (a single file without
# model_config): SD 1.x and SD 2.x base 512, SD 2.x's v-prediction models 768, SDXL 1024.
FAMILY_SIZES = {"sd1": 512, "sd2": 512, "sdxl": 1024}
V_PREDICTION_SIZE = 768
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}

# One sweep axis, as job.py holds it: field names, and per value a tuple of one value per name.
Axis = tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]


def swept_values(name: str, defaults: dict[str, Any], axes: list[Axis]) -> list[Any]:
    """Every value a field takes in the job: its sweep's values, else its default."""
    for names, rows in axes:
        if name in names:
            index = names.index(name)
            return [row[index] for row in rows]
    return [defaults[name]]


def read_families(defaults: dict[str, Any], axes: list[Axis], model_config: str | None) -> dict[str, ModelFacts | None]:
    """model reference -> what its files say (family, native size), None where they cannot be read here."""
    return {ref: reference_facts(ref, model_config) for ref in dict.fromkeys(swept_values("model", defaults, axes))}


def check_families(facts: dict[str, ModelFacts | None], defaults: dict[str, Any], axes: list[Axis]) -> None:
    """Refuse fields a model's family cannot take, naming the field and the model."""
    given = {name for name in PAIR_FIELDS if any(v is not None for v in swept_values(name, defaults, axes))}
    textual_inversion = any(swept_values("embeddings", defaults, axes))
    for ref, fact in facts.items():
        if fact is None:
            continue
        family = FAMILY_NAMES.get(fact.family, fact.family)
        if given and fact.family != "sdxl":
            name = sorted(given)[0]
            raise SpecError(f"{name}: SDXL micro-conditioning; model {ref!r} is {family}, which does not take it")
        if textual_inversion and fact.family == "sdxl":
            raise SpecError(
                f"embeddings: textual-inversion files hold vectors for one text encoder; model {ref!r} is SDXL, "
                "which has two, so farm does not load them there"
            )


def apply_family_defaults(fields: dict[str, Any], facts: dict[str, ModelFacts | None]) -> None:
    """Fill a task's family defaults: the native size when the job gives none, and for SDXL the
    micro-conditioning diffusers' StableDiffusionXLPipeline uses (original and target size = the
    image's size, crop at the top left)."""
    fact = facts.get(fields["model"])
    native = native_size(fact)
    if fields["height"] is None:
        fields["height"] = native[0]
    if fields["width"] is None:
        fields["width"] = native[1]
    if fact is None or fact.family != "sdxl":
        return
    size = (fields["height"], fields["width"])
    for name, default in (("original_size", size), ("target_size", size), ("crops_coords_top_left", (0, 0))):
        if fields[name] is None:
            fields[name] = default


def native_size(fact: ModelFacts | None) -> tuple[int, int]:
    """(height, width) a task gets when its job gives no size: the model's, else its family's."""
    if fact is None:
        return (FALLBACK_SIZE, FALLBACK_SIZE)
    if fact.native_size:
        return fact.native_size
    side = V_PREDICTION_SIZE if fact.family == "sd2" and fact.prediction_type == "v_prediction" else None
    side = side or FAMILY_SIZES.get(fact.family, FALLBACK_SIZE)
    return (side, side)
