"""PNG encode/decode with the task embedded, so an image carries its own recipe.

Two text chunks: ``parameters`` in the A1111 style other tools read, and ``farm`` holding
the whole task and its batch placement as JSON. Nothing run-specific (time, node) goes in,
so the same task in the same batch always encodes to the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

FARM_CHUNK = "farm"
A1111_CHUNK = "parameters"
# Scheduler names as A1111 writes them in its "Sampler:" field.
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
}


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text for a task's metadata."""
    task = meta["task"]
    lines = [task["prompt"]]
    if task["negative_prompt"]:
        lines.append(f"Negative prompt: {task['negative_prompt']}")
    fields = [
        f"Steps: {task['steps']}",
        f"Sampler: {A1111_SAMPLERS.get(task['scheduler'], task['scheduler'])}",
        f"CFG scale: {task['guidance']:g}",
        f"Seed: {task['seed']}",
        f"Size: {task['width']}x{task['height']}",
        f"Model hash: {meta.get('model_hash', '')[:10]}",
        f"Model: {task['model']}",
    ]
    if task.get("variation_seed") is not None:
        strength = task.get("variation_strength", 0.0)
        fields += [f"Variation seed: {task['variation_seed']}", f"Variation seed strength: {strength:g}"]
    if task.get("strength") is not None:
        fields.append(f"Denoising strength: {task['strength']:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_png(pixels: np.ndarray, meta: dict[str, Any]) -> bytes:
    """uint8 RGB pixels + metadata -> PNG bytes."""
    info = PngInfo()
    info.add_text(A1111_CHUNK, a1111_parameters(meta))
    info.add_text(FARM_CHUNK, json.dumps(meta, sort_keys=True, ensure_ascii=False))
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict[str, Any]:
    """The ``farm`` JSON chunk of a PNG written by ``encode_png``."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.text.get(FARM_CHUNK)  # type: ignore[attr-defined]
    if text is None:
        raise ValueError("PNG has no farm metadata chunk")
    return json.loads(text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_rgb(data: bytes) -> Image.Image:
    """Image file bytes (a PNG farm wrote) as an RGB picture, decoded now (the bytes can go)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def decode_rgb(data: bytes) -> np.ndarray:
    """Image file bytes (a PNG farm wrote) as RGB uint8 (height, width, 3)."""
    return np.asarray(open_rgb(data))


def fit_image(data: bytes, width: int, height: int) -> np.ndarray:
    """An init image fitted to a task's size: scaled (Lanczos) to cover width x height with its
    aspect ratio kept, then centre-cropped; RGB uint8 (height, width, 3).

    Raises ValueError for bytes that are not an image PIL can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except UnidentifiedImageError as exc:  # its message names an in-memory buffer: say it plainly
        raise ValueError("not a readable image (not a format PIL can identify)") from exc
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc})") from exc
    if rgb.size != (width, height):
        rgb = ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(rgb, dtype=np.uint8)
