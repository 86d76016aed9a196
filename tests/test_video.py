"""farm.video: animation sources, chained-animation image maths, flicker and video writing (no Ray, no torch)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from farm.video import (
    VideoError,
    blend_images,
    extract_frames,
    flicker,
    lab_to_rgb,
    list_image_folder,
    match_colors,
    natural_key,
    probe_video,
    read_video_info,
    rgb_to_lab,
    side_by_side,
    write_video,
)

# The test clip: a white square moving right on black over a static red band, written by
# OpenCV itself ('mp4v'), so reading it does not depend on write_video being right.
CLIP_FRAMES, CLIP_FPS, CLIP_W, CLIP_H = 24, 12.0, 64, 48
SQUARE = 8
BAND_TOP = 40  # rows BAND_TOP.. are red (RGB 255, 0, 0)


def square_x(index: int) -> int:
    """The square's left edge in frame index."""
    return 2 + 2 * index


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temp files left behind: write_video and extract_frames use hidden names."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "square.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (CLIP_W, CLIP_H))
    assert writer.isOpened()
    for index in range(CLIP_FRAMES):
        bgr = np.zeros((CLIP_H, CLIP_W, 3), np.uint8)
        bgr[10 : 10 + SQUARE, square_x(index) : square_x(index) + SQUARE] = 255
        bgr[BAND_TOP:, :, 2] = 255  # red, in OpenCV's BGR order
        writer.write(bgr)
    writer.release()
    return path


def centroid_x(rgb: np.ndarray) -> float:
    """Mean column of the bright pixels above the red band."""
    _, xs = np.nonzero(rgb[:BAND_TOP].mean(axis=2) > 128)
    return float(xs.mean())


# --- image folders ----------------------------------------------------------------------


def test_natural_key_orders_numbers_as_numbers_and_ignores_case() -> None:
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame03.png", "frame", "frame2b.png"]
    assert sorted(names, key=natural_key) == [
        "frame",
        "Frame1.png",
        "frame2.png",
        "frame2b.png",
        "frame03.png",
        "frame10.png",
    ]
    # Equal but for case or leading zeros: still a total, deterministic order.
    assert sorted(["a1", "A1", "a01"], key=natural_key) == sorted(["a01", "A1", "a1"], key=natural_key)
    assert natural_key("a1") != natural_key("A1")


def test_list_image_folder_filters_by_suffix_in_natural_order(tmp_path: Path) -> None:
    for name in ["frame10.PNG", "frame2.jpg", "Frame1.png", "frame3.webp", "frame4.BMP", "frame5.jpeg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".frame0.png").write_bytes(b"x")  # hidden: a macOS fork or a temp file
    (tmp_path / "folder.png").mkdir()
    names = [path.name for path in list_image_folder(tmp_path)]
    assert names == ["Frame1.png", "frame2.jpg", "frame3.webp", "frame4.BMP", "frame5.jpeg", "frame10.PNG"]


def test_list_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="no images"):
        list_image_folder(tmp_path)
    with pytest.raises(VideoError, match="not a folder"):
        list_image_folder(tmp_path / "notes.txt")
    with pytest.raises(VideoError, match="not a folder"):
        list_image_folder(tmp_path / "missing")


# --- source videos ----------------------------------------------------------------------


def test_probe_video_counts_frames(clip: Path) -> None:
    info = probe_video(clip)
    assert (info.frame_count, info.width, info.height) == (CLIP_FRAMES, CLIP_W, CLIP_H)
    assert info.fps == pytest.approx(CLIP_FPS)


def test_probe_video_of_a_video_written_by_write_video(tmp_path: Path) -> None:
    frames = [np.full((26, 34, 3), 10 * i, np.uint8) for i in range(7)]
    write_video(frames, tmp_path / "out.webm", 12.5)
    info = probe_video(tmp_path / "out.webm")
    assert (info.frame_count, info.width, info.height) == (7, 34, 26)
    assert info.fps == pytest.approx(12.5)


def test_video_frame_size_reads_the_stream_without_decoding(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size a caller checks against the input pixel limit before probe_video decodes anything."""
    import farm.video

    def no_read(self, *args):
        raise AssertionError("a frame was decoded")

    real = cv2.VideoCapture

    class Capture:  # cv2's VideoCapture with its decoding calls refused
        def __init__(self, *args):
            self._capture = real(*args)

        read = grab = retrieve = no_read

        def __getattr__(self, name):
            return getattr(self._capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", Capture)
    assert farm.video.video_frame_size(clip) == (CLIP_W, CLIP_H)
    with pytest.raises(VideoError, match="no such video"):
        farm.video.video_frame_size(clip.with_name("missing.mp4"))


def test_probe_video_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no such video"):
        probe_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    with pytest.raises(VideoError, match="cannot be read"):
        probe_video(junk)


def test_extract_frames_writes_the_frames_asked_for(clip: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    paths = extract_frames(clip, [0, 5, 23], folder)
    assert [path.name for path in paths] == ["000000.png", "000005.png", "000023.png"]
    for index, path in zip([0, 5, 23], paths, strict=True):
        image = Image.open(path)
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (CLIP_W, CLIP_H))
        rgb = np.asarray(image)
        assert centroid_x(rgb) == pytest.approx(square_x(index) + (SQUARE - 1) / 2, abs=1.0)
        band = rgb[BAND_TOP + 2 :, 8:-8].reshape(-1, 3).mean(axis=0)
        assert band[0] > 200 and band[2] < 60, f"frame {index}: band {band} is not red (BGR left in?)"
    assert sorted(path.name for path in folder.iterdir()) == ["000000.png", "000005.png", "000023.png"]


def test_extract_frames_rerun_keeps_existing_files(clip: Path, tmp_path: Path) -> None:
    first = extract_frames(clip, [0, 5, 23], tmp_path)
    hashes = [sha256(path) for path in first]
    # A file already there is never rewritten, even if it differs from the video's frame.
    Image.new("RGB", (CLIP_W, CLIP_H), (1, 2, 3)).save(first[1])
    kept = sha256(first[1])
    first[2].unlink()
    again = extract_frames(clip, [0, 5, 23], tmp_path)
    assert again == first
    assert [sha256(path) for path in again] == [hashes[0], kept, hashes[2]]
    assert leftovers(tmp_path) == []


def test_extract_frames_any_order_and_repeats(clip: Path, tmp_path: Path) -> None:
    paths = extract_frames(clip, [7, 3, 7], tmp_path)
    assert [path.name for path in paths] == ["000007.png", "000003.png", "000007.png"]
    assert centroid_x(np.asarray(Image.open(paths[0]))) > centroid_x(np.asarray(Image.open(paths[1])))


def test_extract_frames_past_the_end(clip: Path, tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="frame 24 is past the end"):
        extract_frames(clip, [0, CLIP_FRAMES], tmp_path)
    with pytest.raises(VideoError, match="negative"):
        extract_frames(clip, [-1], tmp_path)
    assert leftovers(tmp_path) == []


# --- chained-animation maths ------------------------------------------------------------


def test_blend_images_endpoints_and_midpoints() -> None:
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    previous = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(blend_images(source, previous, 0.0), source)
    assert np.array_equal(blend_images(source, previous, 1.0), previous)

    a = np.array([[[0, 1, 2], [10, 255, 100]]], np.uint8)
    b = np.array([[[255, 2, 3], [20, 255, 0]]], np.uint8)
    # 127.5 -> 128 and 2.5 -> 2: np.rint rounds halves to even.
    assert blend_images(a, b, 0.5).tolist() == [[[128, 2, 2], [15, 255, 50]]]
    assert blend_images(a, b, 0.25).tolist() == [[[64, 1, 2], [12, 255, 75]]]
    out = blend_images(a, b, 0.5)
    assert out.dtype == np.uint8 and out.shape == a.shape


def test_blend_images_rejects_bad_input() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(VideoError, match="blend"):
        blend_images(a, np.zeros((4, 5, 3), np.uint8), 0.5)
    with pytest.raises(VideoError, match="between 0 and 1"):
        blend_images(a, a, 1.5)


def smooth_image(seed: int, tint: tuple[float, float, float], spread: float) -> np.ndarray:
    """A 48x64 gradient plus noise, tinted, kept well inside 0..255 (so matching clips little)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:64]
    base = (xx / 63.0 + yy / 47.0) / 2.0 - 0.5
    image = np.stack([base * spread * (1 + 0.3 * c) for c in range(3)], axis=-1)
    image += rng.normal(0, spread / 8, image.shape) + np.asarray(tint)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb_to_lab(image)
    return lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))


def test_rgb_to_lab_agrees_with_opencv() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = rgb_to_lab(image)
    theirs = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).astype(np.float64)
    assert np.abs(ours - theirs).max() < 0.5
    white = rgb_to_lab(np.full((1, 1, 3), 255, np.uint8))[0, 0]
    assert white == pytest.approx([100.0, 0.0, 0.0], abs=1e-4)
    # Every uint8 grey and a random sample survive the round trip exactly.
    greys = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert np.array_equal(lab_to_rgb(rgb_to_lab(greys)), greys)
    assert np.array_equal(lab_to_rgb(ours), image)


def test_match_colors_matches_the_reference_statistics() -> None:
    image = smooth_image(2, (90, 120, 150), 60)
    reference = smooth_image(3, (170, 110, 70), 100)
    before_mean, before_std = lab_stats(image)
    ref_mean, ref_std = lab_stats(reference)
    assert np.abs(before_mean - ref_mean).max() > 10  # the test would notice a no-op
    matched = match_colors(image, reference)
    assert matched.dtype == np.uint8 and matched.shape == image.shape
    mean, std = lab_stats(matched)
    assert mean == pytest.approx(ref_mean, abs=0.5)
    assert std == pytest.approx(ref_std, rel=0.05, abs=0.3)


def test_match_colors_to_itself_is_identity() -> None:
    image = smooth_image(4, (100, 140, 80), 120)
    matched = match_colors(image, image)
    assert np.abs(matched.astype(int) - image.astype(int)).max() <= 1


def test_match_colors_flat_image_only_shifts() -> None:
    flat = np.full((16, 16, 3), (40, 200, 90), np.uint8)
    reference = smooth_image(5, (160, 100, 120), 80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn (RuntimeWarning) before giving NaN
        matched = match_colors(flat, reference)
    assert (matched == matched[0, 0]).all()
    ref_mean, _ = lab_stats(reference)
    assert rgb_to_lab(matched[:1, :1])[0, 0] == pytest.approx(ref_mean, abs=1.5)


def test_match_colors_is_deterministic() -> None:
    image, reference = smooth_image(6, (90, 90, 90), 90), smooth_image(7, (200, 60, 40), 50)
    assert match_colors(image, reference).tobytes() == match_colors(image.copy(), reference.copy()).tobytes()


def test_flicker_known_differences() -> None:
    zeros, tens = np.zeros((4, 6, 3), np.uint8), np.full((4, 6, 3), 10, np.uint8)
    assert flicker([zeros, tens]) == 10.0
    assert flicker([tens, zeros]) == 10.0  # no uint8 wrap-around (0 - 10 is not 246)
    assert flicker([zeros, tens, tens]) == 5.0
    half = zeros.copy()
    half[:2] = 255
    assert flicker([zeros, half]) == 127.5
    assert flicker([zeros]) == 0.0
    assert flicker([]) == 0.0


def test_flicker_size_mismatch() -> None:
    frames = [np.zeros((4, 6, 3), np.uint8)] * 2 + [np.zeros((4, 7, 3), np.uint8)]
    with pytest.raises(VideoError, match="frame 2"):
        flicker(frames)


def test_side_by_side_scales_left_to_right_height() -> None:
    left = np.full((10, 20, 3), (200, 30, 60), np.uint8)
    right = np.full((40, 30, 3), (5, 6, 7), np.uint8)
    out = side_by_side(left, right)
    assert out.shape == (40, 80 + 30, 3)
    assert (out[:, :80] == (200, 30, 60)).all()
    assert np.array_equal(out[:, 80:], right)
    same = side_by_side(right, right)
    assert np.array_equal(same, np.concatenate([right, right], axis=1))


# --- writing videos ---------------------------------------------------------------------


def moving_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Distinct frames (a bar moving right over a colour gradient), so no encoder can merge them."""
    frames = []
    for index in range(count):
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        rgb[..., 2] = 120
        rgb[:, index % width] = 255
        frames.append(rgb)
    return frames


@pytest.mark.parametrize(
    ("suffix", "fps", "codec"),
    [(".mp4", 12.0, "h264"), (".mp4", 12.5, "h264"), (".webm", 12.0, "vp9"), (".webm", 12.5, "vp9")],
)
def test_write_video_av(tmp_path: Path, suffix: str, fps: float, codec: str) -> None:
    frames = moving_frames(15, 33, 25)  # odd sides: padded to 34x26 for yuv420p
    path = tmp_path / f"out{suffix}"
    assert write_video(iter(frames), path, fps) == 15
    info = read_video_info(path)
    assert info == {"codec": codec, "pix_fmt": "yuv420p", "frames": 15, "width": 34, "height": 26, "fps": fps}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with av.open(str(path)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    # Colours survive (the YUV matrix written is the one read), and the padding repeats the edge.
    assert np.abs(decoded[3][:25, :33].astype(int) - frames[3].astype(int)).mean() < 6
    assert np.abs(decoded[3][:, 33].astype(int) - decoded[3][:, 32].astype(int)).mean() < 6


def test_write_video_mp4_is_faststart(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    write_video(moving_frames(5, 32, 32), path, 24)
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")  # the index first: browsers play while loading


def test_write_video_gif(tmp_path: Path) -> None:
    path = tmp_path / "out.gif"
    assert write_video(moving_frames(9, 33, 25), path, 10) == 9
    with Image.open(path) as image:
        assert (image.format, image.n_frames, image.size) == ("GIF", 9, (33, 25))  # no padding needed
        assert image.info["loop"] == 0
        assert image.info["duration"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_video_ntsc_rate(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    write_video(moving_frames(4, 16, 16), path, 30000 / 1001)
    assert read_video_info(path)["fps"] == pytest.approx(30000 / 1001, abs=1e-9)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_write_video_size_mismatch_names_the_frame(tmp_path: Path, suffix: str) -> None:
    # Late enough that the encoders (x264 looks 40 frames ahead) have begun the file.
    frames = moving_frames(80, 16, 16)
    frames[70] = np.zeros((16, 14, 3), np.uint8)
    path = tmp_path / f"out{suffix}"
    with pytest.raises(VideoError, match="frame 70 "):
        write_video(frames, path, 12)
    assert list(tmp_path.iterdir()) == []  # neither the video nor a temp file


def test_write_video_bad_arguments(tmp_path: Path) -> None:
    frames = moving_frames(2, 16, 16)
    with pytest.raises(VideoError, match="no frames"):
        write_video([], tmp_path / "out.mp4", 12)
    with pytest.raises(VideoError, match=r"\.mp4, \.webm, \.gif"):
        write_video(frames, tmp_path / "out.avi", 12)
    with pytest.raises(VideoError, match="fps"):
        write_video(frames, tmp_path / "out.mp4", 0)
    with pytest.raises(VideoError, match="uint8"):
        write_video([np.zeros((16, 16, 3), np.float32)], tmp_path / "out.mp4", 12)
    with pytest.raises(VideoError, match="does not exist"):
        write_video(frames, tmp_path / "missing" / "out.mp4", 12)
    assert list(tmp_path.iterdir()) == []


def test_write_video_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out.webm"
    write_video(moving_frames(3, 16, 16), path, 12)
    write_video(moving_frames(6, 16, 16), path, 12)
    assert read_video_info(path)["frames"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
