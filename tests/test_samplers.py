"""Samplers and schedule types (samplers.py) on the tiny model: every sampler with every schedule
type it takes renders and repeats, karras and exponential space the sigmas as named, the others
are one clear error, step noise is each image's own, img2img starts part way, and a job of the
newer samplers renders and reproduces through the CLI."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from farm import render, samplers
from farm.images import fit_image
from farm.manifest import read_manifest
from farm.noise import make_generator
from farm.spec import SCHEDULE_TYPES_OF, RenderTask

# Largest per-channel difference (out of 255) of an image rendered with another batch mate: the
# batch changes the kernels' rounding only (DESIGN.md, reproducibility; docs/reproducibility.md).
BATCH_TOLERANCE = 2
# Steps of the renders here: few, as the tiny model's images mean nothing, but enough that
# multistep samplers reach their higher orders and img2img can start part way.
STEPS = 4
COMBOS = [(name, kind) for name, kinds in SCHEDULE_TYPES_OF.items() for kind in kinds]
SPACED = [(name, kind) for name, kind in COMBOS if kind != "automatic"]
UNSUPPORTED = [
    (name, kind) for name, kinds in SCHEDULE_TYPES_OF.items() for kind in samplers.SCHEDULE_FLAGS if kind not in kinds
]
# The samplers that add fresh noise at every step (A1111's ancestral and SDE samplers, and LCM).
NOISY = ("euler_a", "dpmpp_2m_sde", "dpmpp_sde", "lcm")
# The samplers issue 14 part 4 added.
NEW = ("dpmpp_2m_sde", "dpmpp_sde", "unipc", "lcm")


def task(scheduler: str, seed: int = 1, prompt: str = "a cute dog", schedule_type: str = "automatic", **kw):
    """A tiny-model task at 64x64."""
    return RenderTask(
        "tiny",
        scheduler,
        prompt,
        "blurry",
        seed,
        kw.pop("steps", STEPS),
        7.5,
        64,
        64,
        schedule_type=schedule_type,
        **kw,
    )


def images(components, *tasks: RenderTask, init: list | None = None) -> np.ndarray:
    return render.render_batch(components, list(tasks), init).images


def distinct_sigmas(scheduler) -> np.ndarray:
    """The positive sigmas a scheduler steps through, each once, in order (order-2 samplers repeat them)."""
    sigmas = [float(s) for s in scheduler.sigmas if s > 0]
    return np.array([s for i, s in enumerate(sigmas) if i == 0 or s != sigmas[i - 1]])


@pytest.fixture(scope="module")
def init_pixels() -> np.ndarray:
    """A red picture with a blue square, 64x64."""
    import io

    from PIL import Image

    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 0] = 220
    pixels[16:48, 16:48, 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return fit_image(buffer.getvalue(), 64, 64)


# ---------------------------------------------------------------------------------------
# The table of schedule types


def test_the_table_is_what_diffusers_offers():
    assert set(SCHEDULE_TYPES_OF) == set(samplers.SCHEDULER_CLASSES)
    for name, (class_name, _) in samplers.SCHEDULER_CLASSES.items():
        known = inspect.signature(samplers.diffusers_class(class_name).__init__).parameters
        offered = tuple(kind for kind, flag in samplers.SCHEDULE_FLAGS.items() if flag in known)
        assert SCHEDULE_TYPES_OF[name] == ("automatic", *offered), name


def test_the_spec_refuses_what_the_table_refuses():
    from farm.spec import SCHEDULERS, SpecError, parse_job

    assert set(SCHEDULERS) == set(samplers.SCHEDULER_CLASSES)
    for name, kind in UNSUPPORTED:
        with pytest.raises(SpecError, match=f"^schedule_type: sampler {name} has no {kind} schedule type"):
            parse_job(f"scheduler: {name}\ndefaults: {{schedule_type: {kind}}}")


@pytest.mark.parametrize(("name", "kind"), UNSUPPORTED)
def test_an_unsupported_schedule_type_is_one_clear_line(tiny_components, name, kind):
    with pytest.raises(ValueError) as raised:
        samplers.build_scheduler(name, tiny_components.scheduler_config, kind)
    message = str(raised.value)
    takers = [n for n, kinds in SCHEDULE_TYPES_OF.items() if kind in kinds]
    assert message == f"sampler {name} has no {kind} schedule type; samplers with one: {', '.join(takers)}"
    assert "\n" not in message and name not in takers


def test_an_unknown_schedule_type_names_the_known_ones(tiny_components):
    with pytest.raises(ValueError, match=r"^unknown schedule type 'linear'; expected automatic, karras, exponential$"):
        samplers.build_scheduler("euler", tiny_components.scheduler_config, "linear")


def test_render_refuses_an_unsupported_schedule_type_before_denoising(tiny_components):
    calls = []
    handle = tiny_components.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="^sampler lcm has no karras schedule type"):
            images(tiny_components, task("lcm", schedule_type="karras"))
    finally:
        handle.remove()
    assert calls == []


# ---------------------------------------------------------------------------------------
# Every sampler with every schedule type it takes


@pytest.mark.parametrize(("name", "kind"), COMBOS)
def test_each_sampler_and_schedule_type_renders_and_repeats_exactly(tiny_components, name, kind):
    tasks = [task(name, 1, schedule_type=kind), task(name, 2, "a red car", schedule_type=kind)]
    result = render.render_batch(tiny_components, tasks)
    again = render.render_batch(tiny_components, tasks).images
    assert result.images.shape == (2, 64, 64, 3) and result.images.dtype == np.uint8
    assert np.array_equal(result.images, again)
    assert not np.array_equal(result.images[0], result.images[1])
    config = result.scheduler_config
    assert config["_class_name"] == samplers.SCHEDULER_CLASSES[name][0]
    for spaced, flag in samplers.SCHEDULE_FLAGS.items():
        assert config.get(flag, False) is (kind == spaced), flag


@pytest.mark.parametrize(("name", "kind"), SPACED)
def test_karras_and_exponential_space_the_sigmas_as_named(tiny_components, name, kind):
    # Karras et al. (2022), eq. 5: sigma^(1/7) falls in equal steps; exponential: log sigma does.
    warp = {"karras": lambda s: s ** (1 / 7), "exponential": np.log}[kind]
    spaced = samplers.build_scheduler(name, tiny_components.scheduler_config, kind)
    automatic = samplers.build_scheduler(name, tiny_components.scheduler_config)
    spaced.set_timesteps(10)
    automatic.set_timesteps(10)
    mine, own = distinct_sigmas(spaced), distinct_sigmas(automatic)
    assert len(mine) == len(own) == 10
    assert np.allclose(np.diff(warp(mine)), np.diff(warp(mine))[0], rtol=1e-3)
    assert not np.allclose(np.diff(warp(own)), np.diff(warp(own))[0], rtol=1e-3)


def test_a_schedule_type_overrides_the_models_own_spacing(tiny_components):
    # A model may ship use_karras_sigmas: true; diffusers refuses two spacings at once.
    config = {**tiny_components.scheduler_config, "use_karras_sigmas": True}
    exponential = samplers.build_scheduler("dpmpp_2m", config, "exponential")
    assert exponential.config.use_exponential_sigmas and not exponential.config.use_karras_sigmas
    assert samplers.build_scheduler("dpmpp_2m", config).config.use_karras_sigmas  # automatic: the model's own


# ---------------------------------------------------------------------------------------
# Step noise: each image's own


@pytest.mark.parametrize("name", NOISY)
def test_step_noise_does_not_depend_on_the_batch_mate(tiny_components, name):
    with_b = images(tiny_components, task(name, 1), task(name, 2, "a red car"))
    with_c = images(tiny_components, task(name, 1), task(name, 3, "a blue bird"))
    assert np.abs(with_b[0].astype(int) - with_c[0].astype(int)).max() <= BATCH_TOLERANCE
    assert not np.array_equal(with_b[1], with_c[1])
    assert samplers.step_kwargs(samplers.build_scheduler(name, tiny_components.scheduler_config), [])


@pytest.mark.parametrize("name", [*NOISY, "unipc", "dpmpp_2m"])
def test_step_noise_comes_from_the_images_own_generator(tiny_components, name):
    # Variation strength 1 starts from seed 3's noise while seed 1's generator draws the step
    # noise: the image differs from seed 3's exactly when the sampler draws noise as it steps.
    varied = images(tiny_components, task(name, 1, variation_seed=3, variation_strength=1.0))
    seed_3 = images(tiny_components, task(name, 3))
    assert np.array_equal(varied, seed_3) is (name not in NOISY)


def run_steps(scheduler, latents: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Every step of ``scheduler`` on made-up model outputs (a fixed function of the latents),
    each image with its own generator."""
    generators = [make_generator(s) for s in seeds]
    extra = samplers.step_kwargs(scheduler, generators)
    for t in scheduler.timesteps:
        output = torch.tanh(scheduler.scale_model_input(latents, t)) * 0.9
        latents = scheduler.step(output, t, latents, **extra).prev_sample
    return latents


@pytest.mark.parametrize("name", NOISY)
def test_the_step_gives_an_image_the_same_bits_whatever_its_batch(tiny_components, name):
    start = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    finals = []
    for mate in (1, 2):
        scheduler = samplers.build_scheduler(name, tiny_components.scheduler_config)
        scheduler.set_timesteps(STEPS)
        latents = start[[0, mate]] * float(scheduler.init_noise_sigma)
        finals.append(run_steps(scheduler, latents, [7, 7 + mate]))
    assert torch.equal(finals[0][0], finals[1][0])
    assert not torch.equal(finals[0][1], finals[1][1])


def test_dpmpp_sde_grows_its_trees_on_the_cpu_in_float32(tiny_components):
    # The noise is drawn the same way whatever the latents' device and dtype, then moved to them.
    noises = []
    for dtype in (torch.float32, torch.float64):
        scheduler = samplers.build_scheduler("dpmpp_sde", tiny_components.scheduler_config)
        scheduler.set_timesteps(STEPS)
        latents = torch.zeros(2, 4, 8, 8, dtype=dtype)
        scheduler.step(latents, scheduler.timesteps[0], latents, generator=[make_generator(1), make_generator(2)])
        noise = scheduler.noise_sampler(scheduler.sigmas[0], scheduler.sigmas[1])
        assert noise.dtype == dtype
        noises.append(noise)
    assert torch.equal(noises[0].double(), noises[1])
    assert not torch.equal(noises[0][0], noises[0][1])


# ---------------------------------------------------------------------------------------
# Which calls start and complete a step; UniPC keeps the loop's moves


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in COMBOS if n in (*NEW, "heun")])
def test_step_marks_follow_the_schedulers_own_state(tiny_components, name, kind):
    scheduler = samplers.build_scheduler(name, tiny_components.scheduler_config, kind)
    timesteps = render.prepare_timesteps(scheduler, 5, 1, "cpu")
    starts, ends = samplers.step_marks(scheduler, timesteps)
    assert sum(starts) == sum(ends) == 4
    latents = torch.zeros(1, 4, 8, 8)
    extra = samplers.step_kwargs(scheduler, [make_generator(1)])
    for i, t in enumerate(timesteps):
        # An order-2 sampler is half way through a step between its two calls; Heun's last
        # call is a whole (Euler) step that leaves it looking half way, with nothing after.
        assert starts[i] is getattr(scheduler, "state_in_first_order", True)
        latents = scheduler.step(torch.tanh(latents), t, latents, **extra).prev_sample
        last = i == len(timesteps) - 1
        assert ends[i] is (getattr(scheduler, "state_in_first_order", True) or last)


def test_unipc_without_moves_is_diffusers_own(tiny_components):
    import diffusers

    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    finals = []
    for scheduler in (
        samplers.build_scheduler("unipc", tiny_components.scheduler_config),
        diffusers.UniPCMultistepScheduler.from_config(tiny_components.scheduler_config),
    ):
        scheduler.set_timesteps(6)
        finals.append(run_steps(scheduler, start, [1]))
    assert torch.equal(finals[0], finals[1])


def test_unipc_keeps_a_move_made_between_steps(tiny_components):
    # A guidance loss moves the sample between steps. UniPC's corrector recomputes the sample
    # from the previous one; farm's adds the move back. With sample prediction the model's
    # output does not read the sample, so the corrected sample shows the move alone.
    import copy

    import diffusers

    config = {**tiny_components.scheduler_config, "prediction_type": "sample"}
    moves = []
    for scheduler in (
        samplers.build_scheduler("unipc", config),
        diffusers.UniPCMultistepScheduler.from_config(config),
    ):
        scheduler.set_timesteps(6)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps[:3]:
            latents = scheduler.step(torch.tanh(latents), t, latents).prev_sample
        t, output, other = scheduler.timesteps[3], torch.tanh(latents), copy.deepcopy(scheduler)
        scheduler.step(output, t, latents)
        other.step(output, t, latents + 0.5)
        moves.append(other.last_sample - scheduler.last_sample)
    assert torch.allclose(moves[0], torch.full_like(moves[0], 0.5), atol=1e-5)  # farm's keeps it
    assert torch.equal(moves[1], torch.zeros_like(moves[1]))  # diffusers' drops it: why farm's exists


# ---------------------------------------------------------------------------------------
# img2img: starting part way


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in COMBOS if n in NEW and k != "exponential"])
def test_img2img_starts_part_way(tiny_components, init_pixels, name, kind):
    steps = 6
    late = images(
        tiny_components,
        task(name, schedule_type=kind, steps=steps, init_image="x.png", init_image_sha256="0", start_step=5),
        init=[init_pixels],
    )
    early = images(
        tiny_components,
        task(name, schedule_type=kind, steps=steps, init_image="x.png", init_image_sha256="0", start_step=1),
        init=[init_pixels],
    )
    txt2img = images(tiny_components, task(name, schedule_type=kind, steps=steps))

    # One step from a lightly noised init image stays near it; from nearly pure noise it does not.
    def distance(pixels: np.ndarray) -> float:
        return float(np.abs(pixels[0].astype(int) - init_pixels.astype(int)).mean())

    assert distance(late) < distance(early)
    assert not np.array_equal(early, txt2img)


@pytest.mark.parametrize("name", NEW)
def test_img2img_calls_the_unet_once_per_remaining_call(tiny_components, init_pixels, name):
    calls = []
    handle = tiny_components.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        images(
            tiny_components,
            task(name, steps=6, init_image="x.png", init_image_sha256="0", start_step=2),
            init=[init_pixels],
        )
    finally:
        handle.remove()
    order = samplers.build_scheduler(name, tiny_components.scheduler_config).order
    assert len(calls) == order * 4 - (order - 1)


# ---------------------------------------------------------------------------------------
# Through the CLI

JOB = """
name: samplers
model: tiny
defaults: {prompt: a red car, negative_prompt: blurry, steps: 4, width: 64, height: 64}
zip:
  scheduler: [dpmpp_2m_sde, dpmpp_sde, unipc, lcm, dpmpp_2m_sde, dpmpp_sde]
  schedule_type: [automatic, automatic, automatic, automatic, karras, karras]
sweep:
  seed: [1, 2]
"""


@pytest.mark.slow
def test_a_job_of_the_new_samplers_renders_and_reproduces_exactly(ray_session, tmp_path):
    from click.testing import CliRunner

    from farm.cli import main

    job = tmp_path / "samplers.yaml"
    job.write_text(JOB)
    runner = CliRunner()
    out = tmp_path / "out"
    rendered = runner.invoke(main, ["render", str(job), "--out", str(out), "--batch-size", "2", "--no-progress"])
    assert rendered.exit_code == 0, rendered.output
    root = out / "samplers"
    rows = read_manifest(str(root)).to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert {(r["scheduler"], r["schedule_type"]) for r in rows} == {
        ("dpmpp_2m_sde", "automatic"),
        ("dpmpp_sde", "automatic"),
        ("unipc", "automatic"),
        ("lcm", "automatic"),
        ("dpmpp_2m_sde", "karras"),
        ("dpmpp_sde", "karras"),
    }
    for row in rows:
        assert ('"use_karras_sigmas": true' in row["scheduler_config"]) is (row["schedule_type"] == "karras")
    for batch in sorted({r["batch_id"] for r in rows}):
        first = next(r for r in rows if r["batch_id"] == batch)
        again = runner.invoke(main, ["reproduce", str(root), first["task_id"], "--diff-dir", str(tmp_path)])
        assert again.exit_code == 0 and f"{first['task_id']}: identical" in again.output, again.output
