"""The render core without Ray: schedulers, noise, batching, prompt caching, tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm import render, samplers
from farm.noise import initial_noise, make_generator
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
    return torch.stack([initial_noise(make_generator(s), width, height) for s in seeds])


def test_noise_depends_only_on_the_seed(tiny_components):
    alone = initial_noise(make_generator(42), 64, 64)
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
    cond = render.encode_conditioning(tiny_components, tasks)
    # "", "a dog", "a puppy", "blurry" (the empty prompt pads chunks): one prompt per call
    assert calls == [1, 1, 1, 1]
    assert cond.text.shape == (3, 77, 32)
    assert torch.equal(cond.text[0], cond.text[2]) and not torch.equal(cond.text[0], cond.text[1])
    # the next batch of the same model reuses them: a grid's prompts are encoded once per actor
    again = render.encode_conditioning(tiny_components, tasks[::-1])
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
