"""Pictures made of a job's images: X/Y plots and contact sheets (videos are farm/video.py and farm/stitch.py).

Pure functions over PIL images and the manifest: no Ray, no torch. Images are read through
``farm.storage``, so a job folder may be a ``pyarrow.fs`` URI.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from farm import manifest, storage
from farm.errors import FarmError
from farm.images import open_rgb

# The longest side of a plot or sheet, in pixels. A 100 x 100 sweep of 512 px images would
# be 51200 px a side (7.5 GiB of RGB); cells are shrunk before they are pasted, so neither
# the file nor the canvas in memory grows past this.
MAX_SIDE = 4096

# The X/Y plot's margins, in pixels (never scaled, so labels stay legible on big grids):
TITLE_HEIGHT = 32  # the title line (the prompt) across the top
LABEL_HEIGHT = 24  # the "x = value" band under the title
LABEL_WIDTH = 120  # the "y = value" band down the left, at least
MAX_LABEL_WIDTH = 360  # ... widened to fit its longest label (a prompt axis) up to this
FONT_SIZE = 14
TITLE_FONT_SIZE = 18
PADDING = 4
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
EMPTY_COLOUR = (128, 128, 128)  # a cell with no image

# Image rows only: ok, and not a captured step frame.


class SheetError(FarmError, ValueError):
    """A bad option, a --where that fails or matches nothing: one line for the user."""


@dataclass
class PlotInfo:
    """What an X/Y plot holds: its axes, how many cells got an image, its size in pixels."""

    x: str
    y: str
    x_values: list[Any]
    y_values: list[Any]
    cells: int
    filled: int
    overlaps: int  # cells that several rows matched; each shows the first by task_id
    size: tuple[int, int]
    prompts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # image files gone: their cells are empty
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr

    def summary(self, path: str) -> str:
        line = (
            f"wrote {path}: {len(self.x_values)} x {len(self.y_values)} cells ({self.x} x {self.y}), "
            f"{self.size[0]}x{self.size[1]} px"
        )
        if self.filled < self.cells:
            line += f", {self.cells - self.filled} empty"
        if self.overlaps:
            line += f", {self.overlaps} with several images (first by task_id shown)"
        return line


@dataclass
class SheetInfo:
    """What a contact sheet holds: its image count, and the images left out (their files gone)."""

    images: int
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr

    def summary(self, path: str, size: tuple[int, int]) -> str:
        return f"wrote {path}: {self.images} images, {size[0]}x{size[1]} px"


def image_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste images in row-major order on a rows x cols grid; every cell the first image's size
    (others are resized to it). Cells left over are grey."""
    if not images:
        raise ValueError("image_grid: no images")
    if rows < 1 or cols < 1 or len(images) > rows * cols:
        raise ValueError(f"image_grid: {len(images)} images do not fit {rows} x {cols}")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), EMPTY_COLOUR)
    for i, image in enumerate(images):
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        grid.paste(image.convert("RGB"), box=(i % cols * w, i // cols * h))
    return grid


def xy_plot(
    job_root: str, x: str, y: str, where: str | None = None, max_side: int = MAX_SIDE
) -> tuple[Image.Image, PlotInfo]:
    """An X/Y plot of a job's ok images: distinct ``x`` values (sorted) along the top, ``y``
    down the left, the prompt as the title; cells shrunk so the longer side is <= max_side."""
    for option, column in (("--x", x), ("--y", y)):
        if column not in _column_names():
            raise SheetError(f"{option} {column}: not a manifest column (see the column table in docs/manifest.md)")
    rows = _rows(job_root, f'task_id, prompt, image_path, "{x}" AS x_value, "{y}" AS y_value', where, "task_id")
    x_values = _distinct(r["x_value"] for r in rows)
    y_values = _distinct(r["y_value"] for r in rows)
    chosen: dict[tuple[int, int], dict] = {}
    counts: dict[tuple[int, int], int] = {}
    for r in rows:  # ordered by task_id: the first one found is the one shown
        key = (x_values.index(r["x_value"]), y_values.index(r["y_value"]))
        chosen.setdefault(key, r)
        counts[key] = counts.get(key, 0) + 1
    prompts = sorted({r["prompt"] for r in rows})

    filesystem, base = storage.open_root(job_root)
    missing: list[str] = []
    first_row, first = _first_image(job_root, filesystem, base, list(chosen.values()), missing)
    nx, ny = len(x_values), len(y_values)
    font, title_font = _font(FONT_SIZE), _font(TITLE_FONT_SIZE)
    y_labels = [f"{y} = {cell_label(value)}" for value in y_values]
    longest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font) for label in y_labels)
    left = max(LABEL_WIDTH, min(MAX_LABEL_WIDTH, math.ceil(longest) + 2 * PADDING))
    cell = _cell_size(first.size, nx, ny, max_side - left, max_side - TITLE_HEIGHT - LABEL_HEIGHT)
    cw, ch = cell
    top = TITLE_HEIGHT + LABEL_HEIGHT
    canvas = Image.new("RGB", (left + nx * cw, top + ny * ch), BACKGROUND)
    filled = 0
    for i in range(nx):
        for j in range(ny):
            box = (left + i * cw, top + j * ch)
            row = chosen.get((i, j))
            image = None
            if row is not None:  # images are read one at a time: a big plot never holds them all
                image = first if row is first_row else _load(filesystem, base, row["image_path"], missing)
            if image is None:  # no row, or its file is gone
                canvas.paste(Image.new("RGB", cell, EMPTY_COLOUR), box)
                continue
            canvas.paste(_fit(image, cell), box)
            filled += 1

    draw = ImageDraw.Draw(canvas)
    title = prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts"
    _text(draw, title, title_font, (0, 0, canvas.width, TITLE_HEIGHT), centre=True)
    for i, value in enumerate(x_values):
        area = (left + i * cw, TITLE_HEIGHT, left + (i + 1) * cw, top)
        # A narrow cell gets the bare value: "7.5" reads better than "guidan...".
        fits = draw.textlength(f"{x} = {cell_label(value)}", font=font) <= cw - 2 * PADDING
        _text(draw, f"{x} = {cell_label(value)}" if fits else cell_label(value), font, area, centre=True)
    for j, label in enumerate(y_labels):
        _text(draw, label, font, (0, top + j * ch, left, top + (j + 1) * ch), centre=False)

    info = PlotInfo(
        x=x,
        y=y,
        x_values=x_values,
        y_values=y_values,
        cells=nx * ny,
        filled=filled,
        overlaps=sum(1 for n in counts.values() if n > 1),
        size=canvas.size,
        prompts=prompts,
        missing=missing,
        warnings=[manifest.missing_warning(job_root, missing)] if missing else [],
    )
    return canvas, info


def contact_sheet(
    job_root: str, where: str | None = None, columns: int | None = None, max_side: int = MAX_SIDE
) -> tuple[Image.Image, SheetInfo]:
    """A plain grid of a job's ok images in render order (created_at, batch, position in it):
    ``columns`` across (default ceil(sqrt(n)), at most n); returns the sheet and what it holds.
    An image whose file is gone is left out, with a warning."""
    if columns is not None and columns < 1:
        raise SheetError(f"--columns {columns}: expected 1 or more")
    rows = _rows(job_root, "task_id, image_path", where, "created_at, batch_id, batch_index, task_id")
    filesystem, base = storage.open_root(job_root)
    missing: list[str] = []
    first_row, first = _first_image(job_root, filesystem, base, rows, missing)
    cols = min(columns or math.ceil(math.sqrt(len(rows))), len(rows))
    cell = _cell_size(first.size, cols, math.ceil(len(rows) / cols), max_side, max_side)
    images = [_fit(first, cell)]  # shrunk as they are read, so the list stays within the cap
    for row in rows:  # those before the first are missing: the order holds
        if row is not first_row and (image := _load(filesystem, base, row["image_path"], missing)) is not None:
            images.append(_fit(image, cell))
    n = len(images)  # fewer when files are missing: laid out again, cells keep their size
    cols = min(columns or math.ceil(math.sqrt(n)), n)
    info = SheetInfo(n, missing, [manifest.missing_warning(job_root, missing)] if missing else [])
    return image_grid(images, math.ceil(n / cols), cols), info


# ---------------------------------------------------------------------------------------


def _column_names() -> list[str]:
    return [name for name, _, _ in manifest.COLUMNS]


def _rows(job_root: str, select: str, where: str | None, order: str) -> list[dict]:
    """The job's ok image rows matching ``where``; SheetError when it fails or matches none."""
    import duckdb

    manifest.open_job(job_root)  # a missing or non-job folder: a one-line ManifestError
    condition = manifest.OK_IMAGES + (f" AND ({where})" if where and where.strip() else "")
    sql = f"SELECT {select} FROM {manifest.TABLE_NAME} WHERE {condition} ORDER BY {order}"
    try:
        rows = manifest.query(job_root, sql).to_pylist()
    except duckdb.Error as exc:
        raise SheetError(f"--where: {str(exc).splitlines()[0]}") from exc
    if not rows:
        scope = f" matching --where {where!r}" if where else ""
        raise SheetError(f"{job_root}: no ok images{scope}")
    return rows


def _distinct(values) -> list[Any]:
    """Distinct values, sorted; nulls last."""
    return sorted(set(values), key=lambda v: (v is None, v if v is not None else 0))


def cell_label(value: Any) -> str:
    """A column value as an X/Y plot labels it; a LoRA or ControlNet list (JSON text) as each entry's
    weight (a ControlNet's scale) and file name, weight first so a narrow cell still shows it."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and value.startswith("[{"):
        return entry_labels(value) or value
    return str(value)


def entry_labels(text: str) -> str | None:
    """``0.5 tiny-style, 1 other`` for a JSON list of {path or model, weight or scale}; None for other JSON."""
    try:
        entries = json.loads(text)
    except ValueError:
        return None
    parts = []
    for entry in entries if isinstance(entries, list) else [None]:
        name = entry.get("path") or entry.get("model") if isinstance(entry, dict) else None
        amount = entry.get("weight", entry.get("scale")) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(amount, int | float):
            return None
        parts.append(f"{amount:g} {PurePosixPath(name).stem}")
    return ", ".join(parts)


def _load(filesystem, base: str, image_path: str, missing: list[str]) -> Image.Image | None:
    """An image of the job, or None (and its path added to ``missing``) when its file is gone."""
    if image_path in missing:
        return None
    try:
        data = storage.read_bytes(filesystem, storage.join(base, image_path))
    except FileNotFoundError:
        missing.append(image_path)
        return None
    return open_rgb(data)


def _first_image(
    job_root: str, filesystem, base: str, rows: list[dict], missing: list[str]
) -> tuple[dict, Image.Image]:
    """The first row whose image can be read, and the image (its size sets the cells)."""
    for row in rows:
        if (image := _load(filesystem, base, row["image_path"], missing)) is not None:
            return row, image
    raise SheetError(
        f"{job_root}: no image file is left of the {len(rows)} ok rows ({missing[0]}, ...); "
        f"`farm verify --repair {job_root}` renders them again"
    )


def _cell_size(size: tuple[int, int], nx: int, ny: int, room_x: int, room_y: int) -> tuple[int, int]:
    """The first image's size, shrunk (keeping its aspect) so nx x ny cells fit the room left."""
    w, h = size
    scale = min(1.0, room_x / (nx * w), room_y / (ny * h))
    cw, ch = math.floor(w * scale), math.floor(h * scale)
    if cw < 1 or ch < 1:
        raise SheetError(f"{nx} x {ny} cells do not fit in {room_x} x {room_y} px: raise the size cap")
    return cw, ch


def _fit(image: Image.Image, cell: tuple[int, int]) -> Image.Image:
    return image if image.size == cell else image.resize(cell, Image.Resampling.LANCZOS)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 has a scalable default font
    except TypeError:
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, text: str, font, area: tuple[int, int, int, int], centre: bool) -> None:
    """Draw one line in ``area`` (x0, y0, x1, y1), shortened with an ellipsis to fit its width."""
    x0, y0, x1, y1 = area
    room = x1 - x0 - 2 * PADDING
    if room <= 0:
        return
    full = text
    for keep in range(len(full), -1, -1):
        text = full if keep == len(full) else full[:keep].rstrip() + "..."
        if draw.textlength(text, font=font) <= room:
            break
    else:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = x0 + (x1 - x0 - (right - left)) // 2 - left if centre else x0 + PADDING - left
    y = y0 + (y1 - y0 - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=TEXT_COLOUR, font=font)
