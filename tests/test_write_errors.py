"""Errors a retry cannot cure are not retried: an output that cannot be written is refused before
Ray starts; an images folder that stops taking writes fails the batches in flight after one
attempt each, the message naming the file (not its hidden temporary name), and stops the run; a
model that cannot load fails its batch at once.

No Ray: the real BatchRenderer (tiny model) behind the fake Ray of test_dispatch.py. Tests run
as root, which ignores permission bits, so an unwritable folder is a path under a regular file
or a file system that refuses writes.
"""

from __future__ import annotations

import dataclasses
import errno
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from pyarrow import fs as pafs
from ray.exceptions import RayTaskError
from test_dispatch import FakeActor, fake_ray

from farm import driver, storage
from farm.actor import BatchRenderer
from farm.cli import main
from farm.driver import Planned, RenderOptions, Summary, WorkQueue, cut_batches, dispatch
from farm.errors import FarmError
from farm.manifest import read_manifest
from farm.spec import Batch, parse_job

JOB = "name: w\nmodel: tiny\nscheduler: euler\ndefaults: {steps: 2, width: 64, height: 64}\nsweep: {seed: [1, 2, 3, 4]}"


class ReadOnly:
    """The local file system, refusing every write under ``folder`` as a read-only folder does."""

    def __init__(self, folder: str | Path) -> None:
        self.inner = pafs.LocalFileSystem()
        self.folder = str(folder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_output_stream(self, path: str) -> Any:
        if path.startswith(self.folder):
            raise PermissionError(errno.EACCES, f"Failed to open local file '{path}'. Detail: [errno 13]")
        return self.inner.open_output_stream(path)


def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address: str | None) -> bool:
        pytest.fail("Ray was started for an output that cannot be written")

    monkeypatch.setattr(driver, "start_ray", refuse)


def test_an_out_under_a_regular_file_is_refused_before_ray_starts(small_job: Path, tmp_path: Path, monkeypatch):
    no_ray(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    result = CliRunner().invoke(main, ["render", str(small_job), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: --out {out}: cannot write to {out}/small: Not a directory\n"


def test_a_read_only_out_is_refused_before_ray_starts(small_job: Path, tmp_path: Path, monkeypatch):
    no_ray(monkeypatch)
    monkeypatch.setattr(storage, "open_root", lambda root: (ReadOnly(tmp_path), storage.normalise_root(root)))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", str(small_job), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: --out {out}: cannot write to {out}/small: Permission denied\n"
    assert not (out / "small" / "job.yaml").exists()


class RendererActor(FakeActor):
    """A BatchRenderer as the driver sees it through Ray: an error comes back as Ray's error,
    an instance of its cause (as ray.get raises it)."""

    def __init__(self, renderer: BatchRenderer) -> None:
        super().__init__()
        self.renderer = renderer

    def _render(self, batch: Batch, skip: frozenset[str]) -> list[dict[str, Any]]:
        self.batches.append((batch, skip))
        try:
            return self.renderer.render(batch, skip)
        except Exception as exc:  # noqa: BLE001 - every error crosses Ray this way
            error = RayTaskError("render", traceback.format_exc(), exc, proctitle="ray::BatchRenderer", ip="127.0.0.1")
            raise error.as_instanceof_cause() from None


@pytest.fixture
def renderer(tiny_path: Path, tmp_path: Path):
    threads = torch.get_num_threads()
    try:
        yield BatchRenderer("w", str(tmp_path / "w"), "tiny", threads=1)
    finally:
        torch.set_num_threads(threads)


def test_an_images_folder_that_stops_taking_writes_fails_its_batches_once_and_stops_new_work(
    renderer: BatchRenderer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from farm.sink import RowsNotWritten

    monkeypatch.setitem(sys.modules, "ray", fake_ray())
    root = tmp_path / "w"
    renderer.filesystem = ReadOnly(root / "images")  # it took the probe; now it refuses writes
    actor = RendererActor(renderer)
    spec = parse_job(JOB)
    summary = Summary(job_root=str(root))
    options = RenderOptions(progress=False, retries=2, flush_seconds=0)
    with pytest.raises(RowsNotWritten) as failed:
        dispatch(spec, str(root), [actor], WorkQueue(cut_batches(spec.tasks(), 1)), set(), Planned(), options, summary)

    assert len(actor.batches) == 2  # the two in flight, once each: no retries, no new work
    first = [t.task_id for t in spec.tasks()][0]
    why = f"Permission denied writing {root}/images/{first}.png; 0 images are safe, rerun to finish"
    assert str(failed.value) == why
    assert failed.value.exit_code == 1
    rows = read_manifest(str(root)).to_pylist()
    assert [r["status"] for r in rows] == ["failed"] * 2
    assert rows[0]["error"] == f"cannot write {root}/images/{first}.png: Permission denied"  # the file, not a .tmp
    assert (summary.rendered, summary.failed) == (0, 2)
    assert not (root / "images").exists() or list((root / "images").iterdir()) == []


def test_a_model_that_cannot_load_fails_its_batch_without_retry(renderer: BatchRenderer, tmp_path: Path):
    from farm.errors import FatalRenderError

    task = dataclasses.replace(next(iter(parse_job(JOB).tasks())), model=str(tmp_path / "gone.safetensors"))
    with pytest.raises(FatalRenderError, match="gone.safetensors"):
        renderer.render(Batch.of([task]))
    assert isinstance(FatalRenderError("x"), FarmError)
