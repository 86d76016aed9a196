"""Write the example jobs' input files under jobs/assets/ (committed; this script shows how they were made).

- house.png: a 128x128 "house poorly drawn by a child" (a few flat PIL shapes), the init
  image of jobs/img2img.yaml, as in the notebook's img2img section.
- tiny-token.safetensors: a diffusers-format textual-inversion file for the `tiny` model:
  one vector of size 32 (tiny's text encoder hidden size) under the token "<tiny-style>",
  drawn from torch.Generator seed 0; used by jobs/embeddings.yaml.
- clip.mp4: 24 frames at 12 fps, 128x128: the house drawing with the sun crossing the sky
  while the view pans slowly right; the source clip of jobs/animate.yaml (H.264, written
  with farm.video.write_video).

They are deterministic: running the script again writes the same pixels (and, for the two
first, the same bytes).

    .venv/bin/python scripts/make_assets.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from farm.video import write_video

ASSETS = Path(__file__).resolve().parents[1] / "jobs" / "assets"
SIZE = 128
TOKEN = "<tiny-style>"
TINY_HIDDEN_SIZE = 32


def draw_house() -> Image.Image:
    """Sky, grass, a red wall, a brown roof, a blue door, a yellow window and a sun."""
    image = Image.new("RGB", (SIZE, SIZE), (150, 200, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 96, SIZE - 1, SIZE - 1], fill=(60, 170, 60))  # grass
    draw.ellipse([94, 8, 118, 32], fill=(255, 210, 0))  # sun
    # Nothing quite straight or square, as a child would draw it.
    draw.polygon([(28, 60), (97, 55), (100, 104), (26, 102)], fill=(210, 40, 40), outline=(0, 0, 0))  # wall
    draw.polygon([(16, 63), (57, 20), (110, 57)], fill=(120, 70, 30), outline=(0, 0, 0))  # roof
    draw.polygon([(56, 80), (71, 77), (73, 103), (55, 103)], fill=(40, 60, 200), outline=(0, 0, 0))  # door
    draw.rectangle([35, 66, 50, 79], fill=(255, 240, 120), outline=(0, 0, 0))  # window
    draw.line([(42, 66), (44, 79)], fill=(0, 0, 0))
    draw.line([(35, 73), (50, 71)], fill=(0, 0, 0))
    draw.line([(80, 30), (80, 44)], fill=(90, 90, 90), width=6)  # chimney
    return image


CLIP_FRAMES = 24
CLIP_FPS = 12


def clip_frames() -> list[np.ndarray]:
    """The house with the sun moving left to right along an arc, and a slow pan to the right."""
    house = draw_house()
    frames = []
    for i in range(CLIP_FRAMES):
        t = i / (CLIP_FRAMES - 1)
        image = house.copy()
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, SIZE - 1, 40], fill=(150, 200, 255))  # the sky without the drawn sun
        x, y = 8 + t * 84, 30 - 24 * math.sin(math.pi * t)
        draw.ellipse([x, y, x + 20, y + 20], fill=(255, 210, 0))
        shift = round(t * 12)  # pixels of pan: the view moves right, the house left
        pixels = np.asarray(image)
        # The strip uncovered at the right repeats the last column (sky over grass).
        frames.append(np.pad(pixels[:, shift:], ((0, 0), (0, shift), (0, 0)), mode="edge"))
    return frames


def token_vectors() -> dict[str, torch.Tensor]:
    """diffusers' textual-inversion format: {token: vectors (n, d)}; here one vector."""
    generator = torch.Generator("cpu").manual_seed(0)
    return {TOKEN: torch.randn((1, TINY_HIDDEN_SIZE), generator=generator, dtype=torch.float32)}


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    draw_house().save(ASSETS / "house.png", format="PNG")
    save_file(token_vectors(), str(ASSETS / "tiny-token.safetensors"))
    write_video(clip_frames(), ASSETS / "clip.mp4", CLIP_FPS)
    for name in ("house.png", "tiny-token.safetensors", "clip.mp4"):
        print(ASSETS / name)


if __name__ == "__main__":
    main()
