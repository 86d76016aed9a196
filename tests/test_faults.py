"""Faults: an actor process killed mid-batch, a node lost mid-job, GPU memory running out.

Each ends with exactly one ok row per task, no duplicate rows, and every ok row's image on
disk with its recorded sha256. (The killed driver and the task that always fails are in
test_resume.py and test_steering_e2e.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_cluster import job

from farm.actor import BatchRenderer
from farm.driver import RenderOptions, run_job
from farm.images import sha256_bytes
from farm.manifest import read_manifest, write_part
from farm.spec import Batch, parse_job

pytestmark = pytest.mark.slow

ACTOR_TITLE = b"ray::BatchRenderer"  # Ray titles an actor's worker process after its class


def actor_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(ACTOR_TITLE):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def check_outcome(root: Path, task_ids: set[str]) -> dict[str, int]:
    """The fault table's row: ok rows, duplicates, lost; and every ok image as its row says."""
    rows = read_manifest(str(root), superseded=True).to_pylist()  # every row written: duplicates show
    ok = [r for r in rows if r["status"] == "ok" and r["capture"] is None]
    for row in ok:
        assert sha256_bytes((root / row["image_path"]).read_bytes()) == row["image_sha256"]
    return {
        "tasks": len(task_ids),
        "ok_rows": len(ok),
        "duplicates": len(ok) - len({r["task_id"] for r in ok}),
        "lost": len(task_ids - {r["task_id"] for r in ok}),
    }


def test_actor_process_killed_mid_batch(ray_session, tmp_path):
    spec = parse_job(job("actor-kill"))
    before = actor_pids()
    manifest = tmp_path / "actor-kill" / "manifest"
    seen: dict[str, object] = {}

    def kill_one_actor() -> None:
        while not any(manifest.glob("part-*.parquet")):  # the first batch is in: rendering is under way
            time.sleep(0.05)
        victim = sorted(actor_pids() - before)[0]
        os.kill(victim, signal.SIGKILL)
        seen["victim"] = victim
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # Ray restarts it in a new process
            fresh = actor_pids() - before - {victim}
            if len(fresh) >= 2:
                seen["restarted"] = True
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    options = RenderOptions(out=str(tmp_path), actors=2, batch_size=4, flush_seconds=0, progress=False)
    summary = run_job(spec, options)
    killer.join()
    assert seen.get("victim") and seen.get("restarted"), seen
    assert summary.failed == 0, summary.errors
    outcome = check_outcome(tmp_path / "actor-kill", {t.task_id for t in spec.tasks()})
    assert outcome == {"tasks": 48, "ok_rows": 48, "duplicates": 0, "lost": 0}
    assert summary.failed == 0 and summary.rendered == 48


def test_node_removed_mid_job(tiny_path, tmp_path, farm_home):
    script = Path(__file__).with_name("fault_cluster.py")
    env = {**os.environ, "FARM_HOME": str(farm_home), "PYTHONPATH": str(script.parent.parent)}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=400, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["removed_at_parts"] is not None  # the node went while the job was running
    assert (report["tasks"], report["ok_rows"], report["duplicates"], report["lost"]) == (48, 48, 0, 0)
    assert report["failed"] == 0
    for path, sha in report["images"]:
        assert sha256_bytes((tmp_path / "node-loss" / path).read_bytes()) == sha


def test_out_of_memory_splits_the_batch(tiny_path, tmp_path, monkeypatch):
    """Injected CUDA out-of-memory above 2 tasks: a batch of 8 renders as 4 batches of 2."""
    from farm import render

    real = render.render_batch

    def small_gpu(components, tasks, init_images=None, embeddings=(), **controls):
        if len(tasks) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(components, tasks, init_images, embeddings, **controls)

    monkeypatch.setattr(render, "render_batch", small_gpu)
    spec = parse_job(
        "model: tiny\nscheduler: euler\ndefaults: {steps: 2, width: 64, height: 64}\nsweep: {seed: {range: [1, 9]}}"
    )
    batch = Batch.of(spec.tasks())
    threads = torch.get_num_threads()
    try:
        renderer = BatchRenderer("oom", str(tmp_path), "tiny", threads=1)
        rows = renderer.render(batch)
        expected = [real(renderer.components, batch.tasks[i : i + 2]).images for i in range(0, 8, 2)]
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in rows] == ["ok"] * 8
    assert [(r["batch_size"], r["batch_index"]) for r in rows] == [(2, 0), (2, 1)] * 4
    assert len({r["batch_id"] for r in rows}) == 4
    from PIL import Image

    for row, pixels in zip(rows, np.concatenate(expected), strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["image_path"])), pixels)
    write_part(str(tmp_path), rows)  # as the driver does with the rows it gets back
    outcome = check_outcome(tmp_path, {t.task_id for t in batch.tasks})
    assert outcome == {"tasks": 8, "ok_rows": 8, "duplicates": 0, "lost": 0}


def test_a_task_too_big_alone_fails_with_the_reason(tiny_path, tmp_path, monkeypatch):
    from farm import render

    def no_memory(components, tasks, init_images=None, embeddings=(), **controls):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(render, "render_batch", no_memory)
    spec = parse_job("model: tiny\ndefaults: {steps: 2, width: 64, height: 64}\nsweep: {seed: [1, 2, 3]}")
    threads = torch.get_num_threads()
    try:
        rows = BatchRenderer("oom", str(tmp_path), "tiny", threads=1).render(Batch.of(spec.tasks()))
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in rows] == ["failed"] * 3
    assert rows[0]["error"] == "out of cpu memory rendering this task alone"
