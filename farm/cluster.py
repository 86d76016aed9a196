"""Ray for a run: join a cluster, or start an embedded local Ray, and stop what we started.

The driver calls ``start_ray`` before its actors start and ``stop_ray`` when the run ends,
however it ends; nothing else in farm starts or stops Ray. Ray is imported inside functions,
so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

from farm.errors import FarmError, Terminated

# When this process started its embedded Ray (time.time()), or None: Ray is one per process, and
# so is this. stop_ray ends only Ray processes of ours created since (never another Ray's).
_embedded_since: float | None = None
# Ray's processes: its daemons by name; its workers and agents by the title they give themselves.
RAY_DAEMONS = ("raylet", "gcs_server")
RAY_TITLE = "ray::"
# After ray.shutdown, what is left of our Ray gets this long to exit on SIGTERM before SIGKILL.
RAY_STOP_SECONDS = 1.0
RAY_TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"


def start_ray(address: str | None) -> bool:
    """Join a cluster at ``address``, or start an embedded local Ray. True if we started it.

    Ray's init replaces the process's SIGTERM handler with one that exits at once (code 15,
    nothing saved, nothing shut down); the caller's handler is put back. A start that does not
    finish (it fails, or Ctrl-C or SIGTERM comes mid-start) shuts down what it had started, so
    no Ray process outlives us.
    """
    import ray

    global _embedded_since
    if ray.is_initialized():
        return False
    _embedded_since = None if address else time.time()
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    # Ray 2.60 turns token authentication on for a new local Ray and warns about it on every
    # start: farm wants it on (docs/cluster.md), so the notice is only noise above the summary.
    logging.getLogger(RAY_TOKEN_NOTICE).setLevel(logging.ERROR)
    main_thread = threading.current_thread() is threading.main_thread()
    term_handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local" always starts a new Ray, never joins one named by RAY_ADDRESS or `ray start`;
            # it serves no dashboard: nothing listens beyond what Ray itself needs.
            ray.init(address="local", include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        stop_ray()
        raise FarmError(f"--address {address or 'local'}: cannot start or join Ray: {exc}") from exc
    except SystemExit as exc:  # Ray's own SIGTERM handler, in force while its init runs
        stop_ray()
        if exc.code == signal.SIGTERM:
            raise Terminated() from None
        raise
    except BaseException:
        stop_ray()
        raise
    finally:
        if term_handler is not None:
            signal.signal(signal.SIGTERM, term_handler)
    return True


def stop_ray() -> None:
    """Shut down the Ray that start_ray started, and whatever of an embedded one is left.

    ray.shutdown stops what ray.init started (raylet, GCS), not what the raylet started: its
    agents (dashboard, runtime env) and workers. Those follow the raylet within seconds, except
    when it goes mid-start (a SIGTERM during start-up): then the agents wait up to a minute to
    report its death to a GCS that is gone too. So the embedded Ray's processes among this
    process's descendants (listed before shutdown orphans them) that outlive it are ended.
    """
    import ray

    global _embedded_since
    since, _embedded_since = _embedded_since, None
    leftovers = _ray_descendants(since) if since is not None else []
    ray.shutdown()
    if not leftovers:
        return
    import psutil  # Ray's own (it ships one), present wherever Ray is

    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=RAY_STOP_SECONDS)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _ray_descendants(since: float) -> list[Any]:
    """Ray's processes among this process's descendants created since ``since`` (psutil.Process)."""
    try:
        import psutil
    except ImportError:  # no psutil: ray.shutdown alone, as before
        return []
    found = []
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                command = process.cmdline()
                # a worker's or agent's title; or Ray's own Python scripts (dashboard, log monitor)
                ray_own = process.name() in RAY_DAEMONS or (command and command[0].startswith(RAY_TITLE))
                ray_own = ray_own or any("/ray/" in part for part in command[1:2])
                if ray_own and process.create_time() >= since - 1:
                    found.append(process)
    return found
