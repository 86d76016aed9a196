"""PNG encode/decode with the task embedded, so an image carries its own recipe.

Two text chunks: ``parameters`` in the A1111 style other tools read, and ``farm`` holding
the whole task and its batch placement as JSON. Nothing run-specific (time, node) goes in,
so the same task in the same batch always encodes to the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, BinaryIO

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
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "unipc": "UniPC",
    "lcm": "LCM",
}
# Samplers whose A1111 "Automatic" schedule type is not their plain spacing (A1111 1.9+ picks Karras
# for DPM++ 2M and DPM++ SDE, Exponential for DPM++ 2M SDE): farm's automatic is written "Uniform".
A1111_AUTOMATIC_IS_NOT_UNIFORM = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde")


def a1111_schedule_type(scheduler: str, schedule_type: str) -> str:
    """A1111's "Schedule type" for farm's: Karras, Exponential, or the sampler's own spacing."""
    if schedule_type != "automatic":
        return schedule_type.capitalize()
    return "Uniform" if scheduler in A1111_AUTOMATIC_IS_NOT_UNIFORM else "Automatic"


# The most pixels an input image (an init image, an animation's source frame) may have. Inputs are
# scaled down to the task's size anyway, but Pillow decodes one whole first: a 13000x13000 PNG of
# 20 KB costs about 0.8 GB in the actor that opens it (measured), and passes Pillow's own limit
# (it refuses only past 2 x 89.5 Mpx). 8192x8192 (67 Mpx) still takes a full-frame camera's photo (up
# to 61 Mpx) and 8K video frames (33 Mpx), bounds a decode to about 200 MB
# (RGB) to 470 MB (RGBA converted to RGB), and sits under Pillow's warning threshold, so no input
# farm accepts ever triggers one. The size is read from the file's header, before any decoding.
MAX_INPUT_PIXELS = 8192 * 8192


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
    if task.get("schedule_type", "automatic") != "automatic" or task["scheduler"] in A1111_AUTOMATIC_IS_NOT_UNIFORM:
        fields.append(
            f"Schedule type: {a1111_schedule_type(task['scheduler'], task.get('schedule_type', 'automatic'))}"
        )
    if task.get("clip_skip") is not None:
        fields.append(f"Clip skip: {task['clip_skip']}")
    if meta.get("lora_hashes"):
        fields.append(f'Lora hashes: "{meta["lora_hashes"]}"')
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


def check_input_pixels(width: int, height: int) -> None:
    """ValueError when an input image of width x height has more than MAX_INPUT_PIXELS pixels."""
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{width}x{height} pixels is over {_limit()}; resize it first")


def _limit() -> str:
    side = math.isqrt(MAX_INPUT_PIXELS)
    square = f" ({side}x{side})" if side * side == MAX_INPUT_PIXELS else ""
    return f"farm's limit of {MAX_INPUT_PIXELS:,}{square}"


def _open_checked(source: BinaryIO | Path) -> Image.Image:
    """Image.open (which reads only the header) with the size checked against MAX_INPUT_PIXELS.

    Raises UnidentifiedImageError for a file that is not an image PIL knows, ValueError for one
    over the limit; nothing is decoded until the caller loads the image.
    """
    with warnings.catch_warnings():
        # Pillow warns past 89.5 Mpx as it opens; the check below refuses those itself.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as exc:  # past 2 x 89.5 Mpx Pillow gives no size, only this
            raise ValueError(
                f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels is over {_limit()}; resize it first"
            ) from exc
    try:
        check_input_pixels(*image.size)
    except ValueError:
        image.close()
        raise
    return image


def check_input_image(path: str | Path) -> None:
    """Refuse an input image file over MAX_INPUT_PIXELS from its header alone (no pixels decoded).

    A file PIL cannot identify passes: whoever decodes it reports that, for its task alone.
    ValueError for one over the limit; OSError when the file cannot be read.
    """
    try:
        _open_checked(Path(path)).close()
    except (UnidentifiedImageError, SyntaxError):
        return


def fit_image(data: bytes, width: int, height: int) -> np.ndarray:
    """An init image fitted to a task's size: scaled (Lanczos) to cover width x height with its
    aspect ratio kept, then centre-cropped; RGB uint8 (height, width, 3).

    Raises ValueError for bytes that are not an image PIL can read, or for an image over
    MAX_INPUT_PIXELS (checked from the header, before decoding).
    """
    try:
        with _open_checked(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except UnidentifiedImageError as exc:  # its message names an in-memory buffer: say it plainly
        raise ValueError("not a readable image (not a format PIL can identify)") from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc})") from exc
    if rgb.size != (width, height):
        rgb = ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(rgb, dtype=np.uint8)


# Pixels per side a safety-blurred image keeps before it is scaled back up: a 512-pixel image becomes
# an 8x8 grid of averaged colours smoothed into each other, which shows no face, body or text.
BLUR_CELLS = 8


def blur(image: np.ndarray) -> np.ndarray:
    """The image averaged down to BLUR_CELLS pixels a side and smoothly scaled back: same shape, unrecognisable."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) uint8 image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    scale = min(1.0, BLUR_CELLS / max(height, width))
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image)
    # BOX averages every source pixel into its cell (no detail survives by aliasing); BILINEAR
    # back up smooths the cells' edges, which would otherwise outline shapes.
    blurred = picture.resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(blurred, dtype=np.uint8).reshape(image.shape).copy()
