"""Task ids and expansion stay exactly what they were (issue 16 made both fast): every id against a
reference written here (sha256 of json.dumps of dataclasses.asdict, less technique fields at their
defaults), and JobSpec.tasks() against a plain copy of the expansion as it was (no torch)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farm.spec import parse_job
from farm.spec.family import apply_family_defaults
from farm.spec.fields import MAX_SEED
from farm.spec.files import resolve_source_controls
from farm.spec.job import JobSpec, apply_entry_weights, load_job, resolve_img2img
from farm.spec.task import (
    SEED_COUNT,
    TASK_FIELDS,
    ControlNetUnit,
    Embedding,
    GuidanceLoss,
    Lora,
    MixPart,
    RandomSlot,
    RenderTask,
    SeedStep,
    TokenMix,
    random_seed,
)

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
# The fields every canonical JSON has, whatever their values (a literal: the reference must not follow the code).
CORE = ("model", "scheduler", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")


def reference_json(task: RenderTask) -> str:
    """The canonical JSON as RenderTask.canonical_json wrote it before issue 16."""
    data = dataclasses.asdict(task)
    for f in dataclasses.fields(task):
        if f.name not in CORE and getattr(task, f.name) == f.default:
            del data[f.name]
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def reference_id(task: RenderTask) -> str:
    return hashlib.sha256(reference_json(task).encode()).hexdigest()[:20]


def assert_same_id(task: RenderTask) -> None:
    assert task.canonical_json() == reference_json(task)
    assert task.task_id == reference_id(task)


def plain(**fields: Any) -> RenderTask:
    values = {"model": "tiny", "scheduler": "euler", "prompt": "a cat", "negative_prompt": "", "seed": 1}
    values |= {"steps": 20, "guidance": 7.5, "width": 64, "height": 64}
    return RenderTask(**(values | fields))


UNIT = ControlNetUnit("tiny-controlnet", "/a/house.png", "ab" * 32, "canny", 50, 250, 0.75, 0.1, 0.9)
# Every field away from its default, in a few ways each.
RICH = {
    "all": plain(
        prompt='quote " backslash \\ tab \t newline \n nul \x00 \x1f del \x7f \u2028 é 漢字 🐕',
        negative_prompt="blurry, low quality",
        seed=2**32 - 1,
        steps=50,
        guidance=7.0,
        width=1024,
        height=768,
        variation_seed=10**12,
        variation_strength=1e-05,
        perturb_scale=0.1,
        init_image='/data/ünï "house".png',
        init_image_sha256="cd" * 32,
        strength=0.30000000000000004,
        start_step=35,
        mix=(MixPart("a cute puppy", 0.75), MixPart("a cute skunk", 0.25)),
        mix_mode="slerp",
        token_mix=(TokenMix("puppy", "skunk", 0.5),),
        embeddings=(Embedding("/e/a.safetensors", "ef" * 32), Embedding("/e/b.pt", "01" * 32, "<b>")),
        guidance_loss=GuidanceLoss("color", (None, None, 0.9), 2000.0, 1),
        capture=("latents", "x0"),
        long_prompt="chunks",
        frame=12,
        previous="0123456789abcdef0123",
        blend=0.5,
        color_reference="fedcba9876543210fedc",
        schedule_type="karras",
        clip_skip=2,
        loras=(Lora("/l/a.safetensors", "aa" * 32, 0.0), Lora("/l/b.safetensors", "bb" * 32)),
        original_size=(1024, 1024),
        target_size=(768, 1024),
        crops_coords_top_left=(0, 0),
        controlnet=(UNIT, dataclasses.replace(UNIT, preprocess="none", scale=0)),
        flow="farneback",
        flow_from="/frames/0001.png",
        motion=(1.03, 0.5, 1, -0.0),
    ),
    "odd floats": plain(
        guidance=1e16,
        variation_seed=0,
        variation_strength=5e-324,
        perturb_scale=1.7976931348623157e308,
        blend=float("inf"),
        motion=(float("-inf"), float("nan"), 1e-07, 123456789.125),
        guidance_loss=GuidanceLoss("mod:fn", (0.5, None, -0.0)),
    ),
    "negative zero": plain(guidance=-0.0, variation_strength=-0.0, perturb_scale=0, blend=False, start_step=0),
    "ints where floats go": plain(guidance=7, variation_seed=3, variation_strength=1, loras=(Lora("/l", "00", 1),)),
    "large and negative ints": plain(seed=10**30, steps=-1, width=2**63, clip_skip=-(2**70), frame=0),
    "bools and numpy": plain(guidance=np.float64(0.1), seed=True, perturb_scale=np.float64(0.0)),
    "lists, not tuples": plain(capture=["x0"], mix=[MixPart("a", 1.0)], motion=[1, 2.5, 0, 0]),
    "empty texts": plain(prompt="", negative_prompt="", previous="", init_image=""),
}


@pytest.mark.parametrize("task", RICH.values(), ids=list(RICH))
def test_an_id_is_the_hash_of_the_json_it_always_was(task: RenderTask):
    assert_same_id(task)


@pytest.mark.parametrize("task", RICH.values(), ids=list(RICH))
def test_ids_survive_json_and_pickle(task: RenderTask):
    again = RenderTask.from_json(task.canonical_json())
    assert again.canonical_json() == task.canonical_json()
    assert again.task_id == task.task_id
    assert_same_id(RenderTask.from_dict(task.to_dict()))
    fresh = dataclasses.replace(task)
    for copy in (pickle.loads(pickle.dumps(fresh)), pickle.loads(pickle.dumps(task))):  # id not yet cached, cached
        assert copy.canonical_json() == task.canonical_json()  # (== would fail on a nan)
        assert_same_id(copy)
        assert copy.task_id == task.task_id


def test_a_lone_surrogate_is_written_as_json_writes_it():
    task = plain(prompt="half \ud83d a dog")
    assert task.canonical_json() == reference_json(task)
    with pytest.raises(UnicodeEncodeError):
        task.task_id  # noqa: B018  # as before: no UTF-8 for it


def test_equal_values_of_other_types_do_not_share_a_cached_json():
    """1 == 1.0 == True and 0.0 == -0.0: a fragment cache keyed by value would mix them up."""
    for weight in (1, 1.0, True, 0.0, -0.0, 0):
        assert_same_id(plain(loras=(Lora("/l", "00", weight),), guidance=weight, motion=(weight, 1, 1, 1)))
    ids = {plain(loras=(Lora("/l", "00", w),)).task_id for w in (1, 1.0, True)}
    assert len(ids) == 3
    assert_same_id(plain(mix=[]))  # [] != (): written, as it always was


def test_the_fragment_caches_stay_right_as_values_come_and_go():
    """Thousands of distinct prompts and fresh tuples: more than the caches hold, and each tuple freed
    (so its address can be reused) before the next is made."""
    for i in range(5000):
        assert_same_id(plain(prompt=f"prompt {i}", loras=(Lora(f"/l/{i % 7}", "00", i / 8),), motion=(i, 0.5, 0, 0)))


def test_from_fields_is_the_dataclass_init():
    task = RICH["all"]
    fields = {name: getattr(task, name) for name in TASK_FIELDS}
    fast = RenderTask.from_fields(fields)
    assert fast == task
    assert pickle.dumps(fast) == pickle.dumps(RenderTask(**fields))  # the same __dict__, in the same order
    shuffled = dict(reversed(fields.items()))
    assert list(vars(RenderTask.from_fields(shuffled))) == list(TASK_FIELDS)
    with pytest.raises(TypeError):
        RenderTask.from_fields({**fields, "loras.0.weight": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.seed = 2  # type: ignore[misc]


def test_the_seed_count_is_the_seed_limit():
    assert SEED_COUNT == MAX_SEED + 1


# ---------------------------------------------------------------------------------------
# Expansion


def reference_tasks(spec: JobSpec, random_base: int = 0) -> list[RenderTask]:
    """JobSpec.tasks() as it was before issue 16, ids by reference_id."""
    names = [n for axis_names, _ in spec.axes for n in axis_names]
    frames = spec.animation.frames if spec.animation else ((),)
    chained = spec.animation is not None and spec.animation.mode == "chained"
    out = []
    for shot_index, combo in enumerate(itertools.product(*(values for _, values in spec.axes))):
        shot = dict(spec.defaults)
        shot.update(zip(names, itertools.chain.from_iterable(combo), strict=True))
        if spec.animation and shot["seed"] == "random":
            shot["seed"] = random_seed(random_base, f"shot:{shot_index}")
        first = previous = None
        for frame, frame_fields in enumerate(frames):
            fields = dict(shot)
            fields.update(frame_fields)
            if spec.animation is not None:
                fields["frame"] = frame
            for name in ("seed", "variation_seed"):
                if fields[name] == "random":
                    fields[name] = random_seed(random_base, f"task:{len(out)}" + ("" if name == "seed" else f":{name}"))
                elif isinstance(fields[name], RandomSlot):
                    fields[name] = random_seed(random_base, fields[name].slot)
            if isinstance(fields["seed"], SeedStep):
                base = shot["seed"]
                base = random_seed(random_base, base.slot) if isinstance(base, RandomSlot) else base
                fields["seed"] = (base + fields["seed"].offset) % (MAX_SEED + 1)
            apply_entry_weights(fields)
            apply_family_defaults(fields, spec.facts)
            resolve_img2img(fields, spec.hashes)
            resolve_source_controls(fields)
            if chained and previous is not None:
                fields["previous"] = reference_id(previous)
                if spec.animation.color_coherence:
                    fields["color_reference"] = reference_id(first)
            else:
                fields["blend"] = 0.0
            task = RenderTask(**fields)
            first = first or task
            previous = task
            out.append(task)
    return out


# Jobs whose ids are frozen below, none naming a file: random seeds, a perturb, a walk, 2D motion.
FROZEN_JOBS = {
    "grid": """
name: grid
model: tiny
scheduler: euler
defaults: {width: 64, height: 64, negative_prompt: "bad \\"q\\" \\\\ é"}
sweep:
  steps: [4, 5]
  guidance: [7, 7.5]
  prompt: ["a cat", "ünïcode ☃ \\t tab", "quote \\" and \\\\"]
  seed: [1, random, 3]
  variation_seed: [null, random]
""",
    "perturb": """
name: perturb
kind: perturb
model: tiny
defaults: {width: 64, height: 64, seed: random, prompt: a dog}
perturb: {seeds: {random: 2}, strengths: [0.1, 0.5], mode: slerp}
""",
    "walk": """
name: walk
kind: walk
model: tiny
defaults: {width: 64, height: 64, steps: 5}
sweep: {guidance: [5, 7]}
walk: {prompts: [a cat, a dog], seeds: [1, 2], frames: 3, loop: false}
""",
    "zoom": """
name: zoom
kind: animate
model: tiny
defaults: {width: 64, height: 64, steps: 10, prompt: a castle, seed: random}
sweep: {guidance: [5, 7]}
animate:
  frames: 4
  seed: iter
  color_coherence: true
  motion: {zoom: "0:(1.03)", angle: "0:(0.5)"}
  schedules: {strength: "0:(0.4)"}
""",
}
# (task count, sha256 of the ids joined by newlines, first 32 hex) at random_base 0 and 12345, taken
# from the expansion and ids before issue 16.
FROZEN_IDS = {
    "grid": ((72, "91ad35917fe8c15c82484a6f389c7ce5"), (72, "69c3974c118bc99b4fda5e5157ae08d9")),
    "perturb": ((4, "510a02ba674ea826b53c307721669eb4"), (4, "b50c238f6c9a8b0a0672001a739702ad")),
    "walk": ((8, "0355251e22463d149093893a4b3d77a2"), (8, "0355251e22463d149093893a4b3d77a2")),
    "zoom": ((8, "fd25daa6a1559b761f2f208347f2c2e3"), (8, "cff02ee463beb17e65225a1057dec3cf")),
}
# Jobs naming the files in jobs/: every resolution step at once.
FILE_JOBS = {
    "source controls": """
name: sc
kind: animate
model: tiny
defaults:
  {prompt: a cat, width: 64, height: 64, seed: random,
   controlnet: [{model: tiny-controlnet, image: source, preprocess: canny}]}
sweep: {guidance: [5, 7]}
animate: {source: assets/clip.mp4, end: 4, mode: chained, flow: dis, color_coherence: true,
          schedules: {controlnet.0.scale: "0:(0), 2:(1)"}}
""",
    "sdxl sizes, lora weights, img2img": """
name: xl
model: tiny-xl
defaults:
  prompt: a cat
  steps: 3
  loras: [{path: loras/tiny-style.safetensors, weight: 0.5}]
sweep:
  loras.0.weight: [0, 0.5, 1]
  seed: [1, random]
  width: [64, 128]
  init_image: [null, assets/house.png]
""",
}


def ids_digest(spec: JobSpec, random_base: int) -> tuple[int, str]:
    ids = [t.task_id for t in spec.tasks(random_base)]
    return len(ids), hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


@pytest.mark.parametrize("name", FROZEN_JOBS)
def test_ids_are_those_of_the_expansion_before(name: str):
    spec = parse_job(FROZEN_JOBS[name])
    assert (ids_digest(spec, 0), ids_digest(spec, 12345)) == FROZEN_IDS[name]


def example_specs() -> dict[str, JobSpec]:
    specs = {name: parse_job(text) for name, text in FROZEN_JOBS.items()}
    specs |= {name: parse_job(text, base_dir=JOBS_DIR) for name, text in FILE_JOBS.items()}
    return specs | {path.stem: load_job(path) for path in sorted(JOBS_DIR.glob("*.yaml"))}


def test_every_example_job_expands_as_before_with_the_same_ids():
    """Every job in jobs/ and the jobs above: the same tasks, in the same order, with the same ids."""
    specs = example_specs()
    assert len(specs) > len(FROZEN_JOBS) + len(FILE_JOBS) + 10  # jobs/ was found
    for name, spec in specs.items():
        for random_base in (0, 99):
            found, expected = list(spec.tasks(random_base)), reference_tasks(spec, random_base)
            assert found == expected, name
            assert [t.task_id for t in found] == [reference_id(t) for t in expected], name
            assert [t.canonical_json() for t in found] == [reference_json(t) for t in expected], name
            assert all(list(vars(t))[: len(TASK_FIELDS)] == list(TASK_FIELDS) for t in found), name


def test_a_changed_expansion_is_caught():
    """The comparison above can fail: one value or the order changed shows."""
    spec = parse_job(FROZEN_JOBS["grid"])
    expected = reference_tasks(spec)
    found = list(spec.tasks())
    assert found != expected[::-1]
    assert found != [*expected[:-1], dataclasses.replace(expected[-1], guidance=7.0)]
    assert [t.task_id for t in found] != [reference_id(t) for t in reversed(expected)]
