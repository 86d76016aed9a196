"""farm grid / farm sheet (farm.sheets): X/Y plots and contact sheets over hand-made jobs (no Ray, no torch)."""

from __future__ import annotations

import hashlib
import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from farm.cli import main
from farm.manifest import ManifestError, base_row, write_part
from farm.sheets import (
    LABEL_HEIGHT,
    LABEL_WIDTH,
    MAX_LABEL_WIDTH,
    TITLE_HEIGHT,
    SheetError,
    cell_label,
    contact_sheet,
    image_grid,
    xy_plot,
)
from farm.spec import Batch, RenderTask

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
GUIDANCES = [7.5, 3.0, 5.0]  # written unsorted: the plot must sort them
SEEDS = [4, 1, 3, 2]
SIZE = 64


def colour(guidance: float, seed: int) -> tuple[int, int, int]:
    """A distinct solid colour per (guidance, seed)."""
    return (int(guidance * 20), seed * 50, 200 - seed * 10)


def write_image(job: str, row: dict, rgb: tuple[int, int, int]) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), rgb).save(buffer, format="PNG")
    path = Path(job) / row["image_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    row["image_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()


def make_job(root: Path, name: str = "job", prompt: str = "a cat", guidances=GUIDANCES, seeds=SEEDS) -> str:
    """One batch per guidance, seeds in it; each image a solid colour; plus a failed row and a step frame."""
    job = str(root / name)
    for minute, guidance in enumerate(guidances):
        tasks = [RenderTask("tiny", "euler", prompt, "", s, 2, guidance, SIZE, SIZE) for s in seeds]
        batch = Batch.of(tasks)
        rows = []
        for index, task in enumerate(tasks):
            row = base_row(name, task, batch, index)
            row.update(status="ok", created_at=T0 + timedelta(minutes=minute), seconds=0.5)
            write_image(job, row, colour(guidance, task.seed))
            rows.append(row)
        write_part(job, rows)
    # Rows the plot must ignore: a failed task and a captured step frame (both with a black "image").
    task = RenderTask("tiny", "euler", prompt, "", 99, 2, 9.0, SIZE, SIZE)
    failed = base_row(name, task, Batch.of([task]), 0)
    failed.update(status="failed", error="boom", created_at=T0)
    frame = {**rows[0], "capture": "latents", "step_index": 0, "image_path": "frames/x/latents-0000.png"}
    write_image(job, frame, (0, 0, 0))
    write_part(job, [failed, frame])
    return job


def cell_centre(info, i: int, j: int, cell: tuple[int, int]) -> tuple[int, int]:
    cw, ch = cell
    return LABEL_WIDTH + i * cw + cw // 2, TITLE_HEIGHT + LABEL_HEIGHT + j * ch + ch // 2


# ---------------------------------------------------------------------------------------
# image_grid


def test_image_grid_pastes_row_major_in_first_image_size():
    images = [Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(5)]
    images[4] = Image.new("RGB", (20, 20), (200, 0, 0))  # resized to the first image's size
    grid = image_grid(images, rows=2, cols=3)
    assert grid.size == (30, 16)
    assert grid.getpixel((5 + 10 * 1, 4)) == (40, 0, 0)  # row 0, col 1
    assert grid.getpixel((5 + 10 * 0, 4 + 8)) == (120, 0, 0)  # row 1, col 0: image 3
    assert grid.getpixel((5 + 10 * 1, 4 + 8)) == (200, 0, 0)
    with pytest.raises(ValueError):
        image_grid(images, rows=2, cols=2)


# ---------------------------------------------------------------------------------------
# xy_plot


def test_xy_plot_size_and_cell_count(tmp_path: Path):
    job = make_job(tmp_path)
    image, info = xy_plot(job, "guidance", "seed")
    assert info.cells == 12 and info.filled == 12 and info.overlaps == 0
    assert info.x_values == sorted(GUIDANCES) and info.y_values == sorted(SEEDS)
    expected = (LABEL_WIDTH + 3 * SIZE, TITLE_HEIGHT + LABEL_HEIGHT + 4 * SIZE)
    assert image.size == expected == info.size
    assert info.prompts == ["a cat"]


def test_xy_plot_cells_hold_the_image_at_x_and_y(tmp_path: Path):
    job = make_job(tmp_path)
    image, info = xy_plot(job, "guidance", "seed")
    for i, guidance in enumerate(info.x_values):
        for j, seed in enumerate(info.y_values):
            assert image.getpixel(cell_centre(info, i, j, (SIZE, SIZE))) == colour(guidance, seed), (guidance, seed)
    # Swapping the axes transposes the plot.
    swapped, info2 = xy_plot(job, "seed", "guidance")
    assert swapped.getpixel(cell_centre(info2, 1, 2, (SIZE, SIZE))) == colour(info2.y_values[2], info2.x_values[1])


def test_xy_plot_draws_labels_and_title_in_the_margins(tmp_path: Path):
    job = make_job(tmp_path)
    image, _ = xy_plot(job, "guidance", "seed")
    top = image.crop((LABEL_WIDTH, TITLE_HEIGHT, image.width, TITLE_HEIGHT + LABEL_HEIGHT))
    left = image.crop((0, TITLE_HEIGHT + LABEL_HEIGHT, LABEL_WIDTH, image.height))
    title = image.crop((0, 0, image.width, TITLE_HEIGHT))
    for band in (top, left, title):
        assert band.getextrema()[0][0] < 100  # some dark text pixels on the white band


def test_xy_plot_widens_the_left_band_to_fit_a_prompt_axis(tmp_path: Path):
    long_prompt = "a small purple triangle on a yellow background, bottom right"
    make_job(tmp_path, "a", prompt="a cat", guidances=[5.0])
    job = make_job(tmp_path, "a", prompt=long_prompt, guidances=[5.0])  # the same job folder, a second prompt
    image, info = xy_plot(job, "seed", "prompt")
    assert info.y_values == sorted(["a cat", long_prompt])
    left = image.width - 4 * SIZE  # the band is what the four seed columns leave
    assert LABEL_WIDTH < left <= MAX_LABEL_WIDTH
    # The long label is written whole: dark pixels run to near the band's right edge, none past it into the cells.
    band = np.asarray(image.crop((0, TITLE_HEIGHT + LABEL_HEIGHT, left, image.height)).convert("L"))
    dark_columns = np.nonzero((band < 100).any(axis=0))[0]
    assert dark_columns.max() > left - 40
    for i, seed in enumerate(info.x_values):  # the cells sit right of the band, in place
        cell = (left + i * SIZE + SIZE // 2, TITLE_HEIGHT + LABEL_HEIGHT + SIZE // 2)
        assert image.getpixel(cell) == colour(5.0, seed)


def test_xy_plot_downscales_under_max_side(tmp_path: Path):
    job = make_job(tmp_path)
    image, info = xy_plot(job, "guidance", "seed", max_side=200)
    assert max(image.size) <= 200
    assert image.size == info.size
    # Square cells shrink to what the tighter side leaves beside the (unscaled) margins.
    cell = min((200 - LABEL_WIDTH) // 3, (200 - TITLE_HEIGHT - LABEL_HEIGHT) // 4)
    assert cell < SIZE
    assert image.size == (LABEL_WIDTH + 3 * cell, TITLE_HEIGHT + LABEL_HEIGHT + 4 * cell)
    # The last cell holds the largest x and the largest y.
    assert image.getpixel(cell_centre(info, 2, 3, (cell, cell))) == colour(7.5, 4)


def test_xy_plot_where_restricts_cells_and_empty_cells_are_grey(tmp_path: Path):
    job = make_job(tmp_path)
    _, info = xy_plot(job, "guidance", "seed", where="seed < 3")
    assert info.y_values == [1, 2] and info.cells == 6 and info.filled == 6
    # A missing pair leaves a grey cell.
    image, info = xy_plot(job, "guidance", "seed", where="NOT (guidance = 3.0 AND seed = 2)")
    assert info.cells == 12 and info.filled == 11
    assert image.getpixel(cell_centre(info, 0, 1, (SIZE, SIZE))) == (128, 128, 128)


def test_xy_plot_overlaps_and_several_prompts(tmp_path: Path):
    job = make_job(tmp_path, prompt="a cat")
    make_job(tmp_path, prompt="a dog")  # same job folder name: the same cells again, other prompt
    image, info = xy_plot(job, "guidance", "seed")
    assert info.cells == 12 and info.overlaps == 12
    assert info.prompts == ["a cat", "a dog"]


def test_xy_plot_errors(tmp_path: Path):
    job = make_job(tmp_path)
    with pytest.raises(SheetError, match="--x guidence"):
        xy_plot(job, "guidence", "seed")
    with pytest.raises(SheetError, match="--y"):
        xy_plot(job, "seed", "nope; DROP TABLE manifest")
    with pytest.raises(SheetError, match="no ok images"):
        xy_plot(job, "guidance", "seed", where="seed > 100")
    with pytest.raises(SheetError, match="--where"):
        xy_plot(job, "guidance", "seed", where="sed < 3")
    with pytest.raises(ManifestError):
        xy_plot(str(tmp_path / "missing"), "guidance", "seed")


# ---------------------------------------------------------------------------------------
# contact_sheet


@pytest.mark.parametrize(
    ("where", "columns", "n", "grid"),
    [(None, None, 12, (4, 3)), (None, 5, 12, (5, 3)), ("seed < 3", None, 6, (3, 2)), ("seed = 1", 4, 3, (3, 1))],
)
def test_contact_sheet_size(tmp_path: Path, where, columns, n, grid):
    job = make_job(tmp_path)
    image, info = contact_sheet(job, where=where, columns=columns)
    assert info.images == n and info.missing == info.warnings == []
    assert image.size == (grid[0] * SIZE, grid[1] * SIZE)


def test_contact_sheet_is_in_render_order_and_capped(tmp_path: Path):
    job = make_job(tmp_path)
    image, _ = contact_sheet(job, columns=4)
    # Row r is the batch of guidance GUIDANCES[r] (its created_at), seeds in batch order.
    for r, guidance in enumerate(GUIDANCES):
        for c, seed in enumerate(SEEDS):
            assert image.getpixel((c * SIZE + 32, r * SIZE + 32)) == colour(guidance, seed)
    small, _ = contact_sheet(job, columns=4, max_side=100)
    assert max(small.size) <= 100 and small.size == (4 * 25, 3 * 25)
    with pytest.raises(SheetError, match="no ok images"):
        contact_sheet(job, where="seed > 100")


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_grid_writes_the_file_and_prints_one_line(tmp_path: Path):
    job = make_job(tmp_path)
    out = tmp_path / "plots" / "plot.png"
    result = CliRunner().invoke(main, ["grid", job, "--x", "guidance", "--y", "seed", "-o", str(out)])
    assert result.exit_code == 0, result.output
    width, height = LABEL_WIDTH + 3 * SIZE, TITLE_HEIGHT + LABEL_HEIGHT + 4 * SIZE
    assert result.output == f"wrote {out}: 3 x 4 cells (guidance x seed), {width}x{height} px\n"
    with Image.open(out) as image:
        assert image.size == (width, height)


def test_cli_grid_default_name_in_current_folder(tmp_path: Path, monkeypatch):
    job = make_job(tmp_path, name="demo")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["grid", job, "--x", "seed", "--y", "guidance", "--where", "seed < 3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote demo-grid.png: 2 x 3 cells (seed x guidance)")
    assert (tmp_path / "demo-grid.png").is_file()


def test_cli_sheet_writes_the_file(tmp_path: Path):
    job = make_job(tmp_path)
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(main, ["sheet", job, "--where", "seed < 3", "--columns", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}: 6 images, {2 * SIZE}x{3 * SIZE} px\n"
    with Image.open(out) as image:
        assert image.size == (2 * SIZE, 3 * SIZE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grid", "JOB", "--x", "guidence", "--y", "seed"], "--x guidence: not a manifest column"),
        (["grid", "JOB", "--x", "guidance", "--y", "seed", "--where", "seed >"], "--where:"),
        (["sheet", "JOB", "--where", "seed > 100"], "no ok images"),
        (["sheet", "MISSING"], "no such folder"),
    ],
)
def test_cli_errors_exit_2_with_one_line(tmp_path: Path, args, message):
    job = make_job(tmp_path)
    args = [job if a == "JOB" else str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert result.output.startswith("error: ")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------
# Missing image files


def image_of(job: str, guidance: float, seed: int) -> Path:
    from farm.manifest import query

    sql = f"SELECT image_path FROM manifest WHERE capture IS NULL AND guidance = {guidance} AND seed = {seed}"
    return Path(job) / query(job, sql).column("image_path")[0].as_py()


def test_a_missing_image_is_an_empty_cell_and_a_warning_not_a_failure(tmp_path: Path):
    job = make_job(tmp_path)
    gone = [image_of(job, 3.0, 1), image_of(job, 7.5, 4)]  # 3.0/1 is the plot's first cell
    for path in gone:
        path.unlink()
    image, info = xy_plot(job, "guidance", "seed")
    assert (info.cells, info.filled) == (12, 10)
    assert sorted(info.missing) == sorted(p.relative_to(job).as_posix() for p in gone)
    (warning,) = info.warnings
    assert warning.startswith("left out 2 images whose file is missing") and f"farm verify --repair {job}" in warning
    assert image.getpixel(cell_centre(info, 0, 0, (SIZE, SIZE))) == (128, 128, 128)
    assert image.getpixel(cell_centre(info, 1, 0, (SIZE, SIZE))) == colour(5.0, 1)
    sheet, sheet_info = contact_sheet(job, columns=4)
    assert sheet_info.images == 10 and len(sheet_info.warnings) == 1
    assert sheet.size == (4 * SIZE, 3 * SIZE)


def test_cli_sheet_and_grid_write_and_warn_when_an_image_is_missing(tmp_path: Path):
    job = make_job(tmp_path)
    image_of(job, 5.0, 2).unlink()
    for args in (["sheet", job], ["grid", job, "--x", "guidance", "--y", "seed"]):
        out = tmp_path / f"{args[0]}.png"
        result = CliRunner().invoke(main, [*args, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"wrote {out}: ") and out.is_file()
        (warning,) = result.stderr.splitlines()
        assert warning.startswith("warning: left out 1 image whose file is missing (images/")


def test_a_sheet_with_no_image_file_left_is_one_line(tmp_path: Path):
    job = make_job(tmp_path)
    for path in (Path(job) / "images").iterdir():
        path.unlink()
    result = CliRunner().invoke(main, ["sheet", job, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "no image file is left" in result.stderr
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ('[{"path": "/jobs/loras/tiny-style.safetensors", "sha256": "ab", "weight": 0.5}]', "0.5 tiny-style"),
        ('[{"path": "/a/x.safetensors", "weight": 1.0}, {"path": "y.safetensors", "weight": -0.25}]', "1 x, -0.25 y"),
        ('[{"model": "org/canny-cn", "image": "/e.png", "scale": 1.5}]', "1.5 canny-cn"),
        ('[{"prompt": "a dog", "weight": 0.6}]', '[{"prompt": "a dog", "weight": 0.6}]'),  # a mix: as it is
        (0.75, "0.75"),
        (None, "null"),
    ],
)
def test_lora_and_controlnet_columns_are_labelled_by_name_and_weight(value, label):
    assert cell_label(value) == label
