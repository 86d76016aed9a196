"""The render core without Ray: schedulers, noise, batching, prompt caching, tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm import render
from farm.noise import initial_noise, make_generator, prepare_latents
from farm.spec import SCHEDULERS, RenderTask

# Largest per-channel difference (out of 255) between an image rendered in its batch and
# rendered alone, for the non-DDIM schedulers; README "Reproducibility" gives the measurements.
ALONE_TOLERANCE = 2


def task(prompt: str = "a cute shiba inu", seed: int = 1, scheduler: str = "euler", **kw) -> RenderTask:
    fields = {"negative_prompt": "blurry", "steps": 6, "guidance": 7.5, "width": 64, "height": 64} | kw
    return RenderTask(model="tiny", scheduler=scheduler, prompt=prompt, seed=seed, **fields)


def test_every_spec_scheduler_has_a_class():
    assert set(render.SCHEDULER_CLASSES) == set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_renders_and_repeats_exactly(tiny_components, name):
    tasks = [task(seed=1, scheduler=name), task("a cat", seed=2, scheduler=name)]
    first, config = render.render_batch(tiny_components, tasks)
    again, _ = render.render_batch(tiny_components, tasks)
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert config["_class_name"] == render.SCHEDULER_CLASSES[name][0]
    assert not np.array_equal(first[0], first[1])


def test_noise_depends_only_on_the_seed():
    alone = initial_noise(make_generator(42), 64, 64)
    batch = prepare_latents([make_generator(7), make_generator(42)], 64, 64, "cpu", torch.float32)
    assert alone.shape == (4, 8, 8)
    assert torch.equal(batch[1], alone)
    assert not torch.equal(batch[0], alone)


def test_latents_keep_the_real_geometry(tiny_components):
    # 4 channels at 1/8 of the image size: what a real SD 1.x VAE gives
    latents = prepare_latents([make_generator(0)], 96, 64, "cpu", torch.float32)
    assert latents.shape == (1, 4, 8, 12)
    images = render.decode_latents(tiny_components, latents)
    assert images.shape == (1, 64, 96, 3)


def test_chunked_decode_equals_whole_decode(tiny_components):
    latents = prepare_latents([make_generator(s) for s in range(5)], 64, 64, "cpu", torch.float32)
    whole = render.decode_latents(tiny_components, latents, chunk=5)
    chunked = render.decode_latents(tiny_components, latents, chunk=2)
    assert np.abs(whole.astype(int) - chunked.astype(int)).max() <= ALONE_TOLERANCE


def test_each_distinct_prompt_is_encoded_once(tiny_components, monkeypatch):
    seen: list[list[str]] = []
    tokenizer = tiny_components.tokenizer

    class Recording:
        model_max_length = tokenizer.model_max_length

        def __call__(self, prompts, **kwargs):
            seen.append(list(prompts))
            return tokenizer(prompts, **kwargs)

    monkeypatch.setattr(tiny_components, "tokenizer", Recording())
    embeds = render.encode_prompts(tiny_components, ["a cat", "a dog", "a cat", "", ""])
    assert seen == [["a cat", "a dog", ""]]
    assert embeds.shape[0] == 5
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])


def test_mixed_batch_is_refused(tiny_components):
    with pytest.raises(ValueError, match="differ"):
        render.render_batch(tiny_components, [task(steps=4), task(steps=5)])


@pytest.mark.parametrize("scheduler", ["euler", "pndm"])
def test_task_alone_stays_within_tolerance_of_its_batch(tiny_components, scheduler):
    tasks = [task(p, s, scheduler, steps=20) for p in ["a cute shiba inu", "a cat", "x"] for s in (1, 2)]
    batch, _ = render.render_batch(tiny_components, tasks)
    for i in (0, 3, 5):
        alone, _ = render.render_batch(tiny_components, tasks[i : i + 1])
        assert np.abs(alone[0].astype(int) - batch[i].astype(int)).max() <= ALONE_TOLERANCE


def test_guidance_and_negative_prompt_change_the_image(tiny_components):
    base, _ = render.render_batch(tiny_components, [task()])
    other_guidance, _ = render.render_batch(tiny_components, [task(guidance=2.0)])
    other_negative, _ = render.render_batch(tiny_components, [task(negative_prompt="")])
    assert not np.array_equal(base, other_guidance)
    assert not np.array_equal(base, other_negative)


@pytest.mark.gpu
def test_cuda_fp16_renders_repeatably():
    from farm.models import load_components, resolve_model

    components = load_components(resolve_model("tiny"), "cuda", "float16")
    tasks = [task(seed=s, steps=10) for s in range(4)]
    first, _ = render.render_batch(components, tasks)
    again, _ = render.render_batch(components, tasks)
    assert np.array_equal(first, again)
    alone, _ = render.render_batch(components, tasks[2:3])
    assert np.abs(alone[0].astype(int) - first[2].astype(int)).max() <= 8
