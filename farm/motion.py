"""Motion between frames for animation: optical flow, warps, ControlNet preprocessing, compensated flicker.

Optical flow (OpenCV's Farneback and DIS) measures how a source video moves from one frame to
the next; ``warp_by_flow`` carries the previous rendered frame along that motion so it lines up
with the next source frame (Deforum's hybrid video flow). ``motion_matrix`` and ``warp_affine``
are Deforum's 2D motion (zoom, angle, translation). ``canny`` makes ControlNet's edge image.
``flicker_compensated`` is ``farm.video.flicker`` measured after undoing the motion, so a clip
that moves smoothly scores low even though its pixels change.

Conventions: images are RGB uint8 (H, W, 3); a flow is float32 (H, W, 2) of (dx, dy) in pixels,
OpenCV's: ``flow = optical_flow(a, b)`` means ``a[y, x]`` is seen at ``b[y + dy, x + dx]``.
A tools-layer module: numpy and cv2, and from farm only ``farm.errors``; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from farm.errors import FarmError

FLOW_METHODS = ("farneback", "dis")
PREPROCESSORS = ("none", "canny")

# Each method's parameters as plain JSON values, recorded in manifest rows and passed to
# OpenCV from here, so a row says exactly how its flow was computed.
FLOW_PARAMS: dict[str, dict[str, Any]] = {
    # OpenCV's dense optical flow tutorial values (pyramid halving, 3 levels, 15 px window):
    # poly_n 5 goes with poly_sigma 1.1-1.2 (calcOpticalFlowFarneback docs); flags 0: no
    # initial flow, box window (the Gaussian window is slower for little gain here).
    "farneback": {
        "pyr_scale": 0.5,
        "levels": 3,
        "winsize": 15,
        "iterations": 3,
        "poly_n": 5,
        "poly_sigma": 1.2,
        "flags": 0,
    },
    # DISOPTICAL_FLOW_PRESET_MEDIUM (Deforum's "DIS Medium"), its values written out and set
    # one by one: a later OpenCV that retunes the preset cannot change what a row recorded.
    "dis": {
        "preset": "medium",
        "finest_scale": 1,
        "patch_size": 8,
        "patch_stride": 3,
        "gradient_descent_iterations": 25,
        "variational_refinement_iterations": 5,
        "variational_refinement_alpha": 20.0,
        "variational_refinement_delta": 5.0,
        "variational_refinement_gamma": 10.0,
        "use_mean_normalization": True,
        "use_spatial_propagation": True,
    },
}

# Deforum's default border ("replicate"): pixels pulled in from outside the frame repeat the
# edge instead of turning black, which img2img would otherwise paint as a black band.
BORDER = cv2.BORDER_REPLICATE
# ControlNet's Canny thresholds in diffusers' examples (cv2.Canny hysteresis, 0-255 gradient).
CANNY_LOW = 100
CANNY_HIGH = 200
_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


class MotionError(FarmError):
    """A motion input problem (wrong shape, unknown method) to show the user in one line."""


def _check_rgb(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MotionError(f"{what}: expected uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
    return image


def _check_pair(first: np.ndarray, second: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    first, second = _check_rgb(first, what), _check_rgb(second, what)
    if first.shape != second.shape:
        raise MotionError(f"{what}: frames differ in size, {first.shape} and {second.shape}")
    return first, second


def _dis() -> Any:
    """cv2.DISOpticalFlow_create(PRESET_MEDIUM) with every value of FLOW_PARAMS["dis"] set explicitly."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    for name, value in FLOW_PARAMS["dis"].items():
        if name != "preset":
            # finest_scale -> setFinestScale: the names are OpenCV's setters in snake case.
            getattr(dis, "set" + name.title().replace("_", ""))(value)
    return dis


def optical_flow(previous: np.ndarray, current: np.ndarray, method: str = "farneback") -> np.ndarray:
    """Dense flow previous -> current, float32 (H, W, 2), by cv2.calcOpticalFlowFarneback or cv2.DISOpticalFlow.

    ``previous[y, x]`` moves to ``current[y + dy, x + dx]``. Both run on grayscale (OpenCV's
    flows take one channel). The same input gives the same bytes on one machine whatever
    cv2.setNumThreads says (checked: 1 to 16 threads, Farneback and DIS); another CPU may
    differ in the last bits, since OpenCV picks SIMD code (AVX2, AVX-512) at run time.
    """
    previous, current = _check_pair(previous, current, "optical flow")
    if method not in FLOW_METHODS:
        raise MotionError(f"optical flow: unknown method {method!r} (one of {', '.join(FLOW_METHODS)})")
    before = cv2.cvtColor(previous, cv2.COLOR_RGB2GRAY)
    after = cv2.cvtColor(current, cv2.COLOR_RGB2GRAY)
    if method == "farneback":
        p = FLOW_PARAMS["farneback"]
        flow = cv2.calcOpticalFlowFarneback(
            before,
            after,
            None,
            p["pyr_scale"],
            p["levels"],
            p["winsize"],
            p["iterations"],
            p["poly_n"],
            p["poly_sigma"],
            p["flags"],
        )
    else:
        flow = _dis().calc(before, after, None)
    return np.ascontiguousarray(flow, dtype=np.float32)


def warp_by_flow(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image resampled at grid + flow (cv2.remap, bilinear, replicated border): backward warping.

    ``flow`` is the flow from the target geometry back to image's: to bring the previous
    rendered frame onto source frame n, pass ``optical_flow(source_n, source_n_minus_1)``
    (or call ``align_to_source``). Every output pixel then asks where it came from, so none
    is left empty, which forward flow (Deforum's remap at grid - flow) only approximates.
    """
    image = _check_rgb(image, "warp by flow")
    flow = np.asarray(flow)
    if flow.shape != (*image.shape[:2], 2):
        raise MotionError(f"warp by flow: flow is {flow.shape}, the image {image.shape}: expected (H, W, 2)")
    height, width = image.shape[:2]
    grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), axis=-1).astype(np.float32)
    return cv2.remap(image, grid + flow.astype(np.float32), None, cv2.INTER_LINEAR, borderMode=BORDER)


def align_to_source(
    image: np.ndarray, previous_source: np.ndarray, current_source: np.ndarray, method: str = "farneback"
) -> np.ndarray:
    """The previous rendered frame moved as the source moved previous -> current (Deforum hybrid flow)."""
    # The flow is taken current -> previous on purpose: that is the backward flow warp_by_flow needs.
    return warp_by_flow(image, optical_flow(current_source, previous_source, method))


def motion_matrix(
    width: int,
    height: int,
    zoom: float = 1.0,
    angle: float = 0.0,
    translation_x: float = 0.0,
    translation_y: float = 0.0,
) -> np.ndarray:
    """Deforum's 2D motion (anim_frame_warp_2d) as a (2, 3) float64 matrix for warp_affine.

    Built as Deforum builds it: cv2.getRotationMatrix2D(centre, angle, zoom) times the
    translation, so content first moves by (translation_x, translation_y) pixels (x right,
    y down), then turns by ``angle`` degrees counter-clockwise and scales by ``zoom`` about
    the centre. One change: the centre is the true middle ((W - 1) / 2, (H - 1) / 2), not
    Deforum's (W // 2, H // 2), whose half-pixel error makes a zoom drift toward the top
    left by half a pixel times (zoom - 1) every frame of a chained animation.
    """
    values = {"zoom": zoom, "angle": angle, "translation_x": translation_x, "translation_y": translation_y}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad or zoom <= 0 or width < 1 or height < 1:
        raise MotionError(f"motion: needs a positive size and finite zoom > 0, got {width}x{height} {values}")
    centre = ((width - 1) / 2, (height - 1) / 2)
    rotate = np.vstack([cv2.getRotationMatrix2D(centre, float(angle), float(zoom)), [0.0, 0.0, 1.0]])
    translate = np.array([[1.0, 0.0, translation_x], [0.0, 1.0, translation_y], [0.0, 0.0, 1.0]])
    return (rotate @ translate)[:2]


def warp_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """image moved by a (2, 3) matrix from motion_matrix (cv2.warpAffine, bilinear, replicated border as Deforum)."""
    image = _check_rgb(image, "warp")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise MotionError(f"warp: expected a (2, 3) matrix, got {matrix.shape}")
    if np.array_equal(matrix, _IDENTITY):
        # No motion keeps the exact bytes: a still shot must not soften however long it runs.
        return image.copy()
    height, width = image.shape[:2]
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=BORDER)


def canny(image: np.ndarray, low_threshold: float = CANNY_LOW, high_threshold: float = CANNY_HIGH) -> np.ndarray:
    """ControlNet's Canny image as diffusers' examples make it: cv2.Canny, the edge map in all three channels."""
    image = _check_rgb(image, "canny")
    if not 0 <= low_threshold <= high_threshold:
        raise MotionError(f"canny: thresholds must satisfy 0 <= low <= high, got {low_threshold}, {high_threshold}")
    # cv2.Canny takes the colour image as diffusers passes it: per pixel the strongest
    # channel's gradient, so an edge between colours of equal brightness still shows.
    edges = cv2.Canny(image, low_threshold, high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)


def flicker_compensated(
    frames: Sequence[np.ndarray],
    sources: Sequence[np.ndarray] | None = None,
    motions: Sequence[np.ndarray] | None = None,
    method: str = "farneback",
) -> float:
    """farm.video.flicker after undoing the motion: mean |frame n - frame n-1 moved onto n|, 0-255 scale.

    Give exactly one of ``sources`` (the source frames, one per frame: frame n-1 moves by the
    optical flow of its sources, as ``align_to_source``) or ``motions`` (one (2, 3) matrix per
    step, len(frames) - 1 of them: ``motions[k]`` moves frame k onto frame k + 1, as
    ``warp_affine``). Every pixel, channel and pair counts, and the sums are exact integers,
    as in flicker; 0.0 for fewer than 2 frames.
    """
    if (sources is None) == (motions is None):
        raise MotionError("compensated flicker: give either the source frames or the motions, not both or neither")
    steps = max(len(frames) - 1, 0)
    if sources is not None and len(sources) != len(frames):
        raise MotionError(f"compensated flicker: {len(frames)} frames but {len(sources)} source frames")
    if motions is not None and len(motions) != steps:
        raise MotionError(f"compensated flicker: {len(frames)} frames need {steps} motions, got {len(motions)}")
    total = 0
    count = 0
    for number in range(1, len(frames)):
        before, after = _check_pair(frames[number - 1], frames[number], f"compensated flicker, frame {number}")
        if sources is not None:
            moved = align_to_source(before, sources[number - 1], sources[number], method)
        else:
            moved = warp_affine(before, motions[number - 1])
        total += int(np.abs(after.astype(np.int64) - moved.astype(np.int64)).sum())
        count += after.size
    return total / count if count else 0.0
