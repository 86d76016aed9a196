"""The actor pool: the render actors, the batches each has in flight, and the ones resting.

``start_actors`` starts the ``BatchRenderer`` actors a plan asks for and waits until each
has loaded its model. The driver then asks the pool which actors have room, hands each a
batch, and waits on the pool for the next answer. An actor that died (killed, or its node
lost) rests: it gets no work until Ray has restarted it and it answers a ``ready()`` call,
asked after a rest that doubles with each failed ask. The pool never decides what becomes
of a batch; it reports what came back and leaves retries to the driver.

Ray is imported inside the methods, so importing this module (as the driver does) stays light.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from farm.actor import BatchRenderer
from farm.errors import FarmError, FatalRenderError
from farm.spec import Batch, SafetyCheck

# One batch rendering and one queued per actor: the actor never waits for the driver, and
# no more than two batches of work are lost with it if it dies.
IN_FLIGHT_PER_ACTOR = 2
# An actor that died rests before it is asked whether Ray has restarted it: a restart
# imports torch and loads the model (seconds), and calls before that fail at once.
ACTOR_REST_SECONDS = 1.0
MAX_ACTOR_REST_SECONDS = 30.0

Ticket = TypeVar("Ticket")


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each asks Ray for (the driver's plan_actors makes one)."""

    count: int
    num_gpus: int
    num_cpus: float
    threads: int | None  # torch threads per actor; None leaves torch's default (GPU actors)


def start_actors(
    plan: ActorPlan,
    job: str,
    job_root: str,
    model_ref: str,
    dtype: str,
    allow_pickle: bool,
    model_config: str | None,
    safety_check: SafetyCheck | None = None,
    compile: bool = False,
) -> list[Any]:
    """Start the render actors; each loads ``model_ref`` before any batch.

    Any actor that cannot start (a model that fails to load, say) stops them all, with the
    cause's one line as a FarmError.
    """
    import ray

    remote = ray.remote(
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
        # Across nodes rather than packed: a lost node takes as few actors with it as it can.
        scheduling_strategy="SPREAD",
        # Ray restarts a dead actor for ever; the pool rests it until it is back (ActorPool).
        # A call is never retried by Ray: the driver decides what happens to the batch.
        max_restarts=-1,
        max_task_retries=0,
    )(BatchRenderer)
    actors = [
        remote.remote(job, job_root, model_ref, dtype, allow_pickle, model_config, plan.threads, safety_check, compile)
        for _ in range(plan.count)
    ]
    try:  # the model loads in each actor's __init__: ready() answers once it has, or raises why not
        ray.get([a.ready.remote() for a in actors])
    except Exception as exc:
        for actor in actors:
            ray.kill(actor)
        raise FarmError(error_message(exc)) from exc
    return actors


# "farm.models.ModelError: " before the message in a traceback's last line (an actor that died
# in __init__ carries only that text, no cause): the user's line is what follows it. Only a
# dotted name, as tracebacks print farm's classes; a builtin's "ValueError: " stays as before.
_CLASS_PREFIX = re.compile(r"^(?:\w+\.)+\w+: ")


def error_message(exc: BaseException) -> str:
    """The user's one line from a Ray error: the original exception's message, not Ray's wrapper."""
    cause = getattr(exc, "cause", None) or getattr(exc, "base_exception", None)
    if cause is not None and cause is not exc:
        return error_message(cause)
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        if line.strip() and ("Error:" in line or "error:" in line):
            return _CLASS_PREFIX.sub("", line.strip())
    return text.splitlines()[-1] if text else type(exc).__name__


def fatal_cause(exc: BaseException) -> FatalRenderError | None:
    """The FatalRenderError behind a render's error (a retry cannot help), or None. Ray's error is
    an instance of its cause's class and carries the cause too, so the cause chain is walked."""
    while exc is not None:
        if isinstance(exc, FatalRenderError):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if cause is not exc else None
    return None


@dataclass(frozen=True)
class Reply(Generic[Ticket]):
    """What came back for one batch: its rows, or why there are none.

    ``lost`` is set when the actor died or is restarting (not the batch's fault); ``error``
    when the render raised, and ``fatal`` when that error says a retry cannot help; ``stop`` is
    the write error when no other batch could be written either (a full disk). The ticket is
    whatever the driver handed in with the batch.
    """

    ticket: Ticket
    rows: list[dict[str, Any]] | None = None
    lost: BaseException | None = None
    error: BaseException | None = None
    fatal: bool = False
    stop: OSError | None = None


class ActorPool(Generic[Ticket]):
    """Render actors with a bounded number of batches each (backpressure), resting the dead."""

    def __init__(self, actors: list[Any], in_flight_per_actor: int = IN_FLIGHT_PER_ACTOR) -> None:
        self.actors = actors
        self.limit = in_flight_per_actor
        self.load = [0] * len(actors)
        self.in_flight: dict[Any, tuple[int, Ticket]] = {}  # render call -> actor index, ticket
        self.resting: dict[int, float] = {}  # actor index -> when to ask it whether it is back
        self.rests = [0] * len(actors)  # consecutive failed asks, for the back-off
        self.probes: dict[Any, int] = {}  # ready() calls in flight -> actor index

    @property
    def busy(self) -> int:
        """Batches handed out and not yet answered."""
        return len(self.in_flight)

    def wake(self) -> None:
        """Ask each actor whose rest is over whether it is back (one ask at a time per actor)."""
        now = time.monotonic()
        asked = set(self.probes.values())
        for index, actor in enumerate(self.actors):
            if index in self.resting and self.resting[index] <= now and index not in asked:
                self.probes[actor.ready.remote()] = index

    def free_slots(self) -> Iterator[int]:
        """Actors with room, in rounds of one slot per actor, until a round finds none.

        Round by round rather than filling one actor first, so that work which comes a batch
        at a time (chains) spreads over every actor. The caller hands a batch to each index
        it gets (``submit``) or stops asking.
        """
        while True:
            found = False
            for index in range(len(self.actors)):
                if index not in self.resting and self.load[index] < self.limit:
                    found = True
                    yield index
            if not found:
                return

    def submit(self, index: int, batch: Batch, skip: frozenset[str], ticket: Ticket) -> None:
        """Send ``batch`` to actor ``index``; its tasks in ``skip`` are not rendered again."""
        self.in_flight[self.actors[index].render.remote(batch, skip)] = (index, ticket)
        self.load[index] += 1

    def wait(self, deadline: float | None = None) -> list[Reply[Ticket]]:
        """Wait for the next answer, at most until ``deadline`` (time.monotonic()) or a rest ends.

        Returns the reply of the batch that answered, if one did: none when time ran out or
        when the answer was a ready() (which only wakes its actor, or rests it again).
        """
        import ray
        from ray.exceptions import RayActorError, RayError

        asked = set(self.probes.values())
        wakes = [t for i, t in self.resting.items() if i not in asked]
        if deadline is not None:
            wakes.append(deadline)
        timeout = max(0.0, min(wakes) - time.monotonic()) if wakes else None
        waiting = list(self.in_flight) + list(self.probes)
        if not waiting:  # every actor is resting, its ask not due yet
            time.sleep(timeout or 0.0)
            return []
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        replies = []
        for ref in ready:
            if ref in self.probes:
                index = self.probes.pop(ref)
                try:
                    ray.get(ref)
                    del self.resting[index]
                    self.rests[index] = 0
                except RayError:
                    self.rest(index)
                continue
            index, ticket = self.in_flight.pop(ref)
            self.load[index] -= 1
            try:
                replies.append(Reply(ticket, rows=ray.get(ref)))
            except RayActorError as exc:  # the actor died or is restarting: it rests
                self.rest(index)
                replies.append(Reply(ticket, lost=exc))
            except RayError as exc:  # the render raised
                fatal = fatal_cause(exc)
                # stop: the write error a fatal one carries when no batch's writes could succeed (a full disk)
                stop = getattr(fatal, "write_error", None)
                replies.append(Reply(ticket, error=exc, fatal=fatal is not None, stop=stop))
        return replies

    def rest(self, index: int) -> None:
        """Give actor ``index`` no work for a while, twice as long as last time (to a limit)."""
        self.resting[index] = time.monotonic() + min(
            ACTOR_REST_SECONDS * 2 ** self.rests[index], MAX_ACTOR_REST_SECONDS
        )
        self.rests[index] += 1
