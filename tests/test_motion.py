"""farm.motion: optical flow and its warp, Deforum's 2D motion, Canny for ControlNet, compensated flicker."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from farm.motion import (
    FLOW_METHODS,
    FLOW_PARAMS,
    PREPROCESSORS,
    MotionError,
    align_to_source,
    canny,
    flicker_compensated,
    motion_matrix,
    optical_flow,
    warp_affine,
    warp_by_flow,
)
from farm.video import flicker

SIZE = 64
FRAMES = 6
CENTRE = (SIZE - 1) / 2  # the middle of a 64 px side, between pixels 31 and 32
STEP = 2  # px the test square moves right each frame (as tests/test_animation.py's clip)


def square_frame(i: int) -> np.ndarray:
    """Frame ``i`` of the test clip: a white 16 px square moving right across black, RGB."""
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    x = 2 + STEP * i
    frame[20:36, x : x + 16] = 255
    return frame


def texture(seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture: every pixel has gradient, so flow is defined everywhere."""
    noise = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 1.5)


def centroid(image: np.ndarray) -> tuple[float, float]:
    """(x, y) of the image's brightness centroid."""
    weight = image.astype(np.float64).sum(axis=2)
    ys, xs = np.indices(weight.shape)
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_warping_by_flow_lands_the_previous_frame_on_the_next(method: str):
    for i in range(1, FRAMES):
        previous, current = square_frame(i - 1), square_frame(i)
        raw = mad(previous, current)
        moved = align_to_source(previous, previous, current, method)
        # Within a quarter of the unwarped difference, every pair (measured: <= 0.31 of 3.98).
        assert mad(moved, current) < raw / 4, (i, mad(moved, current), raw)


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_flow_points_the_way_content_moves(method: str):
    flow = optical_flow(square_frame(0), square_frame(1), method)
    assert flow.dtype == np.float32 and flow.shape == (SIZE, SIZE, 2)
    inside = flow[24:32, 6:14]  # the square's middle in frame 0
    assert np.median(inside[..., 0]) == pytest.approx(STEP, abs=0.5)
    assert np.median(inside[..., 1]) == pytest.approx(0, abs=0.5)


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_flow_is_deterministic_whatever_the_thread_count(method: str):
    a, b = texture(0), warp_affine(texture(0), motion_matrix(SIZE, SIZE, zoom=1.1, angle=5))
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        single = optical_flow(a, b, method).tobytes()
        cv2.setNumThreads(4)
        assert optical_flow(a, b, method).tobytes() == single
        assert optical_flow(a, b, method).tobytes() == single
    finally:
        cv2.setNumThreads(threads)


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_flow_params_are_json_and_are_what_opencv_gets(method: str, monkeypatch: pytest.MonkeyPatch):
    assert json.loads(json.dumps(FLOW_PARAMS)) == FLOW_PARAMS
    a, b = texture(0), warp_affine(texture(0), motion_matrix(SIZE, SIZE, zoom=1.1, angle=5))
    before = optical_flow(a, b, method)
    # A changed recorded value changes the flow: the dict is what reaches OpenCV.
    name = "winsize" if method == "farneback" else "patch_size"
    monkeypatch.setitem(FLOW_PARAMS[method], name, FLOW_PARAMS[method][name] * 2 - 1)
    assert not np.array_equal(optical_flow(a, b, method), before)


def test_warp_by_flow_samples_the_image_at_grid_plus_flow():
    flow = np.zeros((SIZE, SIZE, 2), np.float32)
    flow[..., 0] = 3.0  # every output pixel takes the pixel 3 px to its right
    image = square_frame(10)
    x, y = centroid(image)
    assert centroid(warp_by_flow(image, flow)) == pytest.approx((x - 3, y), abs=1e-9)


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_backward_flow_aligns_better_than_deforums_forward_remap(method: str):
    # Under a zoom the flow varies across the frame, and remapping at grid - forward flow
    # (Deforum) reads the flow at the wrong pixel; the backward flow reads it where it belongs.
    previous = texture(1)
    current = warp_affine(previous, motion_matrix(SIZE, SIZE, zoom=1.2))
    inner = np.s_[8:-8, 8:-8]  # away from the border that a zoom fills by replication
    backward = align_to_source(previous, previous, current, method)
    forward = warp_by_flow(previous, -optical_flow(previous, current, method))
    assert mad(backward[inner], current[inner]) < 0.75 * mad(forward[inner], current[inner])


def test_no_motion_is_the_identity_exactly():
    image = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE + 8, 3), dtype=np.uint8)
    matrix = motion_matrix(SIZE + 8, SIZE)
    assert np.array_equal(matrix, [[1, 0, 0], [0, 1, 0]])
    assert np.array_equal(warp_affine(image, matrix), image)


def test_translation_moves_content_by_those_pixels():
    image = square_frame(10)  # the square well inside, so no part leaves the frame
    x, y = centroid(image)
    moved = warp_affine(image, motion_matrix(SIZE, SIZE, translation_x=5, translation_y=-3))
    assert centroid(moved) == pytest.approx((x + 5, y - 3), abs=1e-9)
    assert np.array_equal(moved[17:33, 27:43], image[20:36, 22:38])  # whole pixels: the bytes move


@pytest.mark.parametrize("offset", [(8, 0), (0, -6), (-5, 7)])
def test_zoom_scales_distances_from_the_centre(offset: tuple[int, int]):
    # A 4x4 blob whose centroid sits `offset` px from the centre (31.5, 31.5).
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    left, top = int(CENTRE + offset[0] - 1.5), int(CENTRE + offset[1] - 1.5)
    image[top : top + 4, left : left + 4] = 255
    assert centroid(image) == pytest.approx((CENTRE + offset[0], CENTRE + offset[1]))
    zoomed = warp_affine(image, motion_matrix(SIZE, SIZE, zoom=2.0))
    assert centroid(zoomed) == pytest.approx((CENTRE + 2 * offset[0], CENTRE + 2 * offset[1]), abs=0.05)


def test_translation_comes_before_zoom_and_rotation_as_in_deforum():
    # Deforum multiplies rotation x translation: the shift is made first, then scaled and turned.
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[30:34, 30:34] = 255  # a blob on the centre
    zoomed = warp_affine(image, motion_matrix(SIZE, SIZE, zoom=2.0, translation_x=4))
    assert centroid(zoomed) == pytest.approx((CENTRE + 8, CENTRE), abs=0.05)
    turned = warp_affine(image, motion_matrix(SIZE, SIZE, angle=90, translation_x=5))
    assert centroid(turned) == pytest.approx((CENTRE, CENTRE - 5), abs=1e-9)  # right, turned left: up


def test_rotation_by_90_degrees_turns_counter_clockwise_about_the_centre():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[2:8, 4:10] = (255, 0, 0)  # a red mark in the top-left corner
    turned = warp_affine(image, motion_matrix(SIZE, SIZE, angle=90))
    # Counter-clockwise as seen on screen: the top-left corner goes to the bottom-left.
    x, y = centroid(turned)
    assert x < CENTRE and y > CENTRE
    assert np.array_equal(turned, np.rot90(image))  # about the true centre, pixels land on pixels


def test_canny_outlines_a_filled_square():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[16:48, 16:48] = (200, 120, 40)
    edges = canny(image)
    assert edges.shape == image.shape and edges.dtype == np.uint8
    assert np.array_equal(edges[..., 0], edges[..., 1]) and np.array_equal(edges[..., 0], edges[..., 2])
    on = edges[..., 0] > 0
    assert set(np.unique(edges)) == {0, 255}
    # The outline: pixels one step either side of the square's boundary; nothing elsewhere.
    ring = np.zeros_like(on)
    ring[15:49, 15:49] = True
    ring[17:47, 17:47] = False
    assert not (on & ~ring).any()
    for side in (on[15:17, 17:47], on[47:49, 17:47], on[17:47, 15:17], on[17:47, 47:49]):
        assert side.any(axis=0 if side.shape[0] == 2 else 1).all()  # every side closed along its length
    assert not canny(image, 2000, 3000).any()  # above the largest gradient (4 x 255): thresholds apply
    assert "canny" in PREPROCESSORS and "none" in PREPROCESSORS


def test_compensated_flicker_of_a_moving_square_is_far_below_raw_flicker():
    frames = [square_frame(i) for i in range(FRAMES)]
    raw = flicker(frames)
    assert raw > 3
    step = motion_matrix(SIZE, SIZE, translation_x=STEP)
    assert flicker_compensated(frames, motions=[step] * (FRAMES - 1)) == 0.0
    for method in FLOW_METHODS:
        assert flicker_compensated(frames, sources=frames, method=method) < raw / 4
    # The wrong motion is not forgiven: moving left doubles the mismatch instead.
    wrong = motion_matrix(SIZE, SIZE, translation_x=-STEP)
    assert flicker_compensated(frames, motions=[wrong] * (FRAMES - 1)) > raw


def test_bad_inputs_are_one_line_errors():
    frames = [square_frame(i) for i in range(3)]
    with pytest.raises(MotionError, match="either"):
        flicker_compensated(frames)
    with pytest.raises(MotionError, match="need 2 motions"):
        flicker_compensated(frames, motions=[motion_matrix(SIZE, SIZE)])
    with pytest.raises(MotionError, match="unknown method"):
        optical_flow(frames[0], frames[1], "raft")
    with pytest.raises(MotionError, match="differ in size"):
        optical_flow(frames[0], frames[1][:32])
    with pytest.raises(MotionError, match="uint8"):
        warp_affine(frames[0].astype(np.float32), motion_matrix(SIZE, SIZE))
    with pytest.raises(MotionError, match="zoom"):
        motion_matrix(SIZE, SIZE, zoom=0)
    assert flicker_compensated(frames[:1], motions=[]) == 0.0
