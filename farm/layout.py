"""Where everything of a job lives: the one owner of a job folder's names.

    OUT/<job>/
        job.yaml                            the spec as submitted
        run.json                            the run's random-seed draw (a rerun draws the same seeds)
        animation.json                      animate and walk jobs: fps, mode, frames per shot
        summary.json                        the last run's counts, timings and videos
        lock.json                           while a render runs: who holds the folder (farm.lock)
        images/<task_id>.png                one image per task
        frames/<task_id>/<kind>-<step>.png  step captures
        manifest/part-*.parquet             the rows (farm.manifest)
        manifest-quarantine/                part files set aside as unreadable (farm verify --quarantine)
        report/                             the HTML gallery (farm report)
        <job>.mp4, <job>-shot<N>.mp4        an animation's videos

Output file names come from task ids, never from prompts (DESIGN.md, safety).
"""

from __future__ import annotations

import json
from typing import Any

from farm import storage

IMAGES_DIR = "images"
# Step captures: frames/<task_id>/<kind>-<step>.png, one row each (docs/steering.md, "Step capture").
FRAMES_DIR = "frames"
MANIFEST_DIR = "manifest"
# Part files no reader can open, moved aside by `farm verify --quarantine` so the rest reads.
QUARANTINE_DIR = "manifest-quarantine"
REPORT_DIR = "report"
JOB_FILE = "job.yaml"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
ANIMATION_FILE = "animation.json"
# One writer at a time: the running render's host, pid, start and lease (farm.lock).
LOCK_FILE = "lock.json"
# A folder holding any of these is a job folder, even before its first rows land.
JOB_MARKERS = (MANIFEST_DIR, JOB_FILE, RUN_FILE)


def job_root(out: str, name: str) -> str:
    """The folder of job ``name`` under the output root ``out`` (a path or a pyarrow.fs URI)."""
    return storage.join(storage.normalise_root(out), name)


def image_relpath(task_id: str) -> str:
    return f"{IMAGES_DIR}/{task_id}.png"


def frame_relpath(task_id: str, kind: str, step_index: int) -> str:
    return f"{FRAMES_DIR}/{task_id}/{kind}-{step_index:04d}.png"


def video_name(job: str, shot: int, shots: int) -> str:
    """An animation's video: <job>.mp4 for one shot, <job>-shot<N>.mp4 for several."""
    return f"{job}.mp4" if shots == 1 else f"{job}-shot{shot}.mp4"


def read_json(root: str, name: str) -> dict[str, Any] | None:
    """A JSON record of the job folder (run.json, animation.json, ...), or None if absent."""
    filesystem, base = storage.open_root(root)
    path = storage.join(base, name)
    if not storage.exists(filesystem, path):
        return None
    return json.loads(storage.read_bytes(filesystem, path))


def write_json(root: str, name: str, record: dict[str, Any], indent: int | None = None) -> None:
    filesystem, base = storage.open_root(root)
    storage.write_bytes(filesystem, storage.join(base, name), json.dumps(record, indent=indent).encode())


def random_base_of(root: str) -> int | None:
    """The random-seed draw kept in a job folder's run.json (None before the first run)."""
    record = read_json(root, RUN_FILE)
    return None if record is None else int(record["random_base"])


def animation_fps(root: str) -> float | None:
    """The frame rate an animate or walk job recorded in its folder, else None."""
    record = read_json(root, ANIMATION_FILE)
    return None if record is None else float(record["fps"])
