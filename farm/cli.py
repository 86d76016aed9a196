"""The ``farm`` command: each command parses its arguments, calls one function, prints."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
from pyarrow.lib import ArrowException

from farm import __version__
from farm.driver import RenderOptions
from farm.errors import EXIT_FAILED, FarmError, Terminated
from farm.manifest import FORMATS

EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: ended by SIGTERM (ray job stop, a scheduler)
DRY_RUN_SHOWN = 10
# The driver's own defaults, shown in --help: one place for each (driver.RenderOptions).
RENDER_DEFAULTS = RenderOptions()


class FarmGroup(click.Group):
    """Every command's FarmError becomes one line on stderr and its exit code: never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FarmError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def fail(message: str) -> NoReturn:
    """Refuse bad input that click's own checks cannot see: one line, exit 2."""
    raise FarmError(message)


@contextmanager
def io_errors(where: str) -> Iterator[None]:
    """An I/O error reading or writing ``where`` (a missing folder, a full disk, a bad URI) is one line."""
    try:
        yield
    except (OSError, ArrowException) as exc:
        raise FarmError(f"{where}: {exc}") from exc


@click.group(cls=FarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="farm")
def main() -> None:
    """farm: render Stable Diffusion grids on Ray, with a Parquet manifest per job."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, so it ends a render the
    way Ctrl-C does: rows saved, lock released, Ray shut down. The old handler comes back after."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set one
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def saved_on_interrupt() -> Iterator[None]:
    """Ctrl-C or SIGTERM during a render (farm render, farm verify --repair): the finished batches
    are saved, so one line says how to resume, and the exit code is the shell's (130 or 143)."""
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        click.echo(f"\n{how}: finished batches are saved; run the same command again to resume", err=True)
        sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", default="out", show_default=True, help="Output root (a path or a pyarrow.fs URI).")
@click.option("--address", default=None, help="Ray cluster to join (auto, ray://HOST:10001). Default: embedded Ray.")
@click.option(
    "--actors", type=click.IntRange(min=1), default=None, help="Actors (default: one per GPU, else one per CPU core)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=RENDER_DEFAULTS.batch_size,
    show_default=True,
    help="Tasks per UNet batch.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Model dtype (auto: float16 on CUDA, float32 on CPU).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="Actors on GPUs or CPUs (auto: GPUs if the cluster has any now; cuda also before an autoscaler adds them).",
)
@click.option(
    "--flush-seconds",
    type=click.FloatRange(min=0),
    default=RENDER_DEFAULTS.flush_seconds,
    show_default=True,
    help="Write manifest rows at least this often; a crash re-renders at most this much work.",
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickle checkpoints (.ckpt/.bin), which can run code.")
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="channels_last and torch.compile for the UNet and the VAE decoder: faster on GPUs once warm (the "
    "first batch of each shape compiles, minutes on a CPU). Other bytes than eager; rows and PNGs record "
    "the path and farm reproduce rebuilds it.",
)
@click.option("--dry-run", is_flag=True, help="Print the task count and the first tasks; start nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--wait", is_flag=True, help="If another run is rendering this job folder, wait for it; don't exit.")
def render(
    job: Path,
    out: str,
    address: str | None,
    actors: int | None,
    batch_size: int,
    dtype: str,
    device: str,
    flush_seconds: float,
    allow_pickle: bool,
    compile_: bool,
    dry_run: bool,
    no_progress: bool,
    wait: bool,
) -> None:
    """Render every task of JOB (a YAML job spec) into OUT/<job name>/.

    One run writes a job folder at a time; a second run of the same job exits 2 naming the
    first (or, with --wait, waits for it). Ctrl-C or SIGTERM saves finished batches (exit 130, 143).
    """
    from farm.driver import dry_run_tasks, run_job
    from farm.spec import load_job

    spec = load_job(job)
    if dry_run:
        with io_errors(f"--out {out}"):
            count, tasks = dry_run_tasks(spec, out, DRY_RUN_SHOWN)
        click.echo(f"{spec.name}: {count} task{'s' if count != 1 else ''}")
        for task in tasks:
            extra = task.techniques()
            click.echo(
                f"  {task.task_id}  seed={task.seed} steps={task.steps} guidance={task.guidance:g} "
                f"{task.width}x{task.height} {task.scheduler}  {task.prompt!r}" + (f"  [{extra}]" if extra else "")
            )
        if count > len(tasks):
            click.echo(f"  ... and {count - len(tasks)} more")
        return
    options = RenderOptions(
        out=out,
        address=address,
        actors=actors,
        batch_size=batch_size,
        dtype=dtype,
        flush_seconds=flush_seconds,
        device=device,
        allow_pickle=allow_pickle,
        progress=not no_progress,
        wait=wait,
        compile=compile_,
    )
    with saved_on_interrupt(), io_errors(f"--out {out}"):  # an output folder that cannot be written
        summary = run_job(spec, options, notify=lambda message: click.echo(message, err=True))
    click.echo(
        f"{spec.name}: rendered {summary.rendered}, skipped {summary.skipped}, failed {summary.failed} "
        f"of {summary.total} in {summary.elapsed:.1f}s ({summary.images_per_second:.2f} images/s)"
    )
    if summary.rendered:
        actors = f"{summary.actors} actor{'s' if summary.actors != 1 else ''}"
        first = f", first image at {summary.first_image:.1f}s" if summary.first_image is not None else ""
        click.echo(
            f"  start-up {summary.startup:.1f}s (Ray {summary.ray_start:.1f}s, {actors}: imports, model load){first}, "
            f"then {summary.rendering_images_per_second:.2f} images/s"
        )
    if summary.withheld:
        click.echo(f"  withheld: {summary.withheld} flagged by the safety check (rows recorded, no image written)")
    for video, flicker, compensated in zip(summary.videos, summary.flicker, summary.flicker_compensated, strict=True):
        moved = "" if compensated is None else f", {compensated:.2f} with the motion undone"
        click.echo(
            f"  video: {summary.job_root}/{video} (flicker {flicker:.2f}{moved}: mean |frame n+1 - frame n|, 0-255)"
        )
    for message in summary.errors[:3]:
        click.echo(f"  failed: {message}", err=True)
    click.echo(f"output: {summary.job_root}")
    click.echo(f'try:    farm query {summary.job_root} "SELECT status, count(*) FROM manifest GROUP BY status"')
    if summary.failed:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job_dir", type=str)
@click.argument("sql", type=str)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format; parquet needs -o.",
)
@click.option("--output", "-o", default=None, help="Write the result to this file (a path or a pyarrow.fs URI).")
def query(job_dir: str, sql: str, fmt: str, output: str | None) -> None:
    """Run SQL over JOB_DIR's manifest, visible as the table `manifest`.

    Example: farm query out/demo "SELECT seed, guidance, image_path FROM manifest LIMIT 5"
    """
    from farm.manifest import run_query

    with io_errors(output or job_dir):
        # color=True: click would strip escape sequences from piped output, and CSV/JSON keep the
        # stored text exactly (the table escapes control characters itself).
        click.echo(run_query(job_dir, sql, fmt, output), color=True)


@main.command()
@click.argument("out", type=str)
@click.option("--format", "fmt", type=click.Choice(FORMATS[:-1]), default="table", show_default=True)
def runs(out: str, fmt: str) -> None:
    """List the jobs under OUT (an output root: a path or a pyarrow.fs URI), by name.

    Per job: ok and failed image rows, images (tasks with an ok image), captured step frames,
    and the first and last row's created_at. A job whose manifest cannot be read is named in
    a warning instead (exit 1).

    Example: farm runs out
    """
    from farm.manifest import format_table
    from farm.manifest import runs as list_runs

    problems: list[str] = []
    with io_errors(out):
        click.echo(format_table(list_runs(out, problems), fmt), color=True)
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)
    if problems:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job_dir", type=str)
def compact(job_dir: str) -> None:
    """Merge JOB_DIR's manifest part files into one, sorted by created_at then task_id.

    Safe while others query or render the job: every query answers the same before, during
    and after. Compacting a compacted job does nothing.

    Example: farm compact out/demo
    """
    from farm.manifest import compact as compact_job

    with io_errors(job_dir):
        click.echo(compact_job(job_dir))


@main.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.argument("task_id", required=False)
@click.option("--diff-dir", default=".", show_default=True, help="Where the re-rendered PNG and the diff image go.")
@click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Default: as recorded."
)
@click.option(
    "--tolerance",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="Exit 0 when no pixel channel differs by more than this (an image rendered alone may differ by 1).",
)
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle checkpoints (.ckpt, .bin).")
@click.option(
    "--model-config",
    default=None,
    help="With a PNG of a single-file checkpoint: the job's model_config (a diffusers folder of configs), "
    "which the PNG does not record. A job folder's rows record it.",
)
def reproduce(
    target: Path,
    task_id: str | None,
    diff_dir: str,
    dtype: str | None,
    tolerance: int,
    allow_pickle: bool,
    model_config: str | None,
) -> None:
    """Render an image again and compare: TARGET is a job folder (OUT/<job>) with TASK_ID, or a PNG.

    The recorded render path is rebuilt: an image rendered with --compile renders compiled again.

    Exit 0 when identical (or within --tolerance), 1 when different, 2 for bad input.

    Example: farm reproduce out/demo 3f2a9c0d1e2b4a5f6789 --diff-dir /tmp/diff
    """
    from farm.reproduce import reproduce_image, reproduce_task

    if target.is_dir():
        if not task_id:
            fail(f"{target} is a job folder: give a TASK_ID too (or a PNG instead)")
        if model_config:
            fail("--model-config goes with a PNG: a job folder's rows record their model_config")
        result = reproduce_task(str(target), task_id, diff_dir, allow_pickle=allow_pickle, dtype=dtype)
    else:
        if task_id:
            fail("TASK_ID goes with a job folder, not with a PNG")
        result = reproduce_image(
            str(target), diff_dir, allow_pickle=allow_pickle, model_config=model_config, dtype=dtype
        )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(result.summary())
    within = tolerance > 0 and result.max_difference <= tolerance
    sys.exit(0 if result.identical or within else 1)


def _picture_name(job_dir: str, kind: str) -> str:
    """The default output file: <job>-<kind>.png in the current folder."""
    name = job_dir.rstrip("/").rsplit("/", 1)[-1] or "job"
    return f"{name}-{kind}.png"


def _save_png(image: Any, output: str) -> None:
    """Write a PNG to a path or a pyarrow.fs URI, atomically."""
    import io

    from farm import storage

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    filesystem, path = storage.open_root(output)
    storage.write_bytes(filesystem, path, buffer.getvalue())


@main.command()
@click.argument("job_dir", type=str)
@click.option("--x", "x", required=True, help="Manifest column along the top (e.g. guidance).")
@click.option("--y", "y", required=True, help="Manifest column down the left (e.g. seed).")
@click.option("--where", default=None, help='SQL condition on the manifest\'s rows (e.g. "steps = 30").')
@click.option("--output", "-o", default=None, help="PNG to write (a path or a URI). Default: <job>-grid.png here.")
def grid(job_dir: str, x: str, y: str, where: str | None, output: str | None) -> None:
    """Write an X/Y plot of JOB_DIR's ok images: one cell per (x, y) value pair, the values
    along the edges, the prompt as the title, at most 4096 px a side.

    Example: farm grid out/demo --x guidance --y seed --where "prompt LIKE '%shiba%'" -o demo-grid.png
    """
    from farm.sheets import xy_plot

    output = output or _picture_name(job_dir, "grid")
    with io_errors(job_dir):
        image, info = xy_plot(job_dir, x, y, where)
    with io_errors(output):
        _save_png(image, output)
    for warning in info.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(info.summary(output))


@main.command()
@click.argument("job_dir", type=str)
@click.option("--where", default=None, help='SQL condition on the manifest\'s rows (e.g. "seed < 3").')
@click.option("--columns", type=click.IntRange(min=1), default=None, help="Images per row. Default: square-ish.")
@click.option("--output", "-o", default=None, help="PNG to write (a path or a URI). Default: <job>-sheet.png here.")
def sheet(job_dir: str, where: str | None, columns: int | None, output: str | None) -> None:
    """Write a contact sheet of JOB_DIR's ok images in render order, at most 4096 px a side.

    Example: farm sheet out/demo --where "seed < 3" --columns 4 -o demo-sheet.png
    """
    from farm.sheets import contact_sheet

    output = output or _picture_name(job_dir, "sheet")
    with io_errors(job_dir):
        image, info = contact_sheet(job_dir, where, columns)
    with io_errors(output):
        _save_png(image, output)
    for warning in info.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(info.summary(output, image.size))


@main.command()
@click.argument("job_dir", type=str)
@click.option(
    "--output",
    "-o",
    default=None,
    help="Video to write: .mp4 (H.264), .webm (VP9) or .gif. Default: JOB_DIR/<job>.mp4.",
)
@click.option(
    "--fps",
    type=click.FloatRange(min=0, min_open=True, max=240),
    default=None,
    help="Frames per second. Default: the animation's (its source video's), else 12.",
)
@click.option(
    "--order",
    default=None,
    help="Order by this manifest column (e.g. seed). Default: frame, then step_index, then render order.",
)
@click.option(
    "--where",
    default=None,
    help='SQL condition on the manifest\'s ok rows (e.g. "seed = 1"). Default: the images, not step captures.',
)
@click.option("--side-by-side", is_flag=True, help="Show each frame's source frame (its init image) to the left of it.")
def video(
    job_dir: str, output: str | None, fps: float | None, order: str | None, where: str | None, side_by_side: bool
) -> None:
    """Stitch JOB_DIR's ok images into a video: an animation's frames in order, a walk, or a
    step capture (--where "task_id = '...' AND capture = 'x0'").

    Example: farm video out/animate -o animate.mp4 --side-by-side
    """
    from farm.stitch import stitch

    with io_errors(output or job_dir):
        result = stitch(job_dir, output, fps, order, where, side_by_side)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(result.summary())


@main.command()
@click.argument("job_dir", type=str)
@click.option("--output", "-o", default=None, help="Folder to write the gallery to. Default: JOB_DIR/report.")
def report(job_dir: str, output: str | None) -> None:
    """Write a static HTML gallery of JOB_DIR's ok images (index.html plus thumbnails): a filter
    on any column, and a click shows the full image and all its metadata. It needs no server:
    open index.html from file://.

    Example: farm report out/demo && xdg-open out/demo/report/index.html
    """
    from farm.report import write_report

    with io_errors(job_dir):
        info = write_report(job_dir, output)
    for warning in info.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(info.summary())


@main.command()
@click.argument("job_dir", type=str)
@click.option(
    "--repair",
    is_flag=True,
    help="Render the tasks of missing or altered files again (farm render of JOB_DIR/job.yaml).",
)
@click.option(
    "--quarantine", is_flag=True, help="First move manifest part files that cannot be read to manifest-quarantine/."
)
@click.option("--address", default=None, help="With --repair: the Ray cluster to join. Default: embedded Ray.")
@click.option("--actors", type=click.IntRange(min=1), default=None, help="With --repair: actors (as farm render).")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="With --repair: tasks per UNet batch. Default: the largest batch the rows record.",
)
@click.option("--allow-pickle", is_flag=True, help="With --repair: allow pickle checkpoints (.ckpt/.bin).")
@click.option("--no-progress", is_flag=True, help="With --repair: no progress bar.")
@click.option(
    "--wait", is_flag=True, help="With --repair: if another run is rendering JOB_DIR, wait for it; don't exit."
)
def verify(
    job_dir: str,
    repair: bool,
    quarantine: bool,
    address: str | None,
    actors: int | None,
    batch_size: int | None,
    allow_pickle: bool,
    no_progress: bool,
    wait: bool,
) -> None:
    """Check that every ok image (and captured frame) of JOB_DIR is there with the sha256 its
    row records: a line per missing or altered file, then a summary. Exit 0 when all match, 1
    when not (with --repair: when the repair left something wrong). --repair holds the job
    folder's lock as farm render does: another run rendering it is refused (exit 2) or, with
    --wait, waited for.

    Example: farm verify out/demo --repair
    """
    from farm.verify import Repair
    from farm.verify import verify as verify_job

    how = Repair(address, actors, batch_size, allow_pickle, not no_progress, wait) if repair else None
    with saved_on_interrupt(), io_errors(job_dir):
        ok = verify_job(
            job_dir, click.echo, quarantine=quarantine, repair=how, notify=lambda message: click.echo(message, err=True)
        )
    sys.exit(0 if ok else EXIT_FAILED)


if __name__ == "__main__":
    main()
