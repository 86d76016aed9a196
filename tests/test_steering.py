"""The steering techniques in the render core, without Ray: variations, img2img, prompt
mixing, token mixing, guidance losses, step capture and long prompts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from farm import render, samplers
from farm.images import fit_image
from farm.noise import initial_noise, latent_shape, make_generator, perturb, slerp, task_noise
from farm.spec import SCHEDULERS, Batch, Embedding, GuidanceLoss, MixPart, RenderTask, TokenMix
from farm.text import LoadedEmbedding

BLUE = GuidanceLoss(name="color", target=(None, None, 0.9), scale=2000.0, every=1)


def task(prompt: str = "a cute dog", seed: int = 1, scheduler: str = "euler", **kw) -> RenderTask:
    fields = {"negative_prompt": "blurry", "steps": 6, "guidance": 7.5, "width": 64, "height": 64} | kw
    return RenderTask(model="tiny", scheduler=scheduler, prompt=prompt, seed=seed, **fields)


def images(components, *tasks: RenderTask, init: list | None = None) -> np.ndarray:
    return render.render_batch(components, list(tasks), init).images


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def init_pixels() -> np.ndarray:
    """An 80x100 picture: red with a blue square, fitted to 64x64."""
    pixels = np.zeros((80, 100, 3), np.uint8)
    pixels[..., 0] = 220
    pixels[20:60, 30:70, 2] = 255
    return fit_image(png_bytes(pixels), 64, 64)


# ---------------------------------------------------------------------------------------
# Variations and perturbations


def test_slerp_ends_are_exact_and_the_middle_keeps_the_norm():
    a, b = (initial_noise(make_generator(seed), latent_shape(64, 64)) for seed in (1, 2))
    assert torch.equal(slerp(0.0, a, b), a) and torch.equal(slerp(1.0, a, b), b)
    middle = slerp(0.5, a, b)
    assert not torch.equal(middle, a) and not torch.equal(middle, b)
    # independent gaussians are near-orthogonal, so slerp keeps the norm (a lerp would shrink it ~30%)
    assert abs(middle.norm() / a.norm() - 1) < 0.05


def test_perturbation_keeps_unit_variance_and_scale_zero_is_the_base():
    a, b = (initial_noise(make_generator(seed), latent_shape(64, 64)) for seed in (1, 2))
    assert torch.equal(perturb(a, b, 0.0), a)
    mixed = perturb(a, b, 1.0)
    assert torch.allclose(mixed, (a + b) / 2**0.5)
    assert abs(float(mixed.std()) - float(a.std())) < 0.2


def test_variation_noise_leaves_the_seed_generator_where_plain_rendering_does():
    plain, varied = make_generator(5), make_generator(5)
    task_noise(plain, latent_shape(64, 64))
    task_noise(varied, latent_shape(64, 64), variation_seed=9, variation_strength=0.3)
    assert torch.equal(torch.randn(4, generator=plain), torch.randn(4, generator=varied))


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_variation_strength_zero_and_one_are_exact(tiny_components, scheduler):
    base = images(tiny_components, task(seed=1, scheduler=scheduler))
    other = images(tiny_components, task(seed=2, scheduler=scheduler))
    at_zero = images(tiny_components, task(seed=1, scheduler=scheduler, variation_seed=2, variation_strength=0.0))
    at_one = images(tiny_components, task(seed=1, scheduler=scheduler, variation_seed=2, variation_strength=1.0))
    halfway = images(tiny_components, task(seed=1, scheduler=scheduler, variation_seed=2, variation_strength=0.5))
    assert np.array_equal(at_zero, base)
    assert np.array_equal(at_one, other)
    assert not np.array_equal(halfway, base) and not np.array_equal(halfway, other)


def test_small_perturbations_move_the_image_less(tiny_components):
    base = images(tiny_components, task()).astype(int)
    small = images(tiny_components, task(variation_seed=7, perturb_scale=0.001)).astype(int)
    large = images(tiny_components, task(variation_seed=7, perturb_scale=0.4)).astype(int)
    assert np.abs(small - base).mean() < np.abs(large - base).mean()
    assert np.abs(large - base).mean() > 0


# ---------------------------------------------------------------------------------------
# img2img


def test_init_image_is_scaled_to_cover_and_centre_cropped():
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:, :25] = 255  # the left quarter is white
    fitted = fit_image(png_bytes(wide), 64, 64)
    assert fitted.shape == (64, 64, 3) and fitted.dtype == np.uint8
    # scaled to 128x64 then the middle 64 columns kept: the white quarter is cropped away
    assert fitted[:, :8].mean() < 10


def test_unreadable_init_image_is_a_value_error():
    with pytest.raises(ValueError, match=r"not a readable image \(not a format PIL can identify\)$"):
        fit_image(b"not a png", 64, 64)


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "heun", "dpmpp_2m"])
def test_start_step_is_strength_in_other_words(tiny_components, init_pixels, scheduler):
    by_strength = task(scheduler=scheduler, init_image="x.png", init_image_sha256="0", strength=0.5, start_step=3)
    by_start = task(scheduler=scheduler, init_image="x.png", init_image_sha256="0", start_step=3)
    a = images(tiny_components, by_strength, init=[init_pixels])
    b = images(tiny_components, by_start, init=[init_pixels])
    assert np.array_equal(a, b)


def test_strength_sets_how_many_steps_run(tiny_components, init_pixels, monkeypatch):
    calls = []
    unet = tiny_components.unet
    handle = unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        img2img = task(steps=10, init_image="x.png", init_image_sha256="0", strength=0.3, start_step=7)
        images(tiny_components, img2img, init=[init_pixels])
    finally:
        handle.remove()
    assert len(calls) == 3  # int(10 x 0.3) steps, as diffusers runs


def test_init_image_shapes_the_result(tiny_components, init_pixels):
    img2img = task(init_image="x.png", init_image_sha256="0", strength=0.5, start_step=3)
    from_init = images(tiny_components, img2img, init=[init_pixels])
    from_other = images(tiny_components, img2img, init=[255 - init_pixels])
    plain = images(tiny_components, task())
    assert not np.array_equal(from_init, from_other)
    assert not np.array_equal(from_init, plain)


def test_img2img_and_txt2img_share_a_batch(tiny_components, init_pixels):
    img2img = task(seed=3, init_image="x.png", init_image_sha256="0", strength=1.0, start_step=0)
    together = images(tiny_components, task(seed=1), img2img, init=[None, init_pixels])
    alone = images(tiny_components, img2img, init=[init_pixels])
    assert np.abs(together[1].astype(int) - alone[0].astype(int)).max() <= 2


# ---------------------------------------------------------------------------------------
# Prompt mixing


@pytest.mark.parametrize("mode", ["sum", "slerp"])
def test_weight_one_on_a_prompt_is_that_prompt(tiny_components, mode):
    plain = images(tiny_components, task("a cute dog"))
    mix = (MixPart("a cute dog", 1.0), MixPart("a puppy with a skunk", 0.0))
    mixed = images(tiny_components, task("", mix=mix, mix_mode=mode))
    assert np.array_equal(mixed, plain)


def test_a_single_weight_one_prompt_is_that_prompt(tiny_components):
    plain = images(tiny_components, task("a cute dog"))
    assert np.array_equal(images(tiny_components, task("", mix=(MixPart("a cute dog", 1.0),))), plain)


def test_an_even_mix_is_neither_prompt(tiny_components):
    a, b = images(tiny_components, task("a cute dog")), images(tiny_components, task("a skunk"))
    mix = (MixPart("a cute dog", 0.5), MixPart("a skunk", 0.5))
    mixed = images(tiny_components, task("", mix=mix))
    assert not np.array_equal(mixed, a) and not np.array_equal(mixed, b)


def test_token_mix_weight_zero_is_the_plain_prompt(tiny_components):
    plain = images(tiny_components, task("a puppy"))
    unmixed = images(tiny_components, task("a puppy", token_mix=(TokenMix("puppy", "skunk", 0.0),)))
    mixed = images(tiny_components, task("a puppy", token_mix=(TokenMix("puppy", "skunk", 0.5),)))
    assert np.array_equal(unmixed, plain)
    assert not np.array_equal(mixed, plain)


def test_a_bad_prompt_input_fails_only_its_task(tiny_components):
    good, bad = task("a puppy", seed=1), task("a dog", seed=2, token_mix=(TokenMix("puppy", "skunk", 0.5),))
    with pytest.raises(render.TaskInputError) as caught:
        render.render_batch(tiny_components, [good, bad])
    assert list(caught.value.errors) == [1]
    assert "token_mix.token: 'puppy' does not occur in the prompt" in caught.value.errors[1]


def test_an_embedding_the_model_cannot_use_fails_every_task_of_the_batch(tiny_components):
    big = LoadedEmbedding(Embedding(path="sd15.safetensors", sha256=""), "<big>", torch.zeros(1, 768))
    tasks = [task(embeddings=(big.embedding,)), task(seed=2, embeddings=(big.embedding,))]
    with pytest.raises(render.TaskInputError) as caught:
        render.render_batch(tiny_components, tasks, embeddings=[big])
    assert sorted(caught.value.errors) == [0, 1]
    assert caught.value.errors[0].startswith("embeddings[0]: sd15.safetensors holds vectors of size 768")


def test_the_render_core_takes_the_batchs_embeddings_as_vectors(tiny_components):
    """Its files are read by farm.embeddings; a batch given no (or other) vectors is a caller's mistake."""
    style = Embedding(path="style.safetensors", sha256="")
    with pytest.raises(ValueError, match="^embeddings: the loaded vectors"):
        render.render_batch(tiny_components, [task(embeddings=(style,))])


def test_a_missing_embedding_file_fails_every_task_of_the_batch(tiny_path, tmp_path):
    """The actor reads the files (no Ray here): one it cannot read fails each task with its message."""
    from farm.actor import BatchRenderer

    gone = Embedding(path=str(tmp_path / "gone.safetensors"), sha256="0")
    batch = Batch.of([task(embeddings=(gone,), steps=2), task(seed=2, embeddings=(gone,), steps=2)])
    threads = torch.get_num_threads()
    try:
        rows = BatchRenderer("gone", str(tmp_path / "out"), "tiny", "float32", threads=1).render(batch)
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert rows[0]["error"] == rows[1]["error"]
    assert rows[0]["error"].startswith(f"embeddings[0]: {gone.path}: cannot read (No such file")


# ---------------------------------------------------------------------------------------
# Guidance losses


def test_blue_loss_makes_the_image_bluer(tiny_components):
    plain = images(tiny_components, task(steps=10))
    blue = images(tiny_components, task(steps=10, guidance_loss=BLUE))
    assert blue[..., 2].mean() > plain[..., 2].mean() + 3


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_blue_loss_works_with_alpha_schedulers(tiny_components, scheduler):
    plain = images(tiny_components, task(steps=10, scheduler=scheduler))
    blue = images(tiny_components, task(steps=10, scheduler=scheduler, guidance_loss=BLUE))
    assert blue[..., 2].mean() > plain[..., 2].mean() + 3


def test_loss_every_n_steps_applies_fewer_gradient_steps(tiny_components):
    plain = images(tiny_components, task(steps=10)).astype(int)
    every = GuidanceLoss(name="color", target=(None, None, 0.9), scale=2000.0, every=5)
    sparse = images(tiny_components, task(steps=10, guidance_loss=every)).astype(int)
    dense = images(tiny_components, task(steps=10, guidance_loss=BLUE)).astype(int)
    assert 0 < np.abs(sparse - plain).mean() < np.abs(dense - plain).mean()


def test_custom_loss_by_module_and_function(tiny_components):
    dark = GuidanceLoss(name="farm.losses:brightness_loss", target=(0.0,), scale=5000.0, every=1)
    plain = images(tiny_components, task(steps=10))
    darker = images(tiny_components, task(steps=10, guidance_loss=dark))
    assert darker.mean() < plain.mean()


def test_a_loss_that_cannot_be_imported_fails_the_batch_before_denoising(tiny_components):
    missing = GuidanceLoss(name="no_such_module:loss")
    with pytest.raises(render.TaskInputError, match="cannot import no_such_module"):
        render.render_batch(tiny_components, [task(guidance_loss=missing)])


def test_loss_gradient_of_an_image_does_not_depend_on_its_batch(tiny_components):
    alone = images(tiny_components, task(seed=4, guidance_loss=BLUE))
    batched = images(tiny_components, task(seed=3, guidance_loss=BLUE), task(seed=4, guidance_loss=BLUE))
    assert np.abs(alone[0].astype(int) - batched[1].astype(int)).max() <= 2


# ---------------------------------------------------------------------------------------
# Step capture


@pytest.mark.parametrize("scheduler", ["euler", "heun", "pndm", "dpmpp_2m"])
def test_capture_gives_a_frame_per_step(tiny_components, scheduler):
    both = ("latents", "x0")
    result = render.render_batch(
        tiny_components, [task(scheduler=scheduler, capture=both), task(seed=2, scheduler=scheduler, capture=both)]
    )
    assert result.frames["latents"].shape == (7, 2, 64, 64, 3)  # steps + 1: the start, then every step
    assert result.frames["x0"].shape == (6, 2, 64, 64, 3)
    plain = render.render_batch(tiny_components, [task(scheduler=scheduler), task(seed=2, scheduler=scheduler)])
    assert np.array_equal(result.images, plain.images)  # capturing does not change the image


def test_capture_of_img2img_counts_the_steps_that_run(tiny_components, init_pixels):
    img2img = task(init_image="x.png", init_image_sha256="0", strength=0.5, start_step=3, capture=("latents",))
    result = render.render_batch(tiny_components, [img2img], [init_pixels])
    assert result.frames["latents"].shape[0] == 4


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_strength_zero_runs_no_step_and_captures_the_start_only(tiny_components, init_pixels, scheduler):
    both = ("latents", "x0")
    nothing_left = task(
        scheduler=scheduler, init_image="x.png", init_image_sha256="0", strength=0.0, start_step=6, capture=both
    )
    calls = []
    handle = tiny_components.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = render.render_batch(tiny_components, [nothing_left], [init_pixels])
    finally:
        handle.remove()
    assert calls == []
    assert result.frames["latents"].shape[0] == 1 and result.frames["x0"].shape[0] == 0


def test_pndm_first_step_is_two_calls():
    # PLMS's second call corrects the first from the same sample and ignores the sample it is
    # given: a capture or a guidance step there would be lost, so both count it with call 0.
    from farm.presets import build_tiny_pipeline

    scheduler = samplers.build_scheduler("pndm", dict(build_tiny_pipeline().scheduler.config))
    timesteps = render.prepare_timesteps(scheduler, 6, 0, "cpu")
    starts, ends = samplers.step_marks(scheduler, timesteps)
    assert len(timesteps) == 7
    assert starts == [True, False, True, True, True, True, True]
    assert ends == [False, True, True, True, True, True, True]


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "lms"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_matches_the_scheduler(tiny_components, scheduler, prediction):
    config = {**tiny_components.scheduler_config, "prediction_type": prediction}
    built = samplers.build_scheduler(scheduler, config)
    timesteps = render.prepare_timesteps(built, 10, 0, "cpu")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator) * float(built.init_noise_sigma)
    output = torch.randn(1, 4, 8, 8, generator=generator)
    built.scale_model_input(latents, timesteps[0])  # LMS insists on it before step
    mine = render.predicted_x0(built, latents, output, timesteps[0])
    theirs = built.step(output, timesteps[0], latents).pred_original_sample
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_last_latents_frame_is_the_image(tiny_components):
    result = render.render_batch(tiny_components, [task(capture=("latents",))])
    assert np.abs(result.frames["latents"][-1, 0].astype(int) - result.images[0].astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------
# Long prompts

LONG = " ".join(["a cute dog with a puppy and a skunk"] * 12)  # ~100 tokens


def test_long_prompt_truncation_is_reported(tiny_components):
    result = render.render_batch(tiny_components, [task(LONG), task("a dog", seed=2)])
    assert result.prompt_truncated == [True, False]
    assert result.prompt_tokens[0] > 75 and result.prompt_tokens[1] == 2


def test_chunked_long_prompt_sees_the_tokens_past_75(tiny_components):
    head = LONG.split(" ")
    truncated = images(tiny_components, task(LONG, long_prompt="chunk"))
    changed_tail = images(tiny_components, task(" ".join(head[:-2] + ["snow", "snow"]), long_prompt="chunk"))
    assert not np.array_equal(truncated, changed_tail)
    cut = images(tiny_components, task(LONG))
    cut_changed = images(tiny_components, task(" ".join(head[:-2] + ["snow", "snow"])))
    assert np.array_equal(cut, cut_changed)  # truncation drops the tail: the change is invisible
    result = render.render_batch(tiny_components, [task(LONG, long_prompt="chunk"), task(seed=2, long_prompt="chunk")])
    assert result.prompt_truncated == [False, False]
