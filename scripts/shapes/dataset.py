"""A synthetic captioned dataset for the `shapes` preset: one flat shape on a flat background, drawn on the fly.

Every image holds one shape (circle, square, triangle; star, ring and heart on request) in a named
colour, of a named size (small, medium, large), at a named position (a 3x3 grid: top left ... bottom
right, centre), on a background of another named colour. Its caption always names the shape and its
colour and sometimes leaves out the size, the background or the position, so any subset of them is
a prompt the model knows::

    a small red circle on a blue background, top left
    an orange triangle on a white background
    a large green square, centre
    a purple star

Drawn with OpenCV at ``SUPERSAMPLE`` times the size and shrunk with area averaging, so edges are
anti-aliased. Colours, positions and sizes carry a little jitter so the model learns the names, not
single pixel values. Nothing is stored: image ``index`` of seed ``seed`` is ``sample_at(seed, index)``,
the same on every machine (numpy's PCG64 from a SeedSequence of both, OpenCV's deterministic raster).
No torch here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

RESOLUTIONS = (64, 128)
# The named colours, sRGB. Chosen far apart in CIE Lab (the closest pair, red and orange, is ~44 apart;
# blue and purple ~50), so a colour's name is never in doubt; the checker names a colour by the
# nearest of these in Lab.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (35, 160, 60),
    "blue": (20, 110, 235),
    "purple": (150, 30, 150),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Every colour can be a background; a shape never has its background's colour, nor one too close to it.
BACKGROUNDS = tuple(COLOURS)
# The least CIE76 distance (Lab) between a shape's colour and its background's, before jitter.
MIN_CONTRAST = 30.0
SHAPES = ("circle", "square", "triangle", "star", "ring", "heart")
# What the preset is trained on unless told otherwise: the three, which its quality bar is about.
DEFAULT_SHAPES = ("circle", "square", "triangle")
# A shape's "radius" (half its extent) as a fraction of the image side.
SIZES = {"small": 0.11, "medium": 0.16, "large": 0.22}
# Centres on a 3x3 grid, as fractions of the side (x, y); a large shape at a corner still clears the edge.
POSITIONS = {
    "top left": (0.28, 0.28),
    "top": (0.5, 0.28),
    "top right": (0.72, 0.28),
    "left": (0.28, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.72, 0.5),
    "bottom left": (0.28, 0.72),
    "bottom": (0.5, 0.72),
    "bottom right": (0.72, 0.72),
}
COLOUR_JITTER = 10  # each RGB channel +- this many levels, shape and background independently
POSITION_JITTER = 0.03  # of the side, in x and y
SIZE_JITTER = 0.08  # the radius is scaled by 1 +- this
# How often a caption names each optional attribute (shape and colour are always named).
KEEP = {"size": 0.6, "background": 0.75, "position": 0.6}
SUPERSAMPLE = 4
SHIFT = 4  # OpenCV's fractional bits for coordinates: 1/16 of a (supersampled) pixel
# Every word a caption can hold, for a tokenizer that should know them as whole words.
WORDS = tuple(
    dict.fromkeys(
        ["a", "an", "on", "background"]
        + list(COLOURS)
        + list(SHAPES)
        + list(SIZES)
        + [word for position in POSITIONS for word in position.split()]
    )
)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIE Lab float32 (..., 3): L in 0..100, a and b about -128..127."""
    array = np.asarray(rgb, dtype=np.float32).reshape(-1, 1, 3) / 255.0
    return cv2.cvtColor(array, cv2.COLOR_RGB2Lab).reshape(np.shape(rgb))


COLOUR_NAMES = tuple(COLOURS)
PALETTE_LAB = to_lab(np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.uint8))


def contrast(a: str, b: str) -> float:
    """CIE76 distance in Lab between two named colours."""
    return float(np.linalg.norm(PALETTE_LAB[COLOUR_NAMES.index(a)] - PALETTE_LAB[COLOUR_NAMES.index(b)]))


# For each shape colour, the backgrounds it may sit on.
ALLOWED_BACKGROUNDS = {
    colour: tuple(b for b in BACKGROUNDS if b != colour and contrast(colour, b) >= MIN_CONTRAST) for colour in COLOURS
}


# Held out of training: about this fraction of the (shape, colour, background) triples, picked by a hash
# of their names, so the quality benchmark can ask for combinations the model never saw (while it saw
# each pair of them in other combinations).
HOLDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout", "all")


def held_out(shape: str, colour: str, background: str) -> bool:
    """Is this triple kept out of the training split? Stable across machines and Python versions."""
    digest = hashlib.sha256(f"{shape}|{colour}|{background}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HOLDOUT_FRACTION


def triples(shapes: Sequence[str], split: str) -> list[tuple[str, str, str]]:
    """The (shape, colour, background) combinations of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    everything = [(s, c, b) for s in shapes for c in COLOUR_NAMES for b in ALLOWED_BACKGROUNDS[c]]
    if split == "all":
        return everything
    return [t for t in everything if held_out(*t) == (split == "heldout")]


@dataclass(frozen=True)
class Attributes:
    """What an image shows, and which of it its caption names."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    centre: tuple[float, float]  # (x, y) in pixels of the output image
    radius: float  # in pixels of the output image
    rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    named: tuple[str, ...]  # the optional attributes the caption names: of "size", "background", "position"

    def as_dict(self) -> dict:
        return asdict(self)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    shape: str, colour: str, size: str | None = None, background: str | None = None, position: str | None = None
) -> str:
    """The caption (and prompt) grammar: "a [size] colour shape [on a background background][, position]"."""
    words = [w for w in (size, colour, shape) if w]
    text = f"{article(words[0])} {' '.join(words)}"
    if background:
        text += f" on {article(background)} {background} background"
    if position:
        text += f", {position}"
    return text


def attributes_caption(attributes: Attributes) -> str:
    named = attributes.named
    return caption(
        attributes.shape,
        attributes.colour,
        attributes.size if "size" in named else None,
        attributes.background if "background" in named else None,
        attributes.position if "position" in named else None,
    )


def recaption(attributes: Attributes, rng: np.random.Generator) -> str:
    """A fresh caption for drawn attributes: which optional attributes it names drawn anew (as ``KEEP`` says),
    so a trainer that keeps a pool of images still sees each with many captions."""
    keep = rng.random(3)
    named = tuple(k for k, u in zip(("size", "background", "position"), keep, strict=True) if u < KEEP[k])
    return attributes_caption(replace(attributes, named=named))


def jitter_colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[name], dtype=np.int64)
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def draw_attributes(
    rng: np.random.Generator, shapes: Sequence[str] = DEFAULT_SHAPES, resolution: int = 64, split: str = "train"
) -> Attributes:
    """Draw one image's attributes (always in the same order of draws, so a seed fixes them)."""
    if split == "heldout":
        candidates = triples(shapes, split)
        if not candidates:
            raise ValueError(f"no held-out combinations among shapes {list(shapes)}")
        # A shape first, then one of its held-out combinations: every shape is asked for as often.
        having = sorted({t[0] for t in candidates}, key=list(shapes).index)
        shape = having[int(rng.integers(len(having)))]
        mine = [t for t in candidates if t[0] == shape]
        shape, colour, background = mine[int(rng.integers(len(mine)))]
    else:
        while True:  # shape, then colour, then a background that differs from it, until the split has it
            shape = shapes[int(rng.integers(len(shapes)))]
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            allowed = ALLOWED_BACKGROUNDS[colour]
            background = allowed[int(rng.integers(len(allowed)))]
            if split == "all" or not held_out(shape, colour, background):
                break
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    rgb = jitter_colour(rng, colour)
    background_rgb = jitter_colour(rng, background)
    fx, fy = POSITIONS[position]
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    keep = rng.random(3)
    named = tuple(k for k, u in zip(("size", "background", "position"), keep, strict=True) if u < KEEP[k])
    return Attributes(
        shape=shape,
        colour=colour,
        background=background,
        size=size,
        position=position,
        centre=(float((fx + dx) * resolution), float((fy + dy) * resolution)),
        radius=float(SIZES[size] * scale * resolution),
        rgb=rgb,
        background_rgb=background_rgb,
        named=named,
    )


def outline(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """A polygon shape's outline (n, 2) float: x, y in the units of cx, cy, r."""
    if shape == "square":
        h = 0.85 * r
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if shape == "triangle":
        # Equilateral, point up, its bounding box centred on (cx, cy): width ~2r, height ~1.7r.
        big = 1.15 * r
        angles = np.deg2rad([-90, 30, 150])
        points = np.stack([cx + big * np.cos(angles), cy + big * np.sin(angles) + big / 4], axis=1)
        return points
    if shape == "star":
        big, small = 1.1 * r, 0.45 * 1.1 * r
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, big, small)
        offset = big * (1 - math.cos(math.radians(36))) / 2  # centre the bounding box vertically
        return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles) + offset], axis=1)
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        k = 1.05 * r / 16
        return np.stack([cx + k * x, cy + k * (y + 2.5)], axis=1)
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(attributes: Attributes, resolution: int) -> np.ndarray:
    """The image (resolution, resolution, 3) uint8 RGB that ``attributes`` describe, anti-aliased."""
    big = resolution * SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.uint8)
    canvas[:] = attributes.background_rgb
    unit = SUPERSAMPLE * (1 << SHIFT)  # output pixels -> fixed-point supersampled pixels

    def fixed(value: float) -> int:
        return int(round(value * unit))

    cx, cy = attributes.centre
    r = attributes.radius
    # Pixel centres sit at +0.5: output pixel (i, j) covers [i, i+1); a supersampled pixel's centre is
    # at (k + 0.5) / SUPERSAMPLE, so shift by half a supersampled pixel.
    half = 0.5 / SUPERSAMPLE
    colour = tuple(int(c) for c in attributes.rgb)
    if attributes.shape in ("circle", "ring"):
        centre = (fixed(cx - half), fixed(cy - half))
        cv2.circle(canvas, centre, fixed(r), colour, -1, cv2.LINE_AA, SHIFT)
        if attributes.shape == "ring":
            hole = tuple(int(c) for c in attributes.background_rgb)
            cv2.circle(canvas, centre, fixed(0.55 * r), hole, -1, cv2.LINE_AA, SHIFT)
    else:
        points = outline(attributes.shape, cx - half, cy - half, r)
        fixed_points = np.round(points * unit).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(canvas, [fixed_points], colour, cv2.LINE_AA, SHIFT)
    return cv2.resize(canvas, (resolution, resolution), interpolation=cv2.INTER_AREA)


def sample(
    rng: np.random.Generator, resolution: int = 64, shapes: Sequence[str] = DEFAULT_SHAPES, split: str = "train"
) -> tuple[np.ndarray, str, Attributes]:
    """One image (resolution, resolution, 3) uint8 RGB, its caption and its attributes; ``split``: "train"
    (no held-out combination, what the trainer sees), "heldout" (only those) or "all"."""
    if resolution < 16:
        raise ValueError(f"resolution: expected at least 16, got {resolution}")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ValueError(f"shapes: expected some of {', '.join(SHAPES)}, got {list(shapes)}")
    attributes = draw_attributes(rng, shapes, resolution, split)
    return render(attributes, resolution), attributes_caption(attributes), attributes


def sample_at(
    seed: int, index: int, resolution: int = 64, shapes: Sequence[str] = DEFAULT_SHAPES, split: str = "train"
) -> tuple[np.ndarray, str, Attributes]:
    """Image ``index`` of the dataset of ``seed``: its own generator, so any image is drawn without the others."""
    return sample(np.random.default_rng([seed, index]), resolution, shapes, split)


def batch_at(
    seed: int,
    start: int,
    count: int,
    resolution: int = 64,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    split: str = "train",
) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """Images ``start .. start + count - 1``: (count, H, W, 3) uint8, their captions and attributes."""
    drawn = [sample_at(seed, index, resolution, shapes, split) for index in range(start, start + count)]
    return np.stack([d[0] for d in drawn]), [d[1] for d in drawn], [d[2] for d in drawn]


def batches(
    seed: int,
    batch_size: int,
    resolution: int = 64,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    first_batch: int = 0,
    split: str = "train",
) -> Iterator[tuple[np.ndarray, list[str], list[Attributes]]]:
    """Batch b, b+1, ... forever from ``first_batch``: batch b is images b*batch_size .. (b+1)*batch_size - 1,
    so a resumed run sees exactly the batches it would have seen."""
    b = first_batch
    while True:
        yield batch_at(seed, b * batch_size, batch_size, resolution, shapes, split)
        b += 1


def main() -> None:
    """Write a contact sheet of a seed's first images (8 a row) and print their captions: a look at the data."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="a .png path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    args = parser.parse_args()
    images, captions, _ = batch_at(args.seed, 0, args.count, args.resolution, args.shapes.split(","))
    columns = 8
    rows = -(-args.count // columns)
    side = args.resolution + 4
    sheet = np.full((rows * side, columns * side, 3), 255, dtype=np.uint8)
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        y, x = (i // columns) * side, (i % columns) * side
        sheet[y : y + args.resolution, x : x + args.resolution] = image
        print(f"row {i // columns} column {i % columns}: {text}")
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
