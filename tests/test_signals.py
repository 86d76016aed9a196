"""SIGTERM (what `ray job stop` and schedulers send) ends a render as Ctrl-C does: finished
batches saved, one line saying how to resume, exit 143, and the embedded Ray shut down, at any
moment, start-up included. While a render runs, a second render of the same job is refused in
one line naming it (farm.lock), and the rerun after the TERM finishes every task exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_resume import JOB

from farm.cli import main
from farm.driver import RenderOptions, run_job
from farm.images import sha256_bytes
from farm.manifest import read_manifest
from farm.spec import load_job

pytestmark = pytest.mark.slow

RAY_DAEMONS = {"raylet", "gcs_server"}
RESUME_LINE = "terminated: finished batches are saved; run the same command again to resume"


def farm_render(job: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "farm.cli", "render", str(job), "--out", str(out), "--batch-size", "2"]
    cmd += ["--flush-seconds", "0", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def processes() -> dict[int, tuple[int, str, str]]:
    """Every process now: pid -> (parent pid, name, state), from /proc (ps's own source)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
            found[int(entry.name)] = (int(parent), name, state)
    return found


def descendants(pid: int) -> dict[int, str]:
    """The processes that process ``pid`` started, and theirs (its embedded Ray's raylet, GCS,
    agents and workers): pid -> name."""
    table = processes()
    family, grew = {pid}, True
    while grew:
        children = {p for p, (parent, _, _) in table.items() if parent in family} - family
        family |= children
        grew = bool(children)
    return {p: table[p][1] for p in family - {pid}}


def running(daemons: dict[int, str]) -> dict[int, str]:
    """Those of ``daemons`` still running (the same pid and name, not a zombie)."""
    table = processes()
    return {p: name for p, name in daemons.items() if p in table and table[p][1] == name and table[p][2] != "Z"}


def wait_until(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"farm exited before {what}: {proc.communicate()}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def terminate(proc: subprocess.Popen, daemons: dict[int, str]) -> str:
    """SIGTERM to the farm process alone; its exit code, its stderr, and its Ray gone (``daemons``:
    the processes it had started) within a few seconds: checked."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    assert "Token authentication is enabled" not in stderr, stderr  # Ray's notice on every start: silenced
    assert [line for line in stderr.splitlines() if "resume" in line or "error" in line] == [RESUME_LINE], stderr
    deadline = time.monotonic() + 5
    while running(daemons) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(daemons), f"Ray outlived farm: {running(daemons)}"
    return stderr


def test_sigterm_mid_run_saves_batches_stops_ray_and_the_rerun_finishes(ray_session, tmp_path: Path):
    job = tmp_path / "crash.yaml"
    job.write_text(JOB)
    out = tmp_path / "out"
    root = out / "crash"

    proc = farm_render(job, out)
    wait_until(lambda: any((root / "manifest").glob("part-*.parquet")), 240, proc, "the first rows")
    daemons = descendants(proc.pid)
    assert set(daemons.values()) >= RAY_DAEMONS

    # The same job again meanwhile (another batch size would give other bytes): refused, naming the first
    second = CliRunner().invoke(main, ["render", str(job), "--out", str(out), "--batch-size", "4", "--no-progress"])
    assert second.exit_code == 2, second.output
    assert second.output.startswith(f"error: {out}/crash is being rendered by pid {proc.pid} on host "), second.output
    assert len(second.output.strip().splitlines()) == 1

    terminate(proc, daemons)
    assert not (root / "lock.json").exists(), "the lock is released on SIGTERM"
    rows = read_manifest(str(root), superseded=True).to_pylist()
    landed = len(rows)
    assert 0 < landed < 96 and {r["batch_size"] for r in rows} == {2}  # only the first run wrote rows

    # The rerun skips what was saved and renders the rest as the same batches
    summary = run_job(load_job(job), RenderOptions(out=str(out), batch_size=2, progress=False))
    assert (summary.skipped, summary.rendered, summary.failed) == (landed, 96 - landed, 0)
    ok = [r for r in read_manifest(str(root), superseded=True).to_pylist() if r["status"] == "ok"]
    for row in ok:
        assert sha256_bytes((root / row["image_path"]).read_bytes()) == row["image_sha256"]
    ids = [r["task_id"] for r in ok]
    tasks = {t.task_id for t in load_job(job).tasks()}
    outcome = {"tasks": len(tasks), "ok_rows": len(ok), "duplicates": len(ids) - len(set(ids))}
    assert outcome | {"lost": len(tasks - set(ids))} == {"tasks": 96, "ok_rows": 96, "duplicates": 0, "lost": 0}


def test_sigterm_during_start_up_leaves_no_ray_running(tmp_path: Path):
    job = tmp_path / "crash.yaml"
    job.write_text(JOB)
    out = tmp_path / "out"
    proc = farm_render(job, out)
    # Ray's daemons are up, the actors not yet rendering: start-up
    wait_until(lambda: set(descendants(proc.pid).values()) >= RAY_DAEMONS, 120, proc, "Ray to start")
    time.sleep(1)  # its agents and workers starting too
    daemons = descendants(proc.pid)
    assert not list((out / "crash" / "manifest").glob("part-*.parquet")), "the TERM must come before rendering"
    terminate(proc, daemons)
    assert not (out / "crash" / "lock.json").exists()
