"""The render core without Ray: schedulers, noise, batching, prompt caching, tolerance."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from farm import conditioning, render, samplers
from farm.models import Components
from farm.noise import initial_noise, latent_shape, make_generator
from farm.spec import SCHEDULERS, RenderTask

# Largest per-channel difference (out of 255) between an image rendered in its batch and
# rendered alone, for the non-DDIM schedulers; docs/reproducibility.md gives the measurements.
ALONE_TOLERANCE = 2


def task(prompt: str = "a cute shiba inu", seed: int = 1, scheduler: str = "euler", **kw) -> RenderTask:
    fields = {"negative_prompt": "blurry", "steps": 6, "guidance": 7.5, "width": 64, "height": 64} | kw
    return RenderTask(model="tiny", scheduler=scheduler, prompt=prompt, seed=seed, **fields)


def test_every_spec_scheduler_has_a_class():
    assert set(samplers.SCHEDULER_CLASSES) == set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_renders_and_repeats_exactly(tiny_components, name):
    tasks = [task(seed=1, scheduler=name), task("a cat", seed=2, scheduler=name)]
    result = render.render_batch(tiny_components, tasks)
    first, config = result.images, result.scheduler_config
    again = render.render_batch(tiny_components, tasks).images
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert config["_class_name"] == samplers.SCHEDULER_CLASSES[name][0]
    assert not np.array_equal(first[0], first[1])


def noise_batch(seeds: list[int], width: int, height: int) -> torch.Tensor:
    return torch.stack([initial_noise(make_generator(s), latent_shape(width, height)) for s in seeds])


def test_noise_depends_only_on_the_seed(tiny_components):
    alone = initial_noise(make_generator(42), latent_shape(64, 64))
    tasks = [task(seed=7), task(seed=42)]
    scheduler = samplers.build_scheduler("ddim", tiny_components.scheduler_config)  # init_noise_sigma 1
    timesteps = render.prepare_timesteps(scheduler, 6, 0, "cpu")
    generators = [make_generator(t.seed) for t in tasks]
    batch = render.prepare_latents(tiny_components, scheduler, timesteps, tasks, generators, [None, None])
    assert alone.shape == (4, 8, 8)
    assert torch.equal(batch[1], alone)
    assert not torch.equal(batch[0], alone)


def test_latents_keep_the_real_geometry(tiny_components):
    # 4 channels at 1/8 of the image size: what a real SD 1.x VAE gives
    latents = noise_batch([0], 96, 64)
    assert latents.shape == (1, 4, 8, 12)
    images = render.decode_latents(tiny_components, latents)
    assert images.shape == (1, 64, 96, 3)


def test_chunked_decode_equals_whole_decode(tiny_components):
    latents = noise_batch(list(range(5)), 64, 64)
    whole = render.decode_latents(tiny_components, latents, chunk=5)
    chunked = render.decode_latents(tiny_components, latents, chunk=2)
    assert np.abs(whole.astype(int) - chunked.astype(int)).max() <= ALONE_TOLERANCE


def test_each_distinct_prompt_is_encoded_once_and_alone(tiny_components, monkeypatch):
    from farm import text

    calls: list[int] = []
    real = text.run_text_transformer

    def recording(encoder, token_embeds):
        calls.append(token_embeds.shape[0])
        return real(encoder, token_embeds)

    monkeypatch.setattr(text, "run_text_transformer", recording)
    monkeypatch.setattr(tiny_components, "encoders", {})  # no prompt cached by earlier tests
    tasks = [task("a dog", 1), task("a puppy", 2), task("a dog", 3, negative_prompt="")]
    cond = conditioning.encode_conditioning(tiny_components, tasks)
    # "", "a dog", "a puppy", "blurry" (the empty prompt pads chunks): one prompt per call
    assert calls == [1, 1, 1, 1]
    assert cond.text.shape == (3, 77, 32)
    assert torch.equal(cond.text[0], cond.text[2]) and not torch.equal(cond.text[0], cond.text[1])
    # the next batch of the same model reuses them: a grid's prompts are encoded once per actor
    again = conditioning.encode_conditioning(tiny_components, tasks[::-1])
    assert calls == [1, 1, 1, 1]
    assert torch.equal(again.text[2], cond.text[0])


def test_mixed_batch_is_refused(tiny_components):
    with pytest.raises(ValueError, match="differ"):
        render.render_batch(tiny_components, [task(steps=4), task(steps=5)])


@pytest.mark.parametrize("scheduler", ["euler", "pndm", "ddim"])
def test_task_alone_stays_within_tolerance_of_its_batch(tiny_components, scheduler):
    tasks = [task(p, s, scheduler, steps=20) for p in ["a cute shiba inu", "a cat", "x"] for s in (1, 2)]
    batch = render.render_batch(tiny_components, tasks).images
    for i in (0, 3, 5):
        alone = render.render_batch(tiny_components, tasks[i : i + 1]).images
        assert np.abs(alone[0].astype(int) - batch[i].astype(int)).max() <= ALONE_TOLERANCE


def test_guidance_and_negative_prompt_change_the_image(tiny_components):
    base = render.render_batch(tiny_components, [task()]).images
    other_guidance = render.render_batch(tiny_components, [task(guidance=2.0)]).images
    other_negative = render.render_batch(tiny_components, [task(negative_prompt="")]).images
    assert not np.array_equal(base, other_guidance)
    assert not np.array_equal(base, other_negative)


@pytest.mark.gpu
def test_cuda_fp16_renders_repeatably():
    from farm.models import load_components, resolve_model

    components = load_components(resolve_model("tiny"), "cuda", "float16")
    tasks = [task(seed=s, steps=10) for s in range(4)]
    first = render.render_batch(components, tasks).images
    again = render.render_batch(components, tasks).images
    assert np.array_equal(first, again)
    alone = render.render_batch(components, tasks[2:3]).images
    assert np.abs(alone[0].astype(int) - first[2].astype(int)).max() <= 8


# ---------------------------------------------------------------------------------------
# Step callbacks, encoder keys, geometry


class Recording(render.StepCallback):
    """Records when it is called; ``scale`` moves the latents at every prediction."""

    def __init__(self, scale: float = 1.0) -> None:
        self.events: list[tuple[str, int]] = []
        self.scale = scale

    def begin(self, state: render.StepState) -> None:
        self.events.append(("begin", state.step))

    def predicted(self, state: render.StepState) -> torch.Tensor:
        self.events.append(("predicted", state.step))
        return state.latents if self.scale == 1.0 else state.latents * self.scale

    def stepped(self, state: render.StepState) -> None:
        self.events.append(("stepped", state.step))


def denoised(components, one: RenderTask, callbacks) -> tuple[torch.Tensor, int]:
    """The final latents of one task through ``render.denoise``, and the UNet calls it made."""
    cond = conditioning.encode_conditioning(components, [one])
    scheduler = samplers.build_scheduler(one.scheduler, components.scheduler_config)
    timesteps = render.prepare_timesteps(scheduler, one.steps, 0, "cpu")
    generators = [make_generator(one.seed)]
    latents = render.prepare_latents(components, scheduler, timesteps, [one], generators, [None])
    out = render.denoise(components, scheduler, timesteps, latents, cond, one.guidance, generators, callbacks)
    return out, len(timesteps)


def test_callbacks_run_once_per_sampler_step(tiny_components):
    recording = Recording()
    _, calls = denoised(tiny_components, task(scheduler="heun", steps=3), [recording])
    assert calls == 5  # Heun: 2N - 1 UNet calls for N steps
    steps = [event for s in range(3) for event in (("predicted", s), ("stepped", s))]
    assert recording.events == [("begin", -1), *steps]


def test_a_callback_moves_the_latents_and_a_passive_one_changes_nothing(tiny_components):
    one = task(steps=3)
    plain, _ = denoised(tiny_components, one, [])
    passive, _ = denoised(tiny_components, one, [Recording()])
    moved, _ = denoised(tiny_components, one, [Recording(scale=0.5)])
    assert torch.equal(passive, plain)
    assert not torch.allclose(moved, plain)


def test_prompt_encoders_are_kept_per_clip_layer_and_lora_set(tiny_components, monkeypatch):
    monkeypatch.setattr(tiny_components, "encoders", {})
    base = conditioning.prompt_encoder(tiny_components, (), "truncate")
    assert conditioning.prompt_encoder(tiny_components, (), "truncate") is base
    skipped = conditioning.prompt_encoder(tiny_components, (), "truncate", clip_skip=2)
    monkeypatch.setattr(tiny_components, "lora_key", (("0" * 64, 1.0),))
    adapted = conditioning.prompt_encoder(tiny_components, (), "truncate")
    assert len({id(base), id(skipped), id(adapted)}) == 3


def test_noise_shape_comes_from_the_model(tiny_components):
    """The UNet's latent channels and the VAE's downsampling, as diffusers' pipelines read them."""
    assert (tiny_components.latent_channels, tiny_components.vae_scale_factor) == (4, 8)
    other = Components(
        tokenizer=None,
        text_encoder=None,
        unet=SimpleNamespace(config=SimpleNamespace(in_channels=16), dtype=torch.float32),
        vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 8, 8))),
        scheduler_config={},
        device="cpu",
        dtype="float32",
        model_hash="",
    )
    scheduler = samplers.build_scheduler("ddim", tiny_components.scheduler_config)
    timesteps = render.prepare_timesteps(scheduler, 6, 0, "cpu")
    one = task(width=96, height=64)
    latents = render.prepare_latents(other, scheduler, timesteps, [one], [make_generator(1)], [None])
    assert latents.shape == (1, 16, 16, 24)
    assert torch.equal(latents[0], initial_noise(make_generator(1), (16, 16, 24)))


def test_sdxl_vae_in_float16_decodes_in_float32(tiny_components):
    """As diffusers' SDXL pipeline upcasts a force_upcast VAE; SD's pipeline never does."""
    half = copy.deepcopy(tiny_components.vae).half()
    assert half.config.force_upcast
    xl, sd = SimpleNamespace(family="sdxl", vae=half), SimpleNamespace(family="sd1", vae=half)
    with render.vae_precision(xl) as dtype:
        assert dtype == half.dtype == torch.float32
    assert half.dtype == torch.float16
    with render.vae_precision(sd) as dtype:
        assert dtype == half.dtype == torch.float16
    latents = noise_batch([0], 64, 64)
    upcast = SimpleNamespace(family="sd1", vae=copy.deepcopy(half).float())
    assert np.array_equal(render.decode_latents(xl, latents), render.decode_latents(upcast, latents))
    assert half.dtype == torch.float16
