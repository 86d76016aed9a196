"""ControlNets (farm.controlnets, farm.conditioning.Control): scale 0 and an empty step window as the
image without the ControlNet bit for bit, per-task scales within one batch, two units summed, one load
per model, SD 1.x and SDXL, and one-line refusals (another family, pickles, not a ControlNet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.conditioning import ControlUnit
from farm.controlnets import (
    CONTROLNET_CACHES,
    ControlNetCache,
    ControlNetError,
    load_controlnets,
    resolve_controlnet,
)
from farm.presets import controlnet_from_unet
from farm.render import render_batch
from farm.spec import ControlNetUnit, RenderTask

SIZE = 64
STEPS = 4
# The zero convolutions get weights from this seed (presets.controlnet_from_unet).
ZERO_CONV_SEED = 1234


def tiny_controlnet(unet, folder: Path, safe: bool = True) -> Path:
    """A ControlNet built from a UNet as the tiny-controlnet preset is (presets.controlnet_from_unet:
    its zero convolutions randomised, or no test on it could fail), saved with save_pretrained."""
    controlnet_from_unet(unet, ZERO_CONV_SEED).save_pretrained(folder, safe_serialization=safe)
    return folder


@pytest.fixture(scope="session")
def sd_controlnet(tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_controlnet(tiny_components.unet, tmp_path_factory.mktemp("controlnet") / "sd")


@pytest.fixture(scope="session")
def xl_controlnet(tiny_xl_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_controlnet(tiny_xl_components.unet, tmp_path_factory.mktemp("controlnet") / "xl")


def control_image(seed: int) -> np.ndarray:
    """A control image: blocks of colour, as an edge or depth map is mostly flat."""
    blocks = np.random.default_rng(seed).integers(0, 256, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)
    return blocks.repeat(16, axis=0).repeat(16, axis=1)


def task(model: str, *units: ControlNetUnit, seed: int = 1) -> RenderTask:
    return RenderTask(model, "euler", "a cute shiba inu", "", seed, STEPS, 7.5, SIZE, SIZE, controlnet=units)


def unit(path: Path | str, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> ControlNetUnit:
    return ControlNetUnit(model=str(path), image="x.png", image_sha256="0" * 64, scale=scale, start=start, end=end)


def render(components, tasks: list[RenderTask], images: list[list[np.ndarray]] | None = None) -> np.ndarray:
    """Images of a batch, its ControlNets loaded as an actor loads them."""
    controlnets = load_controlnets(components, tasks[0].controlnet_models)
    images = images if images is not None else [[control_image(7)] * len(t.controlnet) for t in tasks]
    return render_batch(components, tasks, controlnets=controlnets, control_images=images).images


@pytest.fixture(scope="session")
def plain(tiny_components) -> np.ndarray:
    """The image without a ControlNet."""
    return render_batch(tiny_components, [task("tiny")]).images[0]


def test_scale_zero_is_the_image_without_controlnet(tiny_components, sd_controlnet, plain):
    assert np.array_equal(render(tiny_components, [task("tiny", unit(sd_controlnet, 0.0))])[0], plain)


def test_scale_one_changes_the_image(tiny_components, sd_controlnet, plain):
    image = render(tiny_components, [task("tiny", unit(sd_controlnet, 1.0))])[0]
    assert np.abs(image.astype(int) - plain).max() > 10


def test_control_image_steers(tiny_components, sd_controlnet):
    one = task("tiny", unit(sd_controlnet))
    first = render(tiny_components, [one], [[control_image(7)]])[0]
    second = render(tiny_components, [one], [[control_image(8)]])[0]
    assert np.abs(first.astype(int) - second).max() > 10


def test_step_window(tiny_components, sd_controlnet, plain):
    # end 0: acts on no step, so the ControlNet never runs.
    assert np.array_equal(render(tiny_components, [task("tiny", unit(sd_controlnet, end=0.0))])[0], plain)
    full = render(tiny_components, [task("tiny", unit(sd_controlnet))])[0]
    late = render(tiny_components, [task("tiny", unit(sd_controlnet, start=0.5))])[0]
    assert not np.array_equal(late, plain) and not np.array_equal(late, full)


def test_window_is_diffusers_controlnet_keep():
    """Each task's weight at each UNet call: diffusers' keep = 1 - (i / n < start or (i + 1) / n > end)."""
    control = ControlUnit(None, torch.zeros(3, 3, 8, 8), (1.0, 0.5, 2.0), (0.0, 0.25, 0.0), (1.0, 1.0, 0.5))
    weights = [control.weights(i, 4) for i in range(4)]
    assert weights == [[1.0, 0.0, 2.0], [1.0, 0.5, 2.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]


def test_per_task_scales_in_one_batch(tiny_components, sd_controlnet):
    scales = (0.0, 1.5, 0.5)
    tasks = [task("tiny", unit(sd_controlnet, s), seed=3) for s in scales]
    batch = render(tiny_components, tasks)
    alone = [render(tiny_components, [t])[0] for t in tasks]
    for image, single in zip(batch, alone, strict=True):
        # Another batch size moves a few floats (DESIGN.md, "Reproducibility"): +-1 in a few pixels.
        assert np.abs(image.astype(int) - single).max() <= 2
    assert np.abs(alone[1].astype(int) - alone[2]).max() > 10  # the scales do differ in effect


def test_two_units_sum(tiny_components, sd_controlnet, tmp_path):
    other = tiny_controlnet(tiny_components.unet, tmp_path / "other")
    both = task("tiny", unit(sd_controlnet), unit(other))
    first_only = task("tiny", unit(sd_controlnet), unit(other, 0.0))
    image = render(tiny_components, [both], [[control_image(7), control_image(8)]])[0]
    single = render(tiny_components, [first_only], [[control_image(7), control_image(8)]])[0]
    reference = render(tiny_components, [task("tiny", unit(sd_controlnet))], [[control_image(7)]])[0]
    assert np.array_equal(single, reference)
    assert np.abs(image.astype(int) - single).max() > 10


def test_single_safetensors_file(tiny_components, sd_controlnet):
    """A folder's weights file alone loads through from_single_file (its config.json beside it)."""
    weights = sd_controlnet / "diffusion_pytorch_model.safetensors"
    assert resolve_controlnet(str(weights)).kind == "single_file"
    image = render(tiny_components, [task("tiny", unit(weights))])[0]
    assert np.array_equal(image, render(tiny_components, [task("tiny", unit(sd_controlnet))])[0])


def test_loaded_once_per_model(tiny_components, sd_controlnet, tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    loads: list[str] = []
    original = ControlNetModel.from_pretrained.__func__

    def counted(cls, path, **kwargs):
        loads.append(path)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(ControlNetModel, "from_pretrained", classmethod(counted))
    CONTROLNET_CACHES.pop(tiny_components.unet, None)
    first = load_controlnets(tiny_components, [str(sd_controlnet)])
    again = load_controlnets(tiny_components, [str(sd_controlnet)])
    assert len(loads) == 1 and first[0] is again[0]
    assert not first[0].training and not any(p.requires_grad for p in first[0].parameters())
    # Past the kept count, the least recently used goes; the batch's own never do.
    cache = CONTROLNET_CACHES[tiny_components.unet] = ControlNetCache(kept=1)
    other = tiny_controlnet(tiny_components.unet, tmp_path / "other")
    both = cache.get(tiny_components, [str(sd_controlnet), str(other)])
    assert len(cache.loaded) == 2 and len(loads) == 3
    cache.get(tiny_components, [str(other)])
    assert list(cache.loaded) == [f"folder:{other.resolve()}"] and len(loads) == 3
    assert both[1] is cache.loaded[f"folder:{other.resolve()}"]
    CONTROLNET_CACHES.pop(tiny_components.unet, None)


def test_sdxl_controlnet(tiny_xl_components, xl_controlnet):
    plain = render_batch(tiny_xl_components, [task("tiny-xl")]).images[0]
    off = render(tiny_xl_components, [task("tiny-xl", unit(xl_controlnet, 0.0))])[0]
    on = render(tiny_xl_components, [task("tiny-xl", unit(xl_controlnet))])[0]
    assert np.array_equal(off, plain)
    assert np.abs(on.astype(int) - plain).max() > 10


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_other_family_refused(family, tiny_components, tiny_xl_components, sd_controlnet, xl_controlnet):
    components, controlnet = (tiny_components, xl_controlnet) if family == "sd" else (tiny_xl_components, sd_controlnet)
    with pytest.raises(ControlNetError) as caught:
        load_controlnets(components, [str(controlnet)])
    message = str(caught.value)
    assert "\n" not in message and str(controlnet) in message and "another model" in message


def test_pickle_refused(tiny_components, tmp_path):
    folder = tiny_controlnet(tiny_components.unet, tmp_path / "pickled", safe=False)
    for ref in (folder, folder / "diffusion_pytorch_model.bin"):
        with pytest.raises(ControlNetError, match="pickle") as caught:
            load_controlnets(tiny_components, [str(ref)])
        assert "\n" not in str(caught.value) and str(ref) in str(caught.value)
    # Allowed, the same folder loads (torch.load with weights_only, as diffusers reads .bin).
    assert load_controlnets(tiny_components, [str(folder)], allow_pickle=True)
    CONTROLNET_CACHES.pop(tiny_components.unet, None)


def test_preset(tiny_components, plain):
    """tiny-controlnet, built from tiny's UNet, fits tiny and steers it."""
    assert resolve_controlnet("tiny-controlnet").kind == "folder"
    image = render(tiny_components, [task("tiny", unit("tiny-controlnet"))])[0]
    assert not np.array_equal(image, plain)
    CONTROLNET_CACHES.pop(tiny_components.unet, None)


def test_not_a_controlnet(tiny_path, tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    for ref, words in ((str(folder), "not a ControlNetModel"), (str(tiny_path), "no readable config.json")):
        with pytest.raises(ControlNetError, match=words):
            resolve_controlnet(ref)
    with pytest.raises(ControlNetError, match="not a preset"):
        resolve_controlnet(str(tmp_path / "missing"))
