"""A batch's image inputs, read for the actor: init images, and the frames a chained animation
frame blends in. Plain functions, no Ray, no torch; each failure is noted against its task.

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
from farm.spec import RenderTask
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
            if image is not None:
                images[task.task_id] = image
    return images


def read_init_image(task: RenderTask, filesystem: FileSystem, base: str, errors: dict[str, str]) -> np.ndarray | None:
    """The task's init image fitted to its size (a chained frame's blended in), or None with the error noted."""
    try:
        with open(task.init_image, "rb") as f:  # type: ignore[arg-type]
            data = f.read()
        if sha256_bytes(data) != task.init_image_sha256:
            raise ValueError("the file changed since the job was read (its sha256 differs); rerun the job")
        image = fit_image(data, task.width, task.height)
    except (OSError, ValueError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        errors[task.task_id] = f"init_image: {task.init_image}: {message}"
        return None
    if task.previous is None:
        return image
    return chain_init_image(task, image, filesystem, base, errors)


def chain_init_image(
    task: RenderTask, source: np.ndarray, filesystem: FileSystem, base: str, errors: dict[str, str]
) -> np.ndarray | None:
    """``source`` blended with the previous frame's image, then matched to the reference's colours."""
    try:
        image = blend_images(source, read_output(task.previous, task, filesystem, base), task.blend)  # type: ignore[arg-type]
        if task.color_reference:
            image = match_colors(image, read_output(task.color_reference, task, filesystem, base))
        return image
    except (OSError, ValueError) as exc:
        errors[task.task_id] = str(exc)
        return None


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
