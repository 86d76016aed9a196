"""Render metrics through ``ray.util.metrics``, exported by Ray's metrics agent to Prometheus.

Ray prefixes every application metric with ``ray_`` (and counters get ``_total``), so
``farm_images_rendered`` is scraped as ``ray_farm_images_rendered_total``. The metric objects
are made on first use: ``ray.util.metrics`` needs a connected Ray worker, which the driver
only has after ``ray.init``. Recording never breaks a render: a failure is logged once and
ignored (docs/metrics.md; dashboards/farm.json reads these names).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Name as recorded -> name as Prometheus sees it (the dashboard and the test use the latter).
IMAGES_RENDERED = "farm_images_rendered"
FAILURES = "farm_failures"
RENDER_SECONDS = "farm_render_seconds"
QUEUE_DEPTH = "farm_queue_depth"
IMAGES_PER_SECOND = "farm_images_per_second"
EXPORTED = {
    IMAGES_RENDERED: "ray_farm_images_rendered_total",
    FAILURES: "ray_farm_failures_total",
    RENDER_SECONDS: "ray_farm_render_seconds",  # histogram: _bucket, _sum, _count
    QUEUE_DEPTH: "ray_farm_queue_depth",
    IMAGES_PER_SECOND: "ray_farm_images_per_second",
}
# Seconds one batch takes: a tiny model on CPU (a tenth of a second) to a big batch at
# high resolution (minutes).
RENDER_SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600]

_metrics: dict[str, Any] = {}
_warned = False


def _get(name: str) -> Any:
    if name not in _metrics:
        from ray.util.metrics import Counter, Gauge, Histogram

        made = {
            IMAGES_RENDERED: lambda: Counter(
                IMAGES_RENDERED, description="Images rendered (status ok).", tag_keys=("job", "actor")
            ),
            FAILURES: lambda: Counter(
                FAILURES, description="Images whose render failed (failed rows).", tag_keys=("job", "actor")
            ),
            RENDER_SECONDS: lambda: Histogram(
                RENDER_SECONDS,
                description="Seconds an actor spent rendering one batch.",
                boundaries=RENDER_SECONDS_BOUNDARIES,
                tag_keys=("job", "actor"),
            ),
            QUEUE_DEPTH: lambda: Gauge(
                QUEUE_DEPTH, description="Batches in flight plus batches queued for retry.", tag_keys=("job",)
            ),
            IMAGES_PER_SECOND: lambda: Gauge(
                IMAGES_PER_SECOND,
                description="Images per second of the actor's last batch.",
                tag_keys=("job", "actor"),
            ),
        }
        _metrics.update((key, make()) for key, make in made.items())
    return _metrics[name]


def _safely(record: Any) -> None:
    global _warned
    try:
        record()
    except Exception as exc:  # noqa: BLE001 - metrics never break a render
        if not _warned:
            _warned = True
            log.warning("farm metrics: cannot record (%s); metrics are off for this process", exc)


def record_batch(job: str, actor: str, rows: list[dict[str, Any]], seconds: float) -> None:
    """After an actor's batch (its manifest rows): images rendered, failures, render seconds, images/s.

    Step-capture rows (``capture`` set) are frames, not images, and are not counted.
    """

    def record() -> None:
        tags = {"job": job, "actor": actor}
        images = sum(r.get("capture") is None and r["status"] == "ok" for r in rows)
        failures = sum(r.get("capture") is None and r["status"] != "ok" for r in rows)
        if images:
            _get(IMAGES_RENDERED).inc(images, tags=tags)
        if failures:
            _get(FAILURES).inc(failures, tags=tags)
        _get(RENDER_SECONDS).observe(seconds, tags=tags)
        if seconds > 0:
            _get(IMAGES_PER_SECOND).set(images / seconds, tags=tags)

    _safely(record)


def record_failed(job: str, images: int) -> None:
    """From the driver: a batch it gave up on (its render kept raising, or its actors kept dying)."""
    _safely(lambda: _get(FAILURES).inc(images, tags={"job": job, "actor": "driver"}) if images else None)


def set_queue_depth(job: str, depth: int) -> None:
    """From the driver's dispatch loop: batches in flight plus queued retries."""
    _safely(lambda: _get(QUEUE_DEPTH).set(depth, tags={"job": job}))
