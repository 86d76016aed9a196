"""One writer per job folder (farm.lock): a second render of a held job is refused in one line
naming the holder, or waits with --wait; a holder that is gone never blocks a rerun.

Fast: no Ray. The CLI tests make start_ray fail, so a run that got past the lock when it should
not have shows at once. (Two real renders at once, and the lock released on SIGTERM:
test_signals.py.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm import driver
from farm.cli import main
from farm.errors import FarmError

LOCK = "lock.json"  # layout.LOCK_FILE


def write_lock(root: Path, pid: int, host: str | None = None, age: float = 0.0, refresh: float = 15.0) -> None:
    """A lock file as another run would leave it: ``age`` seconds since its last refresh."""
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "started": now - age - 60,
        "command": "farm render small.yaml",
        "token": f"other-{pid}",
        "refreshed": now - age,
        "refresh_seconds": refresh,
    }
    (root / LOCK).write_text(json.dumps(record))


def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address: str | None) -> bool:
        raise FarmError("ray would start here")

    monkeypatch.setattr(driver, "start_ray", refuse)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def test_a_second_run_of_a_held_job_exits_2_naming_the_holder(small_job: Path, tmp_path: Path, monkeypatch):
    no_ray(monkeypatch)
    out = tmp_path / "out"
    write_lock(out / "small", os.getpid())  # a live run: this very process
    result = CliRunner().invoke(main, ["render", str(small_job), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    expected = f"error: {out}/small is being rendered by pid {os.getpid()} on host {socket.gethostname()} since "
    assert lines[0].startswith(expected) and lines[0].endswith("(farm render --wait waits for it)"), lines[0]
    assert sorted(p.name for p in (out / "small").iterdir()) == [LOCK]  # the second run wrote nothing
    assert json.loads((out / "small" / LOCK).read_text())["pid"] == os.getpid()  # and left the lock alone


def test_dry_run_takes_no_lock(small_job: Path, tmp_path: Path):
    out = tmp_path / "out"
    write_lock(out / "small", os.getpid())
    result = CliRunner().invoke(main, ["render", str(small_job), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0 and result.output.startswith("small: 12 tasks"), result.output


def test_wait_waits_for_a_live_holder(small_job: Path, tmp_path: Path, monkeypatch):
    from farm import lock

    no_ray(monkeypatch)
    monkeypatch.setattr(lock, "POLL_SECONDS", 0.05)
    out = tmp_path / "out"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(out / "small", holder.pid)
        threading.Timer(1.0, lambda: (out / "small" / LOCK).unlink()).start()  # the holder finishes
        start = time.monotonic()
        result = CliRunner().invoke(main, ["render", str(small_job), "--out", str(out), "--wait"])
        waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    waiting = f"waiting: {out}/small is being rendered by pid {holder.pid} on host "
    assert result.stderr.startswith(waiting), result.stderr
    # Past the lock once it was free: the run went on to prepare the folder and start Ray
    assert result.exit_code == 2 and result.output.strip().endswith("error: ray would start here"), result.output
    assert waited >= 0.9
    assert (out / "small" / "job.yaml").is_file()
    assert not (out / "small" / LOCK).exists(), "the waiting run released the lock it took"


def test_a_stale_lock_whose_process_is_gone_on_this_host_is_taken_over_at_once(tmp_path: Path):
    from farm.lock import JobLock

    root = tmp_path / "job"
    write_lock(root, dead_pid())  # kill -9 of the driver: its lock stays, its pid is gone
    lock = JobLock(str(root))
    start = time.monotonic()
    lock.acquire()
    try:
        assert time.monotonic() - start < 1.0
        assert json.loads((root / LOCK).read_text())["token"] == lock.me.token
    finally:
        lock.release()
    assert not (root / LOCK).exists()


def test_a_zombie_holder_counts_as_gone(tmp_path: Path):
    from farm.lock import JobLock

    zombie = subprocess.Popen(["true"])
    try:
        time.sleep(0.3)  # exited, not yet reaped: kill(pid, 0) still answers
        write_lock(tmp_path / "job", zombie.pid)
        lock = JobLock(str(tmp_path / "job"))
        lock.acquire()
        lock.release()
    finally:
        zombie.wait()


def test_another_hosts_lease_holds_until_it_expires(tmp_path: Path):
    from farm.lock import EXPIRES_AFTER, JobLock, JobLocked

    root = tmp_path / "job"
    write_lock(root, 4242, host="render-node-7", age=5)  # fresh: its holder may well run
    with pytest.raises(JobLocked) as refused:
        JobLock(str(root), "out/job").acquire()
    assert str(refused.value).startswith("out/job is being rendered by pid 4242 on host render-node-7 since ")

    write_lock(root, 4242, host="render-node-7", age=15 * EXPIRES_AFTER + 1)  # not refreshed for a minute
    lock = JobLock(str(root))
    lock.acquire()
    try:
        assert json.loads((root / LOCK).read_text())["host"] == socket.gethostname()
    finally:
        lock.release()


def test_the_holder_refreshes_its_lease_and_notices_a_take_over(tmp_path: Path):
    from farm.lock import JobLock, LockLost

    root = tmp_path / "job"
    lock = JobLock(str(root), refresh_seconds=0.05)
    lock.acquire()
    try:
        first = json.loads((root / LOCK).read_text())["refreshed"]
        time.sleep(0.3)
        assert json.loads((root / LOCK).read_text())["refreshed"] > first
        lock.check()  # still ours
        write_lock(root, 4242, host="render-node-7")  # another run decided our lease had expired
        time.sleep(0.3)
        with pytest.raises(LockLost, match="pid 4242 on host render-node-7 .* took it over"):
            lock.check()
        assert json.loads((root / LOCK).read_text())["pid"] == 4242  # its lock is not overwritten
    finally:
        lock.release()
    assert json.loads((root / LOCK).read_text())["pid"] == 4242  # nor deleted


def test_of_many_runs_starting_at_once_exactly_one_takes_the_lock(tmp_path: Path):
    from farm.lock import JobLock, JobLocked

    for round_ in range(10):
        root = tmp_path / f"job{round_}"
        write_lock(root, dead_pid())  # a dead holder too, so every run also races to take it over
        locks = [JobLock(str(root)) for _ in range(6)]
        start = threading.Barrier(len(locks))
        won: list[JobLock] = []
        errors: list[BaseException] = []

        def run(lock: JobLock, start: threading.Barrier, won: list[JobLock], errors: list[BaseException]) -> None:
            start.wait()
            try:
                lock.acquire()
                won.append(lock)
            except JobLocked:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below, with the round
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(lock, start, won, errors)) for lock in locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"round {round_}: {errors}"
        assert len(won) == 1, f"round {round_}: {len(won)} runs hold the lock"
        assert json.loads((root / LOCK).read_text())["token"] == won[0].me.token
        won[0].release()
        # No lock and no leftovers: only the take-over's guard, made because a lock was taken over
        assert sorted(p.name for p in root.iterdir()) == [".lock.json.takeover"]


def test_a_lease_starts_when_the_lock_is_taken_not_when_the_joblock_was_made(tmp_path: Path, monkeypatch):
    """After a --wait longer than a lease, the lock written names a fresh lease: another host's
    run does not take it over at once."""
    from farm import lock as lock_module
    from farm.lock import JobLock, JobLocked

    root = tmp_path / "job"
    lock = JobLock(str(root), "out/job")
    later = time.time() + 600  # ten minutes waited
    monkeypatch.setattr(lock_module.time, "time", lambda: later)
    lock.acquire()
    try:
        record = json.loads((root / LOCK).read_text())
        assert record["refreshed"] == later and record["started"] == later
        monkeypatch.setattr(lock_module.socket, "gethostname", lambda: "render-node-7")  # another host's run
        with pytest.raises(JobLocked, match="is being rendered by pid"):
            JobLock(str(root), "out/job").acquire()
        assert json.loads((root / LOCK).read_text())["token"] == record["token"]  # not taken over
    finally:
        lock.release()


def test_a_refresher_that_fails_ends_the_lease_visibly(tmp_path: Path, monkeypatch):
    """Not an OSError (a bug, a library's own error): the lease ends and check says why, rather
    than the thread dying silently and the lease expiring unnoticed."""
    from farm.lock import JobLock, LockLost

    root = tmp_path / "job"
    lock = JobLock(str(root), "out/job", refresh_seconds=0.05)
    lock.acquire()
    try:

        def broken() -> bool:
            raise ValueError("a bad lock record")

        monkeypatch.setattr(lock, "refresh", broken)
        time.sleep(0.3)
        with pytest.raises(LockLost, match=r"its lease could not be renewed \(ValueError: a bad lock record\)"):
            lock.check()
    finally:
        lock.release()
