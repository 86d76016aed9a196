"""Animation sources in, videos out: the frame maths of chained animation between them.

Sources are a folder of images (natural order: frame2 before frame10) or a video, whose
frames are extracted once as PNGs so every render reads the same bytes. Chained animation
blends each source frame with the previous output and pulls its colours back to a
reference (Reinhard LAB transfer); ``flicker`` measures how much consecutive frames jump.
Videos are written with PyAV (H.264, VP9) or Pillow (GIF).

No torch and no Ray here: the driver imports this module and must stay light.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from farm.errors import FarmError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")  # what write_video can write

# The largest denominator of a frame rate: 1001 keeps NTSC rates (30000/1001) exact while
# a float such as 12.5 or 29.97 becomes the small fraction it stands for (25/2, 2997/100).
FPS_DENOMINATOR = 1001
# x264's constant rate factor: 18 is "visually lossless" (x264 docs), a fair default for
# renders that people inspect frame by frame; the default 23 smears fine detail.
H264_CRF = "18"

# sRGB <-> CIE XYZ (D65), IEC 61966-2-1; matrices from Bruce Lindbloom ("RGB/XYZ Matrices").
# The inverse is written out, not computed, so no LAPACK build can change its last bits.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_XYZ_TO_RGB = (
    (3.2404542, -1.5371385, -0.4985314),
    (-0.9692660, 1.8760108, 0.0415560),
    (0.0556434, -0.2040259, 1.0572252),
)
# The D65 white point, the rows of _RGB_TO_XYZ summed (so white maps to L=100, a=b=0).
_WHITE = tuple(sum(row) for row in _RGB_TO_XYZ)
# A flat channel's std is float noise (~1e-9 L units for a constant image), not 0; real
# variation starts near 1e-4 (one level in one pixel of a megapixel), so this tells them apart.
_FLAT_STD = 1e-6
# CIELAB's f(t) switches from a cube root to a line below (6/29)^3 (CIE 15:2004, 8.2.1.1).
_LAB_DELTA = 6.0 / 29.0


class VideoError(FarmError):
    """A source or output problem to show the user in one line (no traceback)."""


def natural_key(name: str) -> tuple:
    """Sort key in which digit runs compare as numbers and letters ignore case: frame2 < frame10 < Frame11."""
    # re.split with a group alternates text and digits, so parts line up text-with-text and
    # int-with-int; the name itself breaks ties (frame01 vs frame1, a.png vs A.png).
    parts = tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name.casefold())))
    return (parts, name)


def list_image_folder(folder: str | Path) -> list[Path]:
    """The images in a folder (by suffix, any case), in natural order; hidden files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder}: not a folder")
    # Dot files are never frames: macOS "._frame1.png" resource forks, our own temp files.
    images = [
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    ]
    if not images:
        raise VideoError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(images, key=lambda path: natural_key(path.name))


@dataclass(frozen=True)
class VideoInfo:
    """What a source video holds, as OpenCV decodes it."""

    frame_count: int  # counted by decoding (CAP_PROP_FRAME_COUNT is only an estimate for many files)
    fps: float  # as the container says; 0.0 where it says nothing
    width: int
    height: int


def _open_capture(path: Path) -> Any:
    """A cv2.VideoCapture on path, or VideoError: cv2 itself only says isOpened() is False."""
    # FFmpeg's own log ("moov atom not found") would print under our one-line error: silence it
    # (AV_LOG_QUIET); the user can still set OPENCV_FFMPEG_LOGLEVEL to see it.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2  # here, not at the top: only video sources need it

    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{path}: cannot be read as a video")
    return capture


def video_frame_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a video's frames as its stream says, read before any frame is decoded,
    so a caller can refuse a huge video cheaply; (0, 0) where the stream does not say."""
    import cv2

    capture = _open_capture(Path(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count (by decoding every frame), fps and size of a video, through cv2.VideoCapture."""
    import cv2

    path = Path(path)
    capture = _open_capture(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        ok, first = capture.read()
        if not ok:
            raise VideoError(f"{path}: no frames")
        count = 1
        # grab() decodes without converting to BGR: counting needs no pixels.
        while capture.grab():
            count += 1
    finally:
        capture.release()
    height, width = first.shape[:2]
    return VideoInfo(frame_count=count, fps=fps if math.isfinite(fps) and fps > 0 else 0.0, width=width, height=height)


def _temp_beside(path: Path) -> Path:
    """A hidden, unique name in path's folder: os.replace from it is atomic (same file system)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def extract_frames(video: str | Path, indices: Sequence[int], folder: str | Path) -> list[Path]:
    """Decode the video once (cv2), write the frames at ``indices`` as RGB PNGs named f"{index:06d}.png" in folder.

    Returns their paths in the order of indices (source frame numbers, normally increasing;
    any order and repeats work). Each file is written to a temp name and os.replace'd, so a
    crash never leaves half a PNG. A file already present is kept as is: a rerun reuses it,
    its bytes (and sha256) unchanged, and decodes only as far as the last missing frame.
    VideoError if an index is negative or past the end.
    """
    import cv2

    video, folder = Path(video), Path(folder)
    paths = [folder / f"{index:06d}.png" for index in indices]
    negative = [index for index in indices if index < 0]
    if negative:
        raise VideoError(f"{video}: frame index {negative[0]} is negative")
    missing = {index for index, path in zip(indices, paths, strict=True) if not path.exists()}
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    last = max(missing)
    capture = _open_capture(video)
    try:
        for index in range(last + 1):
            if not capture.grab():
                raise VideoError(f"{video}: frame {last} is past the end ({index} frames)")
            if index not in missing:
                continue
            ok, bgr = capture.retrieve()
            if not ok:
                raise VideoError(f"{video}: frame {index} cannot be decoded")
            _write_png_atomic(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), folder / f"{index:06d}.png")
    finally:
        capture.release()
    return paths


def _write_png_atomic(rgb: np.ndarray, path: Path) -> None:
    temp = _temp_beside(path)
    try:
        Image.fromarray(rgb, "RGB").save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _check_rgb(image: np.ndarray, what: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise VideoError(f"{what}: expected uint8 HxWx3 RGB, got {image.dtype} {image.shape}")


def blend_images(source: np.ndarray, previous: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) x source + weight x previous, uint8 HxWx3 in and out, rounded half to even (np.rint).

    weight 0 returns source's exact bytes and 1 previous's. Elementwise float64 arithmetic
    only (no BLAS, no FMA), so the bytes are the same on every machine.
    """
    _check_rgb(source, "blend source")
    _check_rgb(previous, "blend previous")
    if source.shape != previous.shape:
        raise VideoError(
            f"blend: source is {source.shape[1]}x{source.shape[0]}, previous {previous.shape[1]}x{previous.shape[0]}"
        )
    if not 0.0 <= weight <= 1.0:
        raise VideoError(f"blend weight {weight} is not between 0 and 1")
    mixed = (1.0 - weight) * source.astype(np.float64) + weight * previous.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _mix(matrix: tuple[tuple[float, ...], ...], channels: np.ndarray) -> np.ndarray:
    """matrix @ each pixel, written out per row: ``@`` goes through BLAS, whose kernels differ by CPU."""
    c0, c1, c2 = channels[..., 0], channels[..., 1], channels[..., 2]
    return np.stack([row[0] * c0 + row[1] * c1 + row[2] * c2 for row in matrix], axis=-1)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """uint8 sRGB -> float64 CIELAB (L 0..100) under D65, per IEC 61966-2-1 and CIE 15:2004."""
    srgb = image.astype(np.float64) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    xyz = _mix(_RGB_TO_XYZ, linear) / np.asarray(_WHITE)
    f = np.where(xyz > _LAB_DELTA**3, np.cbrt(xyz), xyz / (3 * _LAB_DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float64 CIELAB -> uint8 sRGB, the inverse of rgb_to_lab; colours outside sRGB are clipped."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > _LAB_DELTA, f**3, 3 * _LAB_DELTA**2 * (f - 4.0 / 29.0)) * np.asarray(_WHITE)
    # Clip before the power: out-of-gamut colours give negative linear values.
    linear = np.clip(_mix(_XYZ_TO_RGB, xyz), 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(srgb * 255.0), 0, 255).astype(np.uint8)


def match_colors(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Match image's per-channel CIELAB mean and std to reference's (Reinhard et al. 2001).

    Reinhard, Ashikhmin, Gooch and Shirley, "Color Transfer between Images" (IEEE CG&A 2001),
    here in CIELAB rather than their lαβ. Deforum's "LAB" colour coherence matches whole
    histograms in LAB (skimage match_histograms); mean and std is its smoother, cheaper form.
    uint8 HxWx3 RGB in and out; the two may differ in size. The LAB conversion is numpy
    float64, not cv2, whose SIMD paths may differ across CPUs: the bytes must be the same on
    every machine (numpy's own pow/cbrt may differ in the last ulp, far below the 0.5
    rounding step). A flat channel in image is only shifted to the reference's mean: no
    division by zero.
    """
    _check_rgb(image, "colour match image")
    _check_rgb(reference, "colour match reference")
    lab, ref = rgb_to_lab(image), rgb_to_lab(reference)
    mean, std = lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))
    ref_mean, ref_std = ref.mean(axis=(0, 1)), ref.std(axis=(0, 1))
    # A flat channel has nothing to stretch: scale 1 leaves it flat and moves it to ref_mean.
    scale = np.divide(ref_std, std, out=np.ones_like(std), where=std > _FLAT_STD)
    return lab_to_rgb((lab - mean) * scale + ref_mean)


def flicker(frames: Sequence[np.ndarray]) -> float:
    """Mean absolute difference between consecutive frames, 0-255 scale, over every pixel, channel and pair.

    0.0 for fewer than 2 frames; frames of different sizes: VideoError. Sums are exact
    integers, so the result does not depend on summation order.
    """
    total = 0
    count = 0
    for number in range(1, len(frames)):
        before, after = np.asarray(frames[number - 1]), np.asarray(frames[number])
        if before.shape != after.shape:
            raise VideoError(f"flicker: frame {number} is {after.shape}, frame {number - 1} {before.shape}")
        total += int(np.abs(after.astype(np.int64) - before.astype(np.int64)).sum())
        count += after.size
    return total / count if count else 0.0


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left scaled (PIL Lanczos) to right's height keeping its aspect, then left | right horizontally."""
    height = right.shape[0]
    if left.shape[0] != height:
        width = max(1, round(left.shape[1] * height / left.shape[0]))
        left = np.asarray(Image.fromarray(left).resize((width, height), Image.Resampling.LANCZOS))
    return np.concatenate([left, right], axis=1)


def _frames_checked(first: np.ndarray, rest: Iterator[np.ndarray], pad: bool) -> Iterator[np.ndarray]:
    """first, then rest, each checked against first's size and padded to even sides if pad."""
    shape = first.shape
    for number, frame in _numbered(first, rest):
        frame = np.asarray(frame)
        if frame.shape != shape or frame.dtype != np.uint8:
            raise VideoError(
                f"frame {number} is {frame.dtype} {frame.shape}, the first frame {first.dtype} {shape}: "
                "all frames must match the first"
            )
        yield _pad_even(frame) if pad else frame


def _numbered(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    yield 0, first
    yield from enumerate(rest, start=1)


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p halves the chroma planes, so both sides must be even: repeat the last row/column."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float) -> int:
    """Write uint8 RGB HxWx3 frames to path (.mp4 H.264, .webm VP9, .gif); returns frames written.

    .mp4 and .webm go through PyAV in yuv420p (BT.709, tagged), which browsers play; odd
    sides are padded by one repeated edge pixel. .gif goes through Pillow, looping forever,
    round(1000 / fps) ms a frame (GIF keeps centiseconds; Pillow merges identical
    consecutive frames, adding their durations). The file is written beside path under a
    hidden temp name and os.replace'd at the end, so a crash leaves no half video.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise VideoError(f"{path}: cannot write {suffix or 'no suffix'}; use one of {', '.join(VIDEO_SUFFIXES)}")
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"{path}: fps must be a positive number, not {fps}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise VideoError(f"{path}: no frames to write")
    first = np.asarray(first)
    _check_rgb(first, f"{path}: frame 0")
    if not path.parent.is_dir():
        raise VideoError(f"{path}: folder {path.parent} does not exist")
    temp = _temp_beside(path)
    checked = _frames_checked(first, iterator, pad=suffix != ".gif")
    try:
        written = _write_gif(checked, temp, fps) if suffix == ".gif" else _write_av(checked, temp, fps, suffix)
        os.replace(temp, path)
    except (OSError, ValueError) as exc:  # PyAV's UnknownCodecError is a ValueError
        raise VideoError(f"{path}: cannot write the video ({exc})") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("av."):  # av.FFmpegError: an encoder or muxer failed
            raise VideoError(f"{path}: cannot write the video ({exc})") from exc
        raise
    finally:
        temp.unlink(missing_ok=True)
    return written


def _write_gif(frames: Iterator[np.ndarray], temp: Path, fps: float) -> int:
    written = 0

    def images() -> Iterator[Image.Image]:
        nonlocal written
        for frame in frames:
            written += 1
            yield Image.fromarray(frame, "RGB")

    stream = images()
    # Pillow holds every frame until the file is written: a GIF is for short clips (use .mp4).
    next(stream).save(temp, format="GIF", save_all=True, append_images=stream, loop=0, duration=round(1000 / fps))
    return written


def _write_av(frames: Iterator[np.ndarray], temp: Path, fps: float, suffix: str) -> int:
    import av
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    rate = Fraction(fps).limit_denominator(FPS_DENOMINATOR)
    mp4 = suffix == ".mp4"
    # faststart moves the index (moov) before the data, so a browser can play while loading.
    container = av.open(
        str(temp), "w", format="mp4" if mp4 else "webm", container_options={"movflags": "+faststart"} if mp4 else {}
    )
    written = 0
    try:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264" if mp4 else "libvpx-vp9", rate=rate)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                if mp4:
                    stream.options = {"crf": H264_CRF}
                # Untagged video leaves players guessing the YUV matrix (601 or 709): say it.
                context = stream.codec_context
                context.colorspace = Colorspace.ITU709
                context.color_range = ColorRange.MPEG
                context.color_primaries = ColorPrimaries.BT709
                context.color_trc = ColorTrc.BT709
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            picture.pts = written
            picture.time_base = 1 / rate
            container.mux(stream.encode(picture))
            written += 1
        if stream is not None:
            container.mux(stream.encode(None))  # flush the frames the encoder holds back
    except BaseException:
        # The temp file is deleted anyway: an error while closing must not hide the first one.
        with contextlib.suppress(av.FFmpegError, OSError):
            container.close()
        raise
    try:
        container.close()  # writes the trailer (and, for faststart, moves the index)
    except av.FFmpegError as exc:
        raise VideoError(f"{temp}: {exc}") from exc
    return written


def read_video_info(path: str | Path) -> dict:
    """Codec, pixel format, decoded frame count, size and fps of a video, through PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            context = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate
            return {
                "codec": context.name,
                "pix_fmt": context.pix_fmt,
                "frames": frames,
                "width": context.width,
                "height": context.height,
                "fps": float(rate) if rate else 0.0,
            }
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: {exc}") from exc
