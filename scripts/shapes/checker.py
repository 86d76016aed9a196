"""An OpenCV checker for the `shapes` preset: does an image show what its prompt says? No learned model.

Given an RGB uint8 image and the prompt's attributes (shape and colour always; background, size and
position where the prompt names them), ``check`` reads the image and returns what it found and a
pass/fail per attribute:

- **background**: each pixel of the outer border ring votes for its nearest named colour in CIE Lab;
  the winner is the background (and the median Lab of its voters the reference for the next steps).
- **the shape**: pixels far from the background in Lab (CIE76 distance) form the foreground; the
  largest connected piece of it is the shape. The threshold is half way between the background and
  the shape's own colour (so an anti-aliased or blurry edge is cut at its middle), and the distance
  map is upsampled 4x before it, so a small shape's outline is measured to a fraction of a pixel.
- **colour**: the median Lab of the shape's core (its pixels at least 3/4 of the way to its own
  colour) -> the nearest named colour other than the background's: the dominant non-background hue.
- **shape**: from the outline: circularity 4*pi*A/P^2, the corner count of ``approxPolyDP`` at 4% of
  the perimeter, solidity (area / convex hull area) and holes (a ring). See ``classify``.
- **size** and **position**: the piece's equivalent radius against the dataset's size fractions and
  its bounding-box centre against the 3x3 grid (nearest of each).

Run as a script to measure it on the dataset's own images: ``python scripts/shapes/checker.py``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make `scripts.shapes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.shapes.dataset import COLOUR_NAMES, PALETTE_LAB, POSITIONS, SHAPES, SIZES, outline, to_lab  # noqa: E402

BORDER = 2  # pixels of the outer ring that vote for the background (at 64x64; scaled with the side)
UPSAMPLE = 4
# A foreground must differ from the background by at least this much (Lab), or there is no shape.
MIN_FOREGROUND_DELTA = 15.0
# ... and cover at least this fraction of the image (a small shape at 64x64 covers ~3%).
MIN_AREA_FRACTION = 0.004
ATTRIBUTES = ("background", "colour", "shape", "size", "position")
# Below this solidity (area / convex hull area) a piece is no circle, square, triangle or heart (the
# dataset's own, even blurred, are above 0.9).
IRREGULAR_SOLIDITY = 0.86


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


# Each shape's outline area (holes filled) when the dataset draws it at radius 1.
AREA_AT_UNIT_RADIUS = {
    shape: math.pi if shape in ("circle", "ring") else polygon_area(outline(shape, 0.0, 0.0, 1.0)) for shape in SHAPES
}


@dataclass
class Reading:
    """What the checker read from one image; ``None`` where it found no shape."""

    background: str
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    features: dict[str, float] = field(default_factory=dict)


def nearest_colours(lab: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Index into COLOUR_NAMES of the nearest named colour (Lab, CIE76) of each row of ``lab`` (n, 3)."""
    distances = np.linalg.norm(lab[:, None, :] - PALETTE_LAB[None, :, :], axis=-1)
    if exclude is not None:
        distances[:, COLOUR_NAMES.index(exclude)] = np.inf
    return distances.argmin(axis=1)


def border_pixels(lab: np.ndarray) -> np.ndarray:
    width = max(1, round(BORDER * lab.shape[0] / 64))
    mask = np.ones(lab.shape[:2], dtype=bool)
    mask[width:-width, width:-width] = False
    return lab[mask]


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected piece of a boolean mask, as uint8 0/255, or None when the mask is empty."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return np.where(labels == biggest, 255, 0).astype(np.uint8)


def shape_features(piece: np.ndarray) -> dict[str, float]:
    """Outline measures of a 0/255 mask's one piece: circularity, corners, solidity, holes, extent."""
    contours, hierarchy = cv2.findContours(piece, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer_index = max(
        (i for i in range(len(contours)) if hierarchy[0][i][3] < 0), key=lambda i: cv2.contourArea(contours[i])
    )
    outer = contours[outer_index]
    area = cv2.contourArea(outer)
    perimeter = cv2.arcLength(outer, True)
    hull = cv2.contourArea(cv2.convexHull(outer))
    corners = len(cv2.approxPolyDP(outer, 0.04 * perimeter, True))
    holes = sum(cv2.contourArea(contours[i]) for i in range(len(contours)) if hierarchy[0][i][3] == outer_index)
    _, _, w, h = cv2.boundingRect(outer)
    # The deepest dent in the outline (a heart's notch), in units of the equivalent side sqrt(area).
    defects = cv2.convexityDefects(outer, cv2.convexHull(outer, returnPoints=False)) if len(outer) > 3 else None
    notch = defects.reshape(-1, 4)[:, 3].max() / 256 / math.sqrt(area) if defects is not None and area else 0.0
    return {
        "area": float(area),
        "circularity": float(4 * math.pi * area / perimeter**2) if perimeter else 0.0,
        "corners": float(corners),
        "solidity": float(area / hull) if hull else 0.0,
        "hole_fraction": float(holes / area) if area else 0.0,
        "extent": float(area / (w * h)) if w * h else 0.0,
        "notch": float(notch),
    }


def classify(f: Mapping[str, float], shapes: Sequence[str] = SHAPES) -> str:
    """The shape a piece's outline measures say, among ``shapes`` (the model's vocabulary: a rule for a
    shape it never drew is skipped, so a blurry triangle is not called a heart by a 3-shape model).

    Ideal values (circularity / corners / solidity / extent = area over bounding box / notch = the
    deepest dent over sqrt(area)): circle 0.9 / 6-8 / 0.99 / 0.76 / 0.01; square 0.81 / 4 / 1 / 0.96 /
    0.01; triangle 0.60 / 3 / 0.97 / 0.53 / 0.02; star 0.39 / 6-10 / 0.65 / 0.43 / 0.24; heart 0.70 /
    4-6 / 0.94 / 0.63 / 0.18; ring: a circle with a hole of ~1/3 of its area. A piece less solid than
    IRREGULAR_SOLIDITY that is no star is a "blob", which matches no prompt.
    """
    allowed = set(shapes)
    if "ring" in allowed and f["hole_fraction"] > 0.12:
        return "ring"
    if "star" in allowed and f["solidity"] < 0.8:
        return "star"
    if f["solidity"] < IRREGULAR_SOLIDITY:
        return "blob"  # a ragged or dented piece: none of the solid shapes
    if "heart" in allowed and f["notch"] > 0.08:
        return "heart"
    if "triangle" in allowed and (f["corners"] == 3 or f["extent"] < 0.68):
        return "triangle"
    square = f["extent"] > 0.87 or (f["corners"] == 4 and f["extent"] > 0.83 and f["circularity"] < 0.86)
    if square and "square" in allowed or "circle" not in allowed:
        return "square"
    return "circle"


def nearest_key(value: float, table: Mapping[str, float]) -> str:
    return min(table, key=lambda k: abs(table[k] - value))


def read(image: np.ndarray, shapes: Sequence[str] = SHAPES) -> Reading:
    """Read background, shape colour, shape (one of ``shapes``), size and position from an (H, W, 3)
    uint8 RGB image."""
    side = image.shape[0]
    lab = to_lab(image)
    border = border_pixels(lab).reshape(-1, 3)
    votes = np.bincount(nearest_colours(border), minlength=len(COLOUR_NAMES))
    background_index = int(votes.argmax())
    background = COLOUR_NAMES[background_index]
    reference = np.median(border[nearest_colours(border) == background_index], axis=0)
    delta = np.linalg.norm(lab - reference, axis=-1).astype(np.float32)
    # Pass 1: where is something unlike the background, and how unlike is its core?
    first = largest_component(delta > MIN_FOREGROUND_DELTA)
    if first is None:
        return Reading(background)
    contrast = float(np.percentile(delta[first > 0], 90))
    # Pass 2: cut the edge half way, on a 4x upsampled distance map.
    big = cv2.resize(delta, None, fx=UPSAMPLE, fy=UPSAMPLE, interpolation=cv2.INTER_LINEAR)
    # Smoothed by half a pixel, so pixel noise (a generated image's) does not fray the outline.
    big = cv2.GaussianBlur(big, (0, 0), UPSAMPLE / 2)
    piece = largest_component(big > max(MIN_FOREGROUND_DELTA, contrast / 2))
    if piece is None or (piece > 0).mean() < MIN_AREA_FRACTION:
        return Reading(background)
    small = cv2.resize(piece, (side, side), interpolation=cv2.INTER_AREA) > 127
    core = small & (delta > 0.75 * contrast)
    if not core.any():
        core = small if small.any() else first > 0
    colour = COLOUR_NAMES[int(nearest_colours(np.median(lab[core], axis=0)[None], exclude=background)[0])]
    features = shape_features(piece)
    x, y, w, h = cv2.boundingRect(piece)
    centre = ((x + w / 2) / (side * UPSAMPLE), (y + h / 2) / (side * UPSAMPLE))
    shape = classify(features, shapes)
    # Size: the radius the dataset drew it with, from the outline's area (holes filled) and the
    # area that shape has at radius 1.
    radius = math.sqrt(features["area"] / AREA_AT_UNIT_RADIUS.get(shape, math.pi)) / (side * UPSAMPLE)
    features.update({"contrast": contrast, "x": centre[0], "y": centre[1], "radius": radius})
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - centre[0]) ** 2 + (POSITIONS[p][1] - centre[1]) ** 2)
    return Reading(background, colour, shape, nearest_key(radius, SIZES), position, features)


def check(image: np.ndarray, attributes: Mapping[str, Any] | Any, shapes: Sequence[str] = SHAPES) -> dict[str, bool]:
    """Pass/fail per attribute the prompt names: ``attributes`` is a mapping (or an object with those
    attributes) with ``shape`` and ``colour`` and optionally ``background``, ``size``, ``position``
    (None or missing: not named, not checked); ``shapes``: the shapes the model knows."""
    reading = read(image, shapes)
    get = attributes.get if isinstance(attributes, Mapping) else lambda k: getattr(attributes, k, None)
    return {name: getattr(reading, name) == get(name) for name in ATTRIBUTES if get(name) is not None}


def pass_rates(results: Sequence[Mapping[str, bool]]) -> dict[str, tuple[int, int]]:
    """(passed, checked) per attribute over many ``check`` results."""
    rates: dict[str, tuple[int, int]] = {}
    for result in results:
        for name, ok in result.items():
            passed, total = rates.get(name, (0, 0))
            rates[name] = (passed + int(ok), total + 1)
    return rates


def main() -> None:
    """Measure the checker on the dataset's own images: pass rate per attribute, and the failures."""
    import argparse
    import time

    from scripts.shapes.dataset import SHAPES, sample_at

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--show", type=int, default=10, help="failures to print")
    args = parser.parse_args()
    results, failures = [], []
    start = time.perf_counter()
    for index in range(args.count):
        image, text, attributes = sample_at(args.seed, index, args.resolution, args.shapes.split(","), "all")
        truth = {k: getattr(attributes, k) for k in ATTRIBUTES}  # every attribute, named in the caption or not
        result = check(image, truth, args.shapes.split(","))
        results.append(result)
        if not all(result.values()):
            failures.append((index, text, truth, read(image, args.shapes.split(","))))
    elapsed = time.perf_counter() - start
    print(f"{args.count} images at {args.resolution}x{args.resolution}, {1000 * elapsed / args.count:.2f} ms each")
    for name, (passed, total) in pass_rates(results).items():
        print(f"  {name:10s} {passed}/{total} = {100 * passed / total:.2f}%")
    for index, text, truth, reading in failures[: args.show]:
        wrong = {k: (truth[k], getattr(reading, k)) for k in ATTRIBUTES if truth[k] != getattr(reading, k)}
        print(f"  #{index} {text!r}: {wrong} { ({k: round(v, 3) for k, v in reading.features.items()}) }")


if __name__ == "__main__":
    main()
