"""Safety: nothing listens beyond what Ray needs, prompts never become paths."""

from __future__ import annotations

import re

import pytest

from farm import driver
from farm.layout import frame_relpath, image_relpath
from farm.manifest import base_row
from farm.spec import Batch, RenderTask


def test_embedded_ray_serves_no_dashboard(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert driver.start_ray(None) is True
    (kwargs,) = calls
    # "local" always starts a new Ray (never joins one named by RAY_ADDRESS), without a dashboard
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "/abs/path", "a\x00b", "images/../../x", "C:\\win"])
def test_prompts_never_become_paths(prompt):
    task = RenderTask("tiny", "euler", prompt, prompt, 1, 2, 7.5, 64, 64)
    row = base_row("job", task, Batch.of([task]), 0)
    assert re.fullmatch(r"images/[0-9a-f]{20}\.png", row["image_path"])
    assert row["image_path"] == image_relpath(task.task_id)
    assert re.fullmatch(r"frames/[0-9a-f]{20}/latents-0003\.png", frame_relpath(task.task_id, "latents", 3))


# ---------------------------------------------------------------------------------------
# How many actors, on what (farm.driver.plan_actors)


@pytest.mark.parametrize(
    ("resources", "options", "plan"),
    [
        ({"CPU": 2}, {}, (2, 0, 1.0, 1)),  # a laptop: one single-threaded actor per core
        ({"CPU": 2}, {"actors": 4}, (4, 0, 0.5, 1)),  # more actors than cores still all start
        ({"CPU": 16, "GPU": 4}, {}, (4, 1, 1.0, None)),  # one per GPU
        ({"CPU": 16, "GPU": 4}, {"device": "cpu"}, (16, 0, 1.0, 1)),
        ({"CPU": 4}, {"device": "cuda", "actors": 8}, (8, 1, 1.0, None)),  # the autoscaler adds GPUs
    ],
)
def test_actor_plan(resources, options, plan):
    got = driver.plan_actors(resources, driver.RenderOptions(**options))
    assert (got.count, got.num_gpus, got.num_cpus, got.threads) == plan


@pytest.mark.parametrize(
    ("resources", "options", "tasks", "count"),
    [
        ({"CPU": 2}, {}, 1, 1),  # a one-image job starts one actor, not one per core
        ({"CPU": 16, "GPU": 4}, {}, 3, 3),
        ({"CPU": 2}, {}, 100, 2),
        ({"CPU": 2}, {"actors": 3}, 1, 3),  # --actors is the user's word
    ],
)
def test_without_actors_no_more_actors_start_than_tasks_are_left(resources, options, tasks, count):
    assert driver.plan_actors(resources, driver.RenderOptions(**options), tasks).count == count


def test_cuda_actors_on_a_cluster_without_gpus_need_a_count():
    with pytest.raises(driver.FarmError, match="--device cuda: the cluster has no GPU yet; give --actors N"):
        driver.plan_actors({"CPU": 4}, driver.RenderOptions(device="cuda"))
