"""A batch's image inputs, read for the actor: init images, and the frames a chained animation
frame blends in (warped along the source's optical flow, or by a 2D-motion frame's camera move).
Plain functions, no Ray, no torch; each failure is noted against its task.

A chained animation frame's init image is its source frame blended with the frame rendered
before it, then matched to frame 0's colours (docs/animation.md); those frames are read from
the job's own folder (``filesystem``/``base`` as ``storage.open_root`` gives them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from farm import storage
from farm.images import decode_rgb, fit_image, sha256_bytes
from farm.layout import image_relpath
from farm.motion import MotionError, align_to_source, canny, motion_matrix, warp_affine
from farm.spec import ControlNetUnit, RenderTask
from farm.video import blend_images, match_colors

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem


def read_init_images(
    tasks: Iterable[RenderTask], filesystem: FileSystem, base: str, errors: dict[str, str]
) -> dict[str, np.ndarray]:
    """task_id -> init image (fitted to the task's size) for each task that has one; a task whose
    init image cannot be used is left out, its message noted in ``errors``."""
    images = {}
    for task in tasks:
        if task.init_image:
            image = read_init_image(task, filesystem, base, errors)
        elif task.motion is not None:
            image = read_motion_image(task, filesystem, base, errors)
        else:
            continue
        if image is not None:
            images[task.task_id] = image
    return images


def read_control_images(tasks: Iterable[RenderTask], errors: dict[str, str]) -> dict[str, list[np.ndarray]]:
    """task_id -> each ControlNet's control image, fitted to the task's size and preprocessed (canny),
    for each task that has ControlNets; a task whose image cannot be used is noted in ``errors``."""
    images: dict[str, list[np.ndarray]] = {}
    for task in tasks:
        if not task.controlnet or task.task_id in errors:
            continue
        try:
            images[task.task_id] = [read_control_image(task, unit) for unit in task.controlnet]
        except ValueError as exc:
            errors[task.task_id] = str(exc)
    return images


def read_control_image(task: RenderTask, unit: ControlNetUnit) -> np.ndarray:
    """One control image: its file (checked against the recorded sha256), fitted, then preprocessed."""
    where = f"controlnet[{task.controlnet.index(unit)}].image"
    image = read_input_image(unit.image, unit.image_sha256, task.width, task.height, where)
    if unit.preprocess == "canny":
        return canny(image, unit.low_threshold, unit.high_threshold)
    return image


def read_motion_image(task: RenderTask, filesystem: FileSystem, base: str, errors: dict[str, str]) -> np.ndarray | None:
    """A 2D-motion frame's init image: the frame before, warped by this frame's zoom, angle and
    translation (Deforum's 2D mode), then matched to the reference's colours."""
    try:
        previous = read_output(task.previous, task, filesystem, base)  # type: ignore[arg-type]
        image = warp_affine(previous, motion_matrix(task.width, task.height, *task.motion))  # type: ignore[misc]
        if task.color_reference:
            image = match_colors(image, read_output(task.color_reference, task, filesystem, base))
        return image
    except (ValueError, MotionError) as exc:
        errors[task.task_id] = str(exc)
        return None


def read_input_image(path: str, sha256: str | None, width: int, height: int, where: str) -> np.ndarray:
    """An input image file (checked against the sha256 the job recorded) fitted to the task's size;
    ValueError "<where>: <path>: <why>" when it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if sha256_bytes(data) != sha256:
            raise ValueError("the file changed since the job was read (its sha256 differs); rerun the job")
        return fit_image(data, width, height)
    except (OSError, ValueError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{where}: {path}: {message}") from exc


def read_init_image(task: RenderTask, filesystem: FileSystem, base: str, errors: dict[str, str]) -> np.ndarray | None:
    """The task's init image fitted to its size (a chained frame's blended in), or None with the error noted."""
    try:
        image = read_input_image(task.init_image, task.init_image_sha256, task.width, task.height, "init_image")  # type: ignore[arg-type]
    except ValueError as exc:
        errors[task.task_id] = str(exc)
        return None
    if task.previous is None:
        return image
    return chain_init_image(task, image, filesystem, base, errors)


def chain_init_image(
    task: RenderTask, source: np.ndarray, filesystem: FileSystem, base: str, errors: dict[str, str]
) -> np.ndarray | None:
    """``source`` blended with the previous frame's image (first warped along the source's optical
    flow, with ``flow``), then matched to the reference's colours."""
    try:
        previous = read_output(task.previous, task, filesystem, base)  # type: ignore[arg-type]
        if task.flow:
            previous = align_to_source(previous, read_flow_source(task), source, task.flow)
        image = blend_images(source, previous, task.blend)
        if task.color_reference:
            image = match_colors(image, read_output(task.color_reference, task, filesystem, base))
        return image
    except (OSError, ValueError, MotionError) as exc:
        errors[task.task_id] = str(exc)
        return None


def read_flow_source(task: RenderTask) -> np.ndarray:
    """The source frame before this one (where the optical flow starts), fitted to the task's size."""
    try:
        with open(task.flow_from, "rb") as f:  # type: ignore[arg-type]
            return fit_image(f.read(), task.width, task.height)
    except OSError as exc:
        raise ValueError(f"flow: cannot read the source frame before, {task.flow_from}: {exc.strerror or exc}") from exc


def read_output(task_id: str, task: RenderTask, filesystem: FileSystem, base: str) -> np.ndarray:
    """The image another task of this job wrote (a chained frame reads the one before it)."""
    path = storage.join(base, image_relpath(task_id))
    try:
        data = storage.read_bytes(filesystem, path)
    except (OSError, FileNotFoundError) as exc:
        raise ValueError(f"frame {task.frame}: the image of {task_id} is missing (did that frame fail?)") from exc
    pixels = decode_rgb(data)
    if pixels.shape[:2] != (task.height, task.width):
        raise ValueError(f"frame {task.frame}: {task_id}'s image is {pixels.shape[1]}x{pixels.shape[0]}")
    return pixels
