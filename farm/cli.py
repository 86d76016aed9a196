"""The ``farm`` command: each command parses its arguments, calls one function, prints."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from pyarrow.lib import ArrowException

from farm import __version__

# Exit codes: 2 for bad input (a wrong spec, option or model: nothing was rendered),
# 1 when the job ran but some tasks failed.
EXIT_BAD_INPUT = 2
EXIT_TASKS_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by Ctrl-C
DRY_RUN_SHOWN = 10


def fail(message: str) -> None:
    """Print one line to stderr and exit 2: bad input never shows a traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="farm")
def main() -> None:
    """farm: render Stable Diffusion grids on Ray, with a Parquet manifest per job."""


@main.command()
@click.argument("job", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", default="out", show_default=True, help="Output root (a path or a pyarrow.fs URI).")
@click.option("--address", default=None, help="Ray cluster to join (auto, ray://HOST:10001). Default: embedded Ray.")
@click.option(
    "--actors", type=click.IntRange(min=1), default=None, help="Actors (default: one per GPU, else one per CPU core)."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Tasks per UNet batch.")
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
    default=5.0,
    show_default=True,
    help="Write manifest rows at least this often; a crash re-renders at most this much work.",
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickle checkpoints (.ckpt/.bin), which can run code.")
@click.option("--dry-run", is_flag=True, help="Print the task count and the first tasks; start nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
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
    dry_run: bool,
    no_progress: bool,
) -> None:
    """Render every task of JOB (a YAML job spec) into OUT/<job name>/."""
    from farm.driver import FarmError, RenderOptions, dry_run_tasks, run_job
    from farm.spec import SpecError, load_job

    try:
        spec = load_job(job)
    except SpecError as exc:
        fail(str(exc))
    if dry_run:
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
    )
    try:
        summary = run_job(spec, options)
    except FarmError as exc:
        fail(str(exc))
    except (OSError, ArrowException) as exc:  # an output folder that cannot be written
        fail(f"--out {out}: {exc}")
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished batches are saved; run the same command again to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(
        f"{spec.name}: rendered {summary.rendered}, skipped {summary.skipped}, failed {summary.failed} "
        f"of {summary.total} in {summary.elapsed:.1f}s ({summary.images_per_second:.2f} images/s)"
    )
    if summary.rendered:
        click.echo(
            f"  start-up {summary.startup:.1f}s (Ray, {summary.actors} actor{'s' if summary.actors != 1 else ''}, "
            f"model load), then {summary.rendering_images_per_second:.2f} images/s"
        )
    for message in summary.errors[:3]:
        click.echo(f"  failed: {message}", err=True)
    click.echo(f"output: {summary.job_root}")
    click.echo(f'try:    farm query {summary.job_root} "SELECT status, count(*) FROM manifest GROUP BY status"')
    if summary.failed:
        sys.exit(EXIT_TASKS_FAILED)


@main.command()
@click.argument("job_dir", type=str)
@click.argument("sql", type=str)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def query(job_dir: str, sql: str, fmt: str) -> None:
    """Run SQL over JOB_DIR's manifest, visible as the table `manifest`.

    Example: farm query out/demo "SELECT seed, guidance, image_path FROM manifest LIMIT 5"
    """
    import duckdb

    from farm.manifest import format_table, has_manifest
    from farm.manifest import query as run_query

    try:
        if not has_manifest(job_dir):
            fail(f"{job_dir}: no manifest here (expected a job folder: OUT/<job name>)")
        table = run_query(job_dir, sql)
    except duckdb.Error as exc:
        fail(f"SQL: {str(exc).splitlines()[0]}")
    except (OSError, ArrowException) as exc:
        fail(f"{job_dir}: {exc}")
    click.echo(format_table(table, fmt))


if __name__ == "__main__":
    main()
