"""Run a job on a 3-node Ray cluster on this machine and remove a worker node mid-job.

Run by tests/test_faults.py in a subprocess (a test session already holds its own Ray):
``python tests/fault_cluster.py OUT``. Prints one JSON line with what the manifest holds.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from farm.driver import RenderOptions, run_job
from farm.manifest import read_manifest
from farm.spec import parse_job

# 48 tasks of a few seconds' work in all: long enough to lose a node (or an actor) mid-job.
JOB = """
model: tiny
scheduler: euler
defaults: {negative_prompt: blurry, steps: 8, width: 128, height: 128}
sweep:
  prompt: [a cute dog, a puppy, a skunk]
  seed: {range: [0, 16]}
"""


def job(name: str) -> str:
    return f"name: {name}\n" + JOB


NODE_CPUS = 2  # room on the two surviving nodes for the lost node's actor to restart


def remove_when_rendering(cluster: Cluster, node, manifest: Path, done: dict) -> None:
    """Remove ``node`` once the first batch is in the manifest (the job is mid-way)."""
    while not any(manifest.glob("part-*.parquet")):
        time.sleep(0.05)
    cluster.remove_node(node)
    done["removed_at_parts"] = len(list(manifest.glob("part-*.parquet")))


def main(out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
    try:
        render_and_remove_a_node(cluster, out)
    finally:  # never leave a cluster behind for the next test to stumble on
        ray.shutdown()
        cluster.shutdown()


def render_and_remove_a_node(cluster: Cluster, out: str) -> None:
    workers = [cluster.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    spec = parse_job(job("node-loss"))
    options = RenderOptions(
        out=out, address=cluster.address, actors=3, batch_size=4, flush_seconds=0, retries=3, progress=False
    )
    removal: dict = {}
    killer = threading.Thread(
        target=remove_when_rendering, args=(cluster, workers[0], Path(out) / "node-loss" / "manifest", removal)
    )
    killer.start()
    summary = run_job(spec, options)
    killer.join()
    rows = read_manifest(str(Path(out) / "node-loss")).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    tasks = {t.task_id for t in spec.tasks()}
    print(
        json.dumps(
            {
                "tasks": len(tasks),
                "ok_rows": len(ok),
                "duplicates": len(ok) - len({r["task_id"] for r in ok}),
                "lost": len(tasks - {r["task_id"] for r in ok}),
                "failed": summary.failed,
                "removed_at_parts": removal.get("removed_at_parts"),
                "actors": sorted({r["actor"] for r in ok}),
                "images": [(r["image_path"], r["image_sha256"]) for r in ok],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
