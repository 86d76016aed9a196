"""One writer per job folder: the lock a render holds while it writes there.

Two renders of one job at once would both render every task: two ``ok`` rows per task, and
images overwritten by the other run (another ``--batch-size`` gives other bytes) under the first
run's sha256. So ``run_job`` takes the job folder's lock file (``layout.LOCK_FILE``) before
anything writes there, and releases it when the run ends, however it ends.

The file names its holder (host, pid, start time, command). A holder that is gone never blocks
a rerun:

- on the holder's own host, a pid that no longer runs (kill -9, the OOM killer) is taken over
  at once;
- from another host its process cannot be seen, so the lock is a lease: the holder rewrites it
  every ``refresh_seconds`` from a small thread while it runs, and a lock not rewritten for
  ``EXPIRES_AFTER`` refreshes is expired and may be taken over (hosts' clocks must agree to
  well within that).

Taking the lock is atomic where the file system allows: a local path is created with
``O_CREAT | O_EXCL``, which exactly one process wins (local disks, NFSv3 and later). Runs that
all find the same stale lock take it over one at a time, under an ``flock`` of a hidden file
beside it (``.lock.json.takeover``, made only when a lock is taken over; the OS drops an flock
when its process dies, so that one can never go stale): each deletes the lock only if it is still
the stale one it saw, then races for the O_EXCL create like any run. An object store has neither,
so for a URI the lock is written, then read back after a pause, and the run that reads back
another's lock backs off. Two runs starting within that pause of each other on an object store
could still both win: there the lock is a safeguard, not a proof.

No torch, no ray: records layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pyarrow import fs as pafs

from farm import storage
from farm.errors import FarmError, RunFailed
from farm.layout import LOCK_FILE

# The holder rewrites its lease this often; a lease not rewritten for EXPIRES_AFTER of these (a
# minute) belongs to a run that is gone (or so stalled that its lease is fair game).
REFRESH_SECONDS = 15.0
EXPIRES_AFTER = 4
# --wait looks at the lock this often, and says it is still waiting this often.
POLL_SECONDS = 2.0
WAIT_NOTICE_SECONDS = 60.0
# A URI has no exclusive create: after writing the lock, wait this long for a racer's write to
# land, then read it back to see whose it is.
URI_SETTLE_SECONDS = 2.0
# Rounds of create / read / take over a stale lock before reporting whoever holds it now.
TAKE_ATTEMPTS = 5


class JobLocked(FarmError):
    """The job folder is held by another live run: exit 2, the message names the holder."""

    def __init__(self, message: str, holder: Holder) -> None:
        super().__init__(message)
        self.holder = holder


class LockLost(RunFailed):
    """Another run took the job folder over while this one ran (this run missed its lease): this
    run stops writing; exit 1."""


@dataclass(frozen=True)
class Holder:
    """Who holds a job folder: the lock file's content."""

    host: str
    pid: int
    started: float  # time.time() when the run took the lock
    command: str
    token: str  # this taking's own id: a lock read back is ours only if the token is ours
    refreshed: float  # time.time() of the last rewrite (the lease)
    refresh_seconds: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder a lock file names, or None if it is not one (empty: its writer has just
        created it; or corrupt)."""
        try:
            record = json.loads(data)
            return cls(
                host=str(record["host"]),
                pid=int(record["pid"]),
                started=float(record["started"]),
                command=str(record.get("command", "")),
                token=str(record["token"]),
                refreshed=float(record["refreshed"]),
                refresh_seconds=float(record["refresh_seconds"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    @classmethod
    def unknown(cls, written: float) -> Holder:
        """A lock file that names no one: it counts as a lease renewed when it was written."""
        return cls("", 0, written, "", "", written, REFRESH_SECONDS)

    def describe(self) -> str:
        if not self.token:
            return f"a run whose lock file is unreadable, written at {clock(self.started)}"
        return f"pid {self.pid} on host {self.host} since {clock(self.started)}"

    def alive(self, now: float | None = None) -> bool:
        """Whether the holder may still be running: its lease is fresh and, on this host, its pid runs."""
        now = time.time() if now is None else now
        if now - self.refreshed > self.refresh_seconds * EXPIRES_AFTER:
            return False
        return self.host != socket.gethostname() or pid_running(self.pid)


def clock(when: float) -> str:
    """A time of day as the user reads it (with the date when it is not today)."""
    moment = time.localtime(when)
    same_day = time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", moment)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    # A zombie (ended, not yet reaped by its parent) still answers kill(0); it is gone all the same.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): kill(0) is all there is
        return True
    return state not in ("Z", "X")


def command_line() -> str:
    """This process's command, for the lock file (shortened: it only helps a person find the run)."""
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    return shlex.join(argv)[:500]


class JobLock:
    """The lock of the job folder ``root`` (a path or a pyarrow.fs URI).

    ``acquire`` takes it (or waits for it), a thread keeps its lease fresh, ``check`` raises
    LockLost if another run has taken it over since, and ``release`` gives it back.
    ``label`` names the folder in messages (as the user wrote it); ``retry`` is the command a
    refusal suggests to wait for the holder.
    """

    def __init__(
        self,
        root: str,
        label: str | None = None,
        refresh_seconds: float = REFRESH_SECONDS,
        command: str | None = None,
        retry: str = "farm render --wait",
    ) -> None:
        self.filesystem, self.base = storage.open_root(root)
        self.local = "://" not in root
        self.path = storage.join(self.base, LOCK_FILE)
        self.label = label or root
        self.retry = retry
        now = time.time()
        self.me = Holder(
            socket.gethostname(), os.getpid(), now, command or command_line(), uuid.uuid4().hex, now, refresh_seconds
        )
        self.held = False
        self.lost: str | None = None  # set by the refresher when the lock is no longer ours
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(
        self, wait: bool = False, notify: Callable[[str], None] | None = None, poll_seconds: float | None = None
    ) -> None:
        """Take the lock. If a live run holds it: raise JobLocked naming it, or with ``wait``,
        look again every ``poll_seconds`` until it is free, telling ``notify`` now and then."""
        poll = POLL_SECONDS if poll_seconds is None else poll_seconds
        told: float | None = None
        while (holder := self._take()) is not None:
            if not wait:
                raise JobLocked(
                    f"{self.label} is being rendered by {holder.describe()} ({self.retry} waits for it)", holder
                )
            if notify is not None and (told is None or time.monotonic() - told >= WAIT_NOTICE_SECONDS):
                notify(f"waiting: {self.label} is being rendered by {holder.describe()}")
                told = time.monotonic()
            time.sleep(poll)
        self.held = True
        self._stop.clear()
        self._refresher = threading.Thread(target=self._keep, name="farm-job-lock", daemon=True)
        self._refresher.start()

    def check(self) -> None:
        """Raise LockLost if another run has taken the folder over (this run must stop writing)."""
        if self.lost is not None:
            raise LockLost(self.lost)

    def refresh(self) -> bool:
        """Renew the lease, if the lock is still ours; False once it is not."""
        try:
            current = self._read(self.path)
            if current is None or current.token != self.me.token:
                taker = "its lock file was removed" if current is None else f"{current.describe()} took it over"
                self.lost = f"{self.label}: {taker} after this run missed its lease; stopped, rerun to finish"
                return False
            self.me = replace(self.me, refreshed=time.time())
            storage.write_bytes(self.filesystem, self.path, self.me.to_bytes())
        except OSError:  # a passing I/O error: the next refresh, well within the lease, tries again
            pass
        return True

    def release(self) -> None:
        """Stop renewing and delete the lock file, if it is still ours."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if not self.held:
            return
        self.held = False
        try:
            current = self._read(self.path)
            if current is not None and current.token == self.me.token:
                self.filesystem.delete_file(self.path)
        except OSError:  # left behind, it names a run that has ended: the next run takes it over
            pass

    # -----------------------------------------------------------------------------------

    def _keep(self) -> None:
        while not self._stop.wait(self.me.refresh_seconds):
            try:
                if not self.refresh():
                    return
            except Exception as exc:  # noqa: BLE001 - not an OSError: the lease ends, and says why (check raises it)
                why = f"{type(exc).__name__}: {exc}"
                self.lost = f"{self.label}: its lease could not be renewed ({why}); stopped, rerun to finish"
                return

    def _take(self) -> Holder | None:
        """Take the lock if it is free or its holder is gone; else return the live holder."""
        for _ in range(TAKE_ATTEMPTS):
            if self._create():
                return None
            current = self._read(self.path)
            if current is None:  # released between our try and our look: try again
                continue
            if current.alive():
                return current
            self._remove_stale(current)
        return self._read(self.path) or Holder.unknown(time.time())

    def _create(self) -> bool:
        """Create the lock file naming us, only if there is none; True if we did. The lease
        starts now, not when this JobLock was made (a --wait may have waited long past a lease)."""
        now = time.time()
        self.me = replace(self.me, started=now, refreshed=now)
        data = self.me.to_bytes()
        self.filesystem.create_dir(self.base, recursive=True)
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
            except BaseException:  # an empty lock would block others for a lease: remove it
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            return True
        if storage.exists(self.filesystem, self.path):
            return False
        storage.write_bytes(self.filesystem, self.path, data)
        time.sleep(URI_SETTLE_SECONDS)  # a racer's write lands meanwhile: the last writer wins
        back = self._read(self.path)
        return back is not None and back.token == self.me.token

    def _remove_stale(self, stale: Holder) -> None:
        """Delete a lock whose holder is gone, unless it has changed since we saw it (a racer
        took it over and put its own in its place, or its holder came back and refreshed it)."""
        with self._takeover_guard():
            current = self._read(self.path)
            if current == stale:
                with contextlib.suppress(FileNotFoundError):
                    self.filesystem.delete_file(self.path)

    @contextlib.contextmanager
    def _takeover_guard(self) -> Iterator[None]:
        """One take-over at a time among this folder's runs: between one's look and its delete,
        another could have replaced the stale lock with its own fresh one, which would go too."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unguarded, the window is one read and one delete
            yield
            return
        if not self.local:  # nothing to flock on an object store
            yield
            return
        fd = os.open(storage.join(self.base, f".{LOCK_FILE}.takeover"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            with contextlib.suppress(OSError):  # a file system without flock: unguarded, as above
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and with it the flock

    def _read(self, path: str) -> Holder | None:
        """The holder a lock file names, None if there is no file, or ``Holder.unknown`` (aged by
        the file's mtime) if it names no one."""
        for attempt in range(3):
            try:
                data = storage.read_bytes(self.filesystem, path)
            except OSError:  # not every file system says FileNotFoundError for a missing file
                if not storage.exists(self.filesystem, path):
                    return None
                if attempt < 2:  # created between our read and our look: read it again
                    continue
                raise
            holder = Holder.from_bytes(data)
            if holder is not None:
                return holder
            time.sleep(0.2)  # just created, its content not yet written: look again
        info = self.filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        return Holder.unknown(info.mtime.timestamp() if info.mtime else 0.0)
