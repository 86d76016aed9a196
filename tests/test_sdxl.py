"""SDXL in the render core (tiny-xl): diffusers' StableDiffusionXLPipeline renders the same images from the
same inputs, clip_skip follows A1111's count on both families, every technique renders and repeats, and
what does not fit SDXL (textual inversion) is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm import conditioning, render
from farm.embeddings import load_embeddings
from farm.spec import Embedding, GuidanceLoss, MixPart, RenderTask, TokenMix
from farm.text import SDXL_TEXTUAL_INVERSION, LoadedEmbedding, PromptEncoder, PromptError

# Largest per-channel difference (out of 255) allowed between farm and diffusers for the same inputs.
# Measured on CPU float32: 0 for every case here, as both run the same kernels on the same batch.
DIFFUSERS_TOLERANCE = 1
LONG = " ".join(["dog"] * 100)


def xl_task(prompt: str = "a cute shiba inu", seed: int = 3, **kw) -> RenderTask:
    fields = {"negative_prompt": "", "steps": 4, "guidance": 5.0, "width": 64, "height": 64, "scheduler": "euler"}
    return RenderTask(model="tiny-xl", prompt=prompt, seed=seed, **(fields | kw))


def sd_task(prompt: str = "a cute shiba inu", seed: int = 3, **kw) -> RenderTask:
    fields = {"negative_prompt": "blurry", "steps": 4, "guidance": 7.5, "width": 64, "height": 64, "scheduler": "euler"}
    return RenderTask(model="tiny", prompt=prompt, seed=seed, **(fields | kw))


def rendered(components, *tasks: RenderTask, init_images=None) -> np.ndarray:
    return render.render_batch(components, list(tasks), init_images).images


def as_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' own float -> uint8 (VaeImageProcessor.numpy_to_pil)."""
    return (images * 255).round().astype(np.uint8)


def largest_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def xl_pipeline(tiny_xl_components):
    """diffusers' SDXL pipeline over the very modules farm renders with, and farm's "euler"."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    c = tiny_xl_components
    pipe = StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2,
        unet=c.unet,
        scheduler=EulerDiscreteScheduler.from_config(c.scheduler_config),
        force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipeline(tiny_components):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    c = tiny_components
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=EulerDiscreteScheduler.from_config(c.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_xl(pipe, task: RenderTask, **kw) -> np.ndarray:
    """What StableDiffusionXLPipeline renders for a task; farm's "" negative is diffusers' None."""
    images = pipe(
        task.prompt,
        negative_prompt=task.negative_prompt or None,
        num_inference_steps=task.steps,
        guidance_scale=task.guidance,
        height=task.height,
        width=task.width,
        original_size=task.original_size,
        target_size=task.target_size,
        crops_coords_top_left=task.crops_coords_top_left or (0, 0),
        generator=torch.Generator("cpu").manual_seed(task.seed),
        output_type="np",
        **kw,
    ).images
    return as_uint8(images)


# ---------------------------------------------------------------------------------------
# farm renders what diffusers renders


@pytest.mark.parametrize(
    "task",
    [
        xl_task(),
        xl_task("a robot riding a horse", seed=7, negative_prompt="blurry"),
        xl_task(original_size=(128, 96), target_size=(64, 64), crops_coords_top_left=(8, 16)),
    ],
    ids=["default", "negative-prompt", "micro-conditioning"],
)
def test_sdxl_task_renders_what_diffusers_renders(tiny_xl_components, xl_pipeline, task):
    mine = rendered(tiny_xl_components, task)
    assert largest_difference(mine, diffusers_xl(xl_pipeline, task)) <= DIFFUSERS_TOLERANCE
    assert mine.std() > 10  # an image, not a flat field that would match anything


def test_sdxl_micro_conditioning_changes_the_image(tiny_xl_components):
    plain = rendered(tiny_xl_components, xl_task())
    cropped = rendered(tiny_xl_components, xl_task(crops_coords_top_left=(8, 16)))
    assert not np.array_equal(plain, cropped)


def test_sd_batch_renders_what_diffusers_renders(tiny_components, sd_pipeline):
    """The refactor leaves SD alone: a batch of two equals StableDiffusionPipeline's batch of two."""
    tasks = [sd_task(), sd_task("a cat", seed=5)]
    mine = rendered(tiny_components, *tasks)
    images = sd_pipeline(
        [t.prompt for t in tasks],
        negative_prompt=[t.negative_prompt for t in tasks],
        num_inference_steps=4,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=[torch.Generator("cpu").manual_seed(t.seed) for t in tasks],
        output_type="np",
    ).images
    assert largest_difference(mine, as_uint8(images)) <= DIFFUSERS_TOLERANCE


# ---------------------------------------------------------------------------------------
# clip_skip: A1111's count (1 = the last layer) on both families


def test_sdxl_clip_skip_2_is_diffusers_clip_skip_1(tiny_xl_components, xl_pipeline):
    default = rendered(tiny_xl_components, xl_task())
    assert np.array_equal(rendered(tiny_xl_components, xl_task(clip_skip=1)), default)
    skipped = rendered(tiny_xl_components, xl_task(clip_skip=2))
    assert largest_difference(skipped, diffusers_xl(xl_pipeline, xl_task(), clip_skip=1)) <= DIFFUSERS_TOLERANCE
    assert not np.array_equal(skipped, default)


def sd_reference_embeds(components, text: str, diffusers_clip_skip: int) -> torch.Tensor:
    """diffusers' SD clip_skip: hidden_states[-(clip_skip + 1)] through the final layer norm, via
    transformers' own forward (diffusers 0.42's encode_prompt reaches for text_encoder.text_model,
    which transformers 5's CLIPTextModel no longer has)."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids, output_hidden_states=True).hidden_states
        return encoder.final_layer_norm(states[-(diffusers_clip_skip + 1)])


def test_sd_clip_skip_2_is_diffusers_clip_skip_1(tiny_components, sd_pipeline):
    task = sd_task(clip_skip=2)
    default = rendered(tiny_components, sd_task())
    assert np.array_equal(rendered(tiny_components, sd_task(clip_skip=1)), default)
    skipped = rendered(tiny_components, task)
    # farm reads both prompts at the same layer (A1111); diffusers' own negative would stay at the last.
    images = sd_pipeline(
        prompt_embeds=sd_reference_embeds(tiny_components, task.prompt, 1),
        negative_prompt_embeds=sd_reference_embeds(tiny_components, task.negative_prompt, 1),
        num_inference_steps=4,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(task.seed),
        output_type="np",
    ).images
    assert largest_difference(skipped, as_uint8(images)) <= DIFFUSERS_TOLERANCE
    assert not np.array_equal(skipped, default)


def layers(*encoders) -> int:
    return min(encoder.config.num_hidden_layers for encoder in encoders)


def test_clip_skip_past_the_text_encoder_fails_every_task(tiny_components, tiny_xl_components):
    # SD reads down to the embeddings' output (layers + 1 hidden states); SDXL starts one deeper.
    sd_most = layers(tiny_components.text_encoder) + 1
    xl_most = layers(tiny_xl_components.text_encoder, tiny_xl_components.text_encoder_2)
    for components, task, most in (
        (tiny_components, sd_task(clip_skip=sd_most + 1), sd_most),
        (tiny_xl_components, xl_task(clip_skip=xl_most + 1), xl_most),
    ):
        other = RenderTask(**{**task.to_dict(), "seed": 9})
        with pytest.raises(render.TaskInputError) as caught:
            render.render_batch(components, [task, other])
        message = (
            f"clip_skip: {most + 1} reads past the first layer of this model's text encoder; expected at most {most}"
        )
        assert caught.value.errors == {0: message, 1: message}
        assert rendered(components, RenderTask(**{**task.to_dict(), "clip_skip": most})).shape == (1, 64, 64, 3)


def widths(components) -> tuple[int, int]:
    """SDXL's embedding width (both encoders' hidden sizes side by side) and its pooled width."""
    first, second = components.text_encoder.config, components.text_encoder_2.config
    return first.hidden_size + second.hidden_size, second.projection_dim


# ---------------------------------------------------------------------------------------
# The conditioning object


def test_sdxl_conditioning_has_pooled_embeddings_and_time_ids(tiny_xl_components):
    tasks = [xl_task(), xl_task("a cat", negative_prompt="blurry", crops_coords_top_left=(8, 16))]
    cond = conditioning.encode_conditioning(tiny_xl_components, tasks)
    assert isinstance(cond, conditioning.XLConditioning)
    width, pooled = widths(tiny_xl_components)
    assert cond.text.shape == cond.uncond.shape == (2, 77, width)
    assert cond.pooled.shape == cond.uncond_pooled.shape == (2, pooled)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64], [64, 64, 8, 16, 64, 64]]
    # an empty negative prompt conditions as zeros (force_zeros_for_empty_prompt); "blurry" does not
    assert not cond.uncond[0].any() and not cond.uncond_pooled[0].any()
    assert cond.uncond[1].any() and cond.uncond_pooled[1].any()
    kwargs = cond.unet_kwargs(guided=True)
    assert kwargs["encoder_hidden_states"].shape == (4, 77, width)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (4, pooled)
    assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"], torch.cat([cond.time_ids] * 2))


def test_pooled_embedding_is_text_encoder_2s_projection(tiny_xl_components):
    c = tiny_xl_components
    ids = c.tokenizer_2("a cute shiba inu", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = c.text_encoder_2(ids).text_embeds
    torch.testing.assert_close(PromptEncoder(c).encode("a cute shiba inu").pooled, expected, atol=1e-5, rtol=0)


def test_long_prompts_chunk_through_both_encoders_and_pool_the_first_chunk(tiny_xl_components):
    c = tiny_xl_components
    chunked = PromptEncoder(c, long_prompt="chunk").encode(LONG)
    first = PromptEncoder(c).encode(" ".join(["dog"] * 75))
    rest = PromptEncoder(c).encode(" ".join(["dog"] * 25))
    width, _ = widths(c)
    assert chunked.embeds.shape == (1, 154, width)
    torch.testing.assert_close(chunked.embeds[:, :77], first.embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.embeds[:, 77:], rest.embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.pooled, first.pooled, atol=1e-5, rtol=0)
    truncated = PromptEncoder(c).encode(LONG)
    assert (truncated.embeds.shape, truncated.truncated) == ((1, 77, width), True)


@pytest.mark.parametrize("mode", ["sum", "slerp"])
def test_prompt_mix_mixes_embeddings_and_pooled_alike(tiny_xl_components, mode):
    c = tiny_xl_components
    alone = conditioning.encode_conditioning(c, [xl_task("a dog")])
    whole = conditioning.encode_conditioning(
        c, [xl_task(mix=(MixPart("a dog", 1.0), MixPart("a cat", 0.0)), mix_mode=mode)]
    )
    assert torch.equal(whole.text, alone.text) and torch.equal(whole.pooled, alone.pooled)
    half = conditioning.encode_conditioning(
        c, [xl_task(mix=(MixPart("a dog", 1.0), MixPart("a cat", 1.0)), mix_mode=mode)]
    )
    assert not torch.equal(half.pooled, alone.pooled)


def test_token_mix_reaches_both_encoders(tiny_xl_components):
    encoder = PromptEncoder(tiny_xl_components)
    prompt = "a portrait of a puppy"
    same = encoder.encode(prompt, [TokenMix("puppy", "skunk", 0.0)])
    assert torch.equal(same.embeds, encoder.encode(prompt).embeds)
    swapped = encoder.encode(prompt, [TokenMix("puppy", "skunk", 1.0)])
    skunk = encoder.encode(prompt.replace("puppy", "skunk"))
    torch.testing.assert_close(swapped.embeds, skunk.embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(swapped.pooled, skunk.pooled, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# Every technique renders on SDXL, and repeats exactly


def init_pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


TECHNIQUES = {
    "img2img": xl_task(init_image="init.png", strength=0.5, start_step=2),
    "variation": xl_task(variation_seed=9, variation_strength=0.3),
    "mix-sum": xl_task(mix=(MixPart("a dog", 0.5), MixPart("a cat", 0.5))),
    "mix-slerp": xl_task(mix=(MixPart("a dog", 1.0), MixPart("a cat", 1.0)), mix_mode="slerp"),
    "long-prompt-chunk": xl_task(LONG, long_prompt="chunk"),
    "token-mix": xl_task("a portrait of a puppy", token_mix=(TokenMix("puppy", "skunk", 0.5),)),
    "capture": xl_task(capture=("latents", "x0")),
    "guidance-loss": xl_task(guidance_loss=GuidanceLoss("color", (0.1, 0.5, 0.9), 200.0, 1)),
    "ancestral": xl_task(scheduler="euler_a"),
    "clip-skip": xl_task(clip_skip=2),
    "unguided": xl_task(guidance=1.0),  # the prompt's half alone, pooled embedding and time ids too
}


@pytest.mark.parametrize("name", TECHNIQUES)
def test_technique_renders_on_sdxl_and_repeats(tiny_xl_components, name):
    task = TECHNIQUES[name]
    init = [init_pixels()] if task.init_image else None
    first = render.render_batch(tiny_xl_components, [task], init)
    again = render.render_batch(tiny_xl_components, [task], init)
    assert first.images.shape == (1, 64, 64, 3)
    assert np.array_equal(first.images, again.images)
    assert first.frames.keys() == again.frames.keys()
    for kind, frames in first.frames.items():
        assert np.array_equal(frames, again.frames[kind])
    if task.capture:  # the start and every step's state; every step's prediction
        assert first.frames["latents"].shape == (task.steps + 1, 1, 64, 64, 3)
        assert first.frames["x0"].shape == (task.steps, 1, 64, 64, 3)
        assert np.array_equal(first.frames["latents"][-1], first.images)
    else:
        assert not np.array_equal(first.images, rendered(tiny_xl_components, xl_task()))


# ---------------------------------------------------------------------------------------
# Refused on SDXL


def test_textual_inversion_is_refused_on_sdxl_in_one_line(tiny_xl_components, tmp_path):
    embedding = Embedding(path=str(tmp_path / "style.safetensors"), sha256="")
    loaded = LoadedEmbedding(embedding, "<style>", torch.zeros(1, tiny_xl_components.text_encoder.config.hidden_size))
    tasks = [xl_task("a <style> dog", embeddings=(embedding,)), xl_task(seed=4, embeddings=(embedding,))]
    with pytest.raises(render.TaskInputError) as caught:
        render.render_batch(tiny_xl_components, tasks, embeddings=[loaded])
    assert caught.value.errors == {0: SDXL_TEXTUAL_INVERSION, 1: SDXL_TEXTUAL_INVERSION}
    assert SDXL_TEXTUAL_INVERSION.startswith("embeddings: ") and "SDXL" in SDXL_TEXTUAL_INVERSION
    assert "\n" not in SDXL_TEXTUAL_INVERSION
    # The actor's check: refused before the file (absent here) is read.
    with pytest.raises(PromptError) as refused:
        load_embeddings((embedding,), tiny_xl_components)
    assert str(refused.value) == SDXL_TEXTUAL_INVERSION
