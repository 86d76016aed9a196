"""Metrics: farm/metrics.py records through ray.util.metrics, Ray's metrics agent exports them,
and dashboards/farm.json only reads names that are exported (docs/metrics.md)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from farm import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "farm.json"
# PromQL words that are not metric names (functions, aggregations, keywords, Grafana variables).
_PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "label_values", "without", "avg", "max", "min"}


def dashboard_queries() -> list[str]:
    """Every PromQL query in the dashboard: panel targets and templating variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {...} and [...] and not a PromQL word."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\bby\s*\([^)]*\)", " ", bare)  # grouping labels
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare)) - _PROMQL_WORDS
    # label_values(metric, label): the second argument is a label
    names -= set(re.findall(r"label_values\([^,]+,\s*([A-Za-z_]+)\)", bare))
    return names


def metrics_port(ray) -> int:
    """The metrics agent's port of this Ray's node, once the node reports a usable one."""
    deadline = time.monotonic() + 30
    port = None
    while time.monotonic() < deadline:
        port = ray.nodes()[0].get("MetricsExportPort")
        if isinstance(port, int) and 0 < port < 65536:
            return port
        time.sleep(0.5)
    raise AssertionError(f"Ray's metrics agent reports no usable port (got {port!r})")


def scrape(port: int) -> dict[str, list[str]]:
    """Prometheus text from Ray's metrics agent -> {metric name: its sample lines}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            samples.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
    return samples


def total(lines: list[str], **labels: str) -> float:
    """Sum of the samples whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(w in line for w in wanted))


def test_dashboard_is_a_grafana_dashboard_over_farm_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 30 and dashboard["uid"] == "farm"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    used = set().union(*map(metric_names, dashboard_queries()))
    # Every farm metric is on the dashboard, and the dashboard reads nothing else.
    exported = set(metrics.EXPORTED.values())
    histogram = metrics.EXPORTED[metrics.RENDER_SECONDS]
    assert {name.removesuffix(s) for name in used for s in ("_bucket", "_sum", "_count") if name.endswith(s)} | (
        used & exported
    ) == exported
    assert used <= exported | {f"{histogram}{s}" for s in ("_bucket", "_sum", "_count")}


def test_metric_names_parses_promql() -> None:
    expr = 'histogram_quantile(0.5, sum by (le, job) (rate(a_bucket{job=~"$job"}[$__rate_interval]))) / b'
    assert metric_names(expr) == {"a_bucket", "b"}
    assert metric_names('label_values(c_count{SessionName=~"$S"}, job)') == {"c_count"}


def test_recording_counts_images_and_never_breaks_a_render(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, str, float, dict[str, str]]] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, method: str):
            return lambda value, tags: calls.append((self.name, method, value, tags))

    monkeypatch.setattr(metrics, "_get", Fake)
    rows = [
        {"status": "ok"},
        {"status": "ok"},
        {"status": "ok", "capture": "latent"},  # a step capture: a frame, not an image
        {"status": "failed"},
    ]
    metrics.record_batch("j", "a", rows, 0.5)
    metrics.set_queue_depth("j", 3)
    tags = {"job": "j", "actor": "a"}
    assert calls == [
        (metrics.IMAGES_RENDERED, "inc", 2, tags),
        (metrics.FAILURES, "inc", 1, tags),
        (metrics.RENDER_SECONDS, "observe", 0.5, tags),
        (metrics.IMAGES_PER_SECOND, "set", 4.0, tags),
        (metrics.QUEUE_DEPTH, "set", 3, {"job": "j"}),
    ]

    def broken(name: str):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(metrics, "_get", broken)
    monkeypatch.setattr(metrics, "_warned", False)
    with caplog.at_level("WARNING", logger="farm.metrics"):
        metrics.record_batch("j", "a", rows, 0.5)
        metrics.set_queue_depth("j", 1)
        metrics.record_failed("j", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "farm metrics: cannot record (no metrics agent); metrics are off for this process"
    ]


METRICS_JOB = """
name: metricsjob
model: tiny
scheduler: euler
defaults:
  steps: 4
  width: 64
  height: 64
  prompt: a cute shiba inu
sweep:
  init_image: [bad.png, good.png]  # good last: each actor's last batch renders, so its images/s is above 0
  seed: [1, 2, 3, 4]
"""


def test_every_dashboard_metric_is_exported_during_a_render(ray_session, tmp_path: Path) -> None:
    """Render a small job on the session's Ray and scrape the node's metrics agent while it runs.

    bad.png changes after the job is read, so its 4 tasks fail (their init image's sha256 differs)
    and the failure counter is exported too; the 4 others render.
    """
    from PIL import Image

    from farm.driver import RenderOptions, run_job
    from farm.spec import load_job

    ray = ray_session
    for name in ("good.png", "bad.png"):
        Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / name)
    job_file = tmp_path / "metrics.yaml"
    job_file.write_text(METRICS_JOB)
    spec = load_job(job_file)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "bad.png")
    port = metrics_port(ray)

    wanted = set().union(*map(metric_names, dashboard_queries()))
    result: dict[str, object] = {}
    options = RenderOptions(out=str(tmp_path / "out"), batch_size=2, progress=False)
    render = threading.Thread(target=lambda: result.update(summary=run_job(spec, options)))
    render.start()
    seen: dict[str, list[str]] = {}
    scrapes_during_render = 0
    # Ray reports metrics every ~10 s: scrape while rendering and after, until every name is there.
    # (Stop soon after: a finished actor's gauges leave the export some 20 s after it is gone.)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        rendering = render.is_alive()
        try:
            seen = scrape(port)
        except OSError:  # the agent may still be starting (URLError is an OSError)
            time.sleep(0.5)
            continue
        scrapes_during_render += rendering
        failed = total(seen.get("ray_farm_failures_total", []), job="metricsjob")
        if not rendering and wanted <= set(seen) and failed >= 4:
            break
        time.sleep(0.5)
    render.join()
    assert scrapes_during_render, "the render ended before the first scrape"
    summary = result["summary"]
    assert (summary.rendered, summary.failed) == (4, 4), summary.errors
    missing = wanted - set(seen)
    assert not missing, f"dashboard metrics not exported: {sorted(missing)}"
    assert total(seen["ray_farm_images_rendered_total"], job="metricsjob") == 4
    assert total(seen["ray_farm_failures_total"], job="metricsjob") == 4
    assert total(seen["ray_farm_render_seconds_count"], job="metricsjob") == 4  # 4 batches of 2
    assert any('job="metricsjob"' in line for line in seen["ray_farm_queue_depth"])
    assert total(seen["ray_farm_images_per_second"], job="metricsjob") > 0
