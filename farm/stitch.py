"""Stitch a job's images into a video: animation frames, a walk, or a step capture.

Rows come from the manifest (``farm video``) or, at the end of an animate or walk job, from
the job's own tasks and the set of those done (``write_shot_videos``, which the driver calls
and whose results it records). Images are read one at a time, so a long clip never sits in
memory whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pyarrow import fs as pafs
from pyarrow.lib import ArrowException

from farm import manifest, storage
from farm.errors import FarmError
from farm.images import decode_rgb, fit_image
from farm.layout import animation_fps, image_relpath, video_name
from farm.motion import MotionError, flicker_compensated, motion_matrix
from farm.spec import DEFAULT_FPS, JobSpec, RenderTask, shots
from farm.video import VIDEO_SUFFIXES, VideoError, flicker, side_by_side, write_video

# Images in the order they were made: frames, then captured steps, then render order.
DEFAULT_ORDER = "frame NULLS LAST, step_index NULLS LAST, created_at, batch_index"


class StitchError(FarmError):
    """A selection that gives no video (no rows, two shots mixed, a bad option): one line for the user."""


@dataclass(frozen=True)
class VideoResult:
    path: str
    frames: int
    fps: float
    flicker: float  # mean absolute difference of consecutive frames, 0-255
    missing: tuple[str, ...] = ()  # images whose file is gone: left out of the video
    warnings: tuple[str, ...] = ()  # one line each, for stderr

    def summary(self) -> str:
        return f"wrote {self.path}: {self.frames} frames at {self.fps:g} fps, flicker {self.flicker:.2f}"


def read_image(filesystem: Any, base: str, relpath: str) -> np.ndarray:
    return decode_rgb(storage.read_bytes(filesystem, storage.join(base, relpath)))


def frames_with_flicker(images: Iterable[np.ndarray], totals: list[float]) -> Iterator[np.ndarray]:
    """Pass frames through, adding each consecutive pair's flicker to ``totals`` as they go."""
    previous = None
    for image in images:
        if previous is not None:
            totals.append(flicker([previous, image]))
        previous = image
        yield image


def write_job_video(
    filesystem: Any, base: str, relpaths: list[str], output: str, fps: float, sources: list[str] | None = None
) -> VideoResult:
    """Write the images at ``relpaths`` (in the job folder) as a video at ``output``.

    ``output`` is a local path or a pyarrow.fs URI (a job folder on S3 is written through a
    local temporary file). With ``sources``, each frame is shown to the right of its source
    image (an absolute local path).
    """
    if not relpaths:
        raise StitchError("no frames to write")
    pairs: list[float] = []  # the renders' flicker, not the source's beside them
    missing: list[str] = []
    found: list[int] = []  # the index of each frame read, the last one being the frame in hand

    def read_all() -> Iterator[np.ndarray]:
        for index, relpath in enumerate(relpaths):
            try:
                image = read_image(filesystem, base, relpath)
            except FileNotFoundError:  # a lost file costs its frame, not the video
                missing.append(relpath)
                continue
            found.append(index)
            yield image

    frames: Iterable[np.ndarray] = frames_with_flicker(read_all(), pairs)
    if sources is not None:  # each frame's own source, found by its index (frames may be left out)
        frames = (side_by_side(_read_local(sources[found[-1]]), image) for image in frames)
    out_filesystem, out_path = storage.open_root(output)
    try:
        if isinstance(out_filesystem, pafs.LocalFileSystem):
            count = write_video(frames, out_path, fps)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "video" + Path(out_path).suffix)
                count = write_video(frames, path, fps)
                storage.write_bytes(out_filesystem, out_path, Path(path).read_bytes())
    except VideoError as exc:
        if len(missing) == len(relpaths):
            raise StitchError(f"no image file is left of the {len(relpaths)} frames ({missing[0]}, ...)") from exc
        raise
    return VideoResult(output, count, fps, sum(pairs) / len(pairs) if pairs else 0.0, tuple(missing))


@dataclass
class ShotVideos:
    """What ``write_shot_videos`` wrote: each video's name (in the job folder) and flicker,
    and one line per video it could not write or wrote with frames missing."""

    videos: list[tuple[str, float]]
    errors: list[str]
    # per video, flicker once the motion is undone (motion.flicker_compensated); None without motion
    compensated: list[float | None] = field(default_factory=list)


def write_shot_videos(spec: JobSpec, root: str, tasks: Iterable[RenderTask], done: set[str]) -> ShotVideos:
    """An animation's shots, each of its frames done in order, as OUT/<job>/<job>.mp4
    (<job>-shot<N>.mp4 for several). ``tasks`` are the job's tasks, ``done`` the ids with ok rows.

    A video that cannot be written is an error line, not an exception: the frames are safe
    and `farm video` can write it again.
    """
    result = ShotVideos([], [])
    if spec.animation is None:  # only animate and walk jobs have shots
        return result
    filesystem, base = storage.open_root(root)
    count = spec.count() // spec.frames_per_shot
    for index, shot in enumerate(shots(spec, tasks)):
        frames = [image_relpath(t.task_id) for t in shot if t.task_id in done]
        if not frames:
            continue
        name = video_name(spec.name, index, count)
        try:
            video = write_job_video(filesystem, base, frames, storage.join(root, name), spec.animation.fps)
        except (StitchError, VideoError, OSError, ArrowException) as exc:
            result.errors.append(f"{name}: not written: {exc}")
            continue
        result.videos.append((name, video.flicker))
        result.compensated.append(
            shot_flicker_compensated(filesystem, base, shot) if len(frames) == len(shot) else None
        )
        if len(frames) < len(shot):
            result.errors.append(f"{name}: {len(frames)} of {len(shot)} frames ({len(shot) - len(frames)} failed)")
        if video.missing:
            result.errors.append(f"{name}: {manifest.missing_warning(root, list(video.missing))}")
    return result


def shot_flicker_compensated(filesystem: Any, base: str, shot: list[RenderTask]) -> float | None:
    """A shot's flicker once its motion is undone: each frame against the one before moved along the
    source clip's optical flow (an animate job) or by the frame's 2D motion; None for a walk."""
    if len(shot) < 2 or not (shot[0].init_image or shot[-1].motion is not None):
        return None
    try:
        frames = [read_image(filesystem, base, image_relpath(t.task_id)) for t in shot]
        if shot[0].init_image:
            sources = [fit_image(Path(t.init_image).read_bytes(), t.width, t.height) for t in shot]  # type: ignore[arg-type]
            return flicker_compensated(frames, sources=sources, method=shot[-1].flow or "farneback")
        motions = [motion_matrix(t.width, t.height, *t.motion) for t in shot[1:]]  # type: ignore[misc]
        return flicker_compensated(frames, motions=motions)
    except (OSError, ValueError, MotionError):  # a frame or source gone since: the raw figure stands alone
        return None


def _read_local(path: str) -> np.ndarray:
    try:
        return decode_rgb(Path(path).read_bytes())
    except OSError as exc:
        raise StitchError(f"--side-by-side: cannot read source frame {path} ({exc})") from exc


def select_rows(job_root: str, where: str | None, order: str | None) -> list[dict[str, Any]]:
    """The ok rows to stitch, in order: images (or, with ``where``, any rows it picks) by frame."""
    import duckdb

    manifest.open_job(job_root)  # a missing or non-job folder: a one-line ManifestError
    columns = [name for name, _, _ in manifest.COLUMNS]
    if order is not None and order not in columns:
        raise StitchError(f"--order: unknown column {order!r}; expected one of {', '.join(columns)}")
    condition = f"{manifest.OK} AND ({where})" if where and where.strip() else manifest.OK_IMAGES
    sql = (
        f"SELECT image_path, init_image, frame, capture, step_index, task_id FROM {manifest.TABLE_NAME} "
        f"WHERE {condition} ORDER BY {order or DEFAULT_ORDER}"
    )
    try:
        rows = manifest.query(job_root, sql).to_pylist()
    except duckdb.Error as exc:
        raise StitchError(f"--where: {str(exc).splitlines()[0]}") from exc
    if not rows:
        raise StitchError(f"{job_root}: no ok images" + (f" matching --where {where!r}" if where else ""))
    if order is None:
        _refuse_mixed(rows)
    return rows


def _refuse_mixed(rows: list[dict[str, Any]]) -> None:
    """Frames of two shots, or steps of two captures, would interleave: ask for one."""
    for key, hint in (("frame", "seed = 1"), ("step_index", "task_id = '...' AND capture = 'x0'")):
        values = [(r["capture"], r[key]) for r in rows if r[key] is not None]
        if len(values) != len(set(values)):
            what = "shots" if key == "frame" else "captured runs"
            raise StitchError(
                f'the rows hold several {what} ({key} repeats); pick one with --where, e.g. --where "{hint}"'
            )


def stitch(
    job_root: str,
    output: str | None = None,
    fps: float | None = None,
    order: str | None = None,
    where: str | None = None,
    sides: bool = False,
) -> VideoResult:
    """``farm video``: the job's ok images (by frame, else step, else render order) into one video."""
    filesystem, base = manifest.open_job(job_root)
    output = output or storage.join(storage.normalise_root(job_root), Path(base).name + ".mp4")
    if Path(output).suffix.lower() not in VIDEO_SUFFIXES:
        raise StitchError(f"--output: {output}: expected one of {', '.join(VIDEO_SUFFIXES)}")
    rows = select_rows(job_root, where, order)
    sources = None
    if sides:
        sources = [r["init_image"] for r in rows]
        if any(s is None for s in sources):
            raise StitchError("--side-by-side: some rows have no init_image (source frame) to show")
    fps = fps or animation_fps(job_root) or DEFAULT_FPS
    try:
        result = write_job_video(filesystem, base, [r["image_path"] for r in rows], output, fps, sources)
    except VideoError as exc:
        raise StitchError(str(exc)) from exc
    if result.missing:
        result = replace(result, warnings=(manifest.missing_warning(job_root, list(result.missing)),))
    return result
