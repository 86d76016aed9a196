"""The render cases whose bytes ``tests/render_golden.json`` pins, and their digests.

``python tests/render_cases.py`` renders every case on the ``tiny`` preset on the CPU and writes
the golden file; the golden data was written by the code of commit bfadff0, before the render
core decoded to uint8 on the device and moved host syncs out of the denoising loop (issue 16).
``tests/test_render_bytes.py`` renders them again and asserts the same digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from farm import render
from farm.images import fit_image
from farm.spec import SCHEDULE_TYPES_OF, SCHEDULERS, GuidanceLoss, RenderTask

GOLDEN = Path(__file__).with_name("render_golden.json")
GOLDEN_COMMIT = "bfadff0"
BLUE = GuidanceLoss(name="color", target=(None, None, 0.9), scale=2000.0, every=1)
# One of each kind of sampler: DDPM-table (ddim, pndm), sigma (lms, euler, heun), ancestral
# (euler_a), SDE (dpmpp_2m_sde, dpmpp_sde), multistep (unipc) and LCM's noisy consistency steps.
KINDS = ("ddim", "pndm", "lms", "euler_a", "heun", "dpmpp_2m_sde", "dpmpp_sde", "unipc", "lcm")
NOISY = ("euler_a", "dpmpp_2m_sde", "dpmpp_sde", "lcm")


def task(seed: int = 1, scheduler: str = "euler", prompt: str = "a cute shiba inu", **kw: Any) -> RenderTask:
    """A 64x64 tiny task of 6 steps at guidance 7.5, as tests/test_render.py builds them."""
    fields = {"negative_prompt": "blurry", "steps": 6, "guidance": 7.5, "width": 64, "height": 64} | kw
    return RenderTask(model="tiny", scheduler=scheduler, prompt=prompt, seed=seed, **fields)


def init_pixels() -> np.ndarray:
    """An 80x100 picture (red with a blue square) fitted to 64x64, as tests/test_steering.py's."""
    import io

    from PIL import Image

    pixels = np.zeros((80, 100, 3), np.uint8)
    pixels[..., 0] = 220
    pixels[20:60, 30:70, 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return fit_image(buffer.getvalue(), 64, 64)


Case = tuple[list[RenderTask], list[bool]]  # the batch, and which of its tasks get the init image


def img2img(seed: int, scheduler: str, **kw: Any) -> RenderTask:
    """An img2img task at strength 0.5 of 6 steps (it starts at step 3)."""
    fields = {"strength": 0.5, "start_step": 3} | kw
    return task(seed, scheduler, init_image="x.png", init_image_sha256="0", **fields)


def cases() -> dict[str, Case]:
    """Every pinned case by name: each sampler and schedule type, batches, no CFG, img2img,
    variations, step capture and a guidance loss."""
    out: dict[str, Case] = {}
    for name in SCHEDULERS:
        for kind in SCHEDULE_TYPES_OF[name]:
            label = name if kind == "automatic" else f"{name}-{kind}"
            out[label] = ([task(1, name, schedule_type=kind), task(2, name, "a cat", schedule_type=kind)], [False] * 2)
    for name in KINDS:
        out[f"batch3-{name}"] = ([task(s, name, p) for s, p in ((11, "a dog"), (12, "a cat"), (13, "x"))], [False] * 3)
        out[f"nocfg-{name}"] = ([task(4, name, guidance=1.0), task(5, name, "a cat", guidance=1.0)], [False] * 2)
        out[f"img2img-{name}"] = ([img2img(3, name), img2img(4, name, prompt="a cat")], [True, True])
        full = {"strength": 1.0, "start_step": 0}
        out[f"img2img-full-{name}"] = ([img2img(3, name, **full), task(4, name, "a cat")], [True, False])
        variation = {"variation_seed": 9, "variation_strength": 0.3}
        varied = [task(1, name, **variation), task(2, name, perturb_scale=0.5, variation_seed=8)]
        out[f"variation-{name}"] = (varied, [False, False])
        both = ("latents", "x0")
        out[f"capture-{name}"] = ([task(1, name, capture=both), task(2, name, "a cat", capture=both)], [False] * 2)
        out[f"capture-img2img-{name}"] = ([img2img(6, name, capture=both)], [True])
        guided = [task(1, name, guidance_loss=BLUE), task(2, name, "a cat", guidance_loss=BLUE)]
        out[f"loss-{name}"] = (guided, [False] * 2)
    for name in ("ddim", "euler"):
        out[f"loss-capture-{name}"] = ([task(7, name, guidance_loss=BLUE, capture=("latents", "x0"))], [False])
    out["default"] = ([task()], [False])
    return out


def digest(array: np.ndarray | torch.Tensor) -> str:
    """sha256 over an array's dtype, shape and bytes."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    array = np.ascontiguousarray(array)
    head = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()


def render_case(components: Any, case: Case, pixels: np.ndarray) -> dict[str, str]:
    """Render one case; the digests of its final latents (``denoise``'s result), images and frames."""
    tasks, has_init = case
    finals: list[torch.Tensor] = []
    real: Callable[..., torch.Tensor] = render.denoise

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        finals.append(real(*args, **kwargs))
        return finals[-1]

    render.denoise = recording
    try:
        result = render.render_batch(components, tasks, [pixels if i else None for i in has_init])
    finally:
        render.denoise = real
    (latents,) = finals
    out = {"latents": digest(latents), "latents_dtype": str(latents.dtype), "images": digest(result.images)}
    for kind, frames in sorted(result.frames.items()):
        out[f"frames.{kind}"] = digest(frames)
        out.update({f"frames.{kind}.{f}": digest(frame) for f, frame in enumerate(frames)})
    return out


def environment(components: Any) -> dict[str, str]:
    """What the bytes depend on besides the code: the libraries and the tiny model's weights."""
    import diffusers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model_hash": components.model_hash,
        "threads": str(torch.get_num_threads()),
    }


def tiny_components() -> Any:
    """The tiny preset on the CPU in float32, built into ``FARM_HOME``."""
    from farm.models import load_components, resolve_model
    from farm.presets import ensure_tiny

    ensure_tiny()
    return load_components(resolve_model("tiny"), "cpu", "float32")


def main() -> None:
    """Write the golden file from the code as it is now."""
    os.environ.setdefault("FARM_HOME", tempfile.mkdtemp(prefix="farm_home_"))
    components = tiny_components()
    pixels = init_pixels()
    digests = {}
    for name, case in cases().items():
        digests[name] = render_case(components, case, pixels)
        print(name, file=sys.stderr)
    golden = {"commit": GOLDEN_COMMIT, "environment": environment(components), "cases": digests}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
