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
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from farm.actor import BatchRenderer
from farm.columns import table_from_ipc
from farm.errors import FarmError, FatalRenderError
from farm.spec import Batch, SafetyCheck

if TYPE_CHECKING:
    import pyarrow as pa

# One batch rendering and one queued per actor: the actor never waits for the driver, and
# no more than two batches of work are lost with it if it dies. The actor runs that many calls
# at once (threads): one batch on the model at a time (BatchRenderer.lock), while the one before
# it finishes writing its PNGs (on a GPU actor, in its PNG pool), so the GPU does not wait for them.
IN_FLIGHT_PER_ACTOR = 2
# An actor that died rests before it is asked whether Ray has restarted it: a restart
# imports torch and loads the model (seconds), and calls before that fail at once.
ACTOR_REST_SECONDS = 1.0
MAX_ACTOR_REST_SECONDS = 30.0
# A Ray call costs the driver about a millisecond, so batches that render in less (a null actor,
# a tiny model) would cap the driver near a thousand batches a second. Once replies show batches
# that quick, several go in one call, enough for about GROUP_SECONDS of work: a call of real
# renders (tenths of a second and up) stays one batch, and an actor that dies loses no more
# than IN_FLIGHT_PER_ACTOR x GROUP_SECONDS of work. MAX_GROUP bounds a call's size whatever the rate.
GROUP_SECONDS = 0.05
MAX_GROUP = 32
# How much each reply moves the estimate of a batch's render time (an exponential average).
GROUP_SMOOTHING = 0.2

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
        # A threaded actor: each batch it holds runs in its own thread, so one can write its PNGs
        # while the next denoises (BatchRenderer serialises the model work itself). Ray then runs
        # calls in any order, which changes nothing: batches are independent, a chain's next frame
        # is only sent once the frame before has its rows. And ready() answers without waiting
        # for a render: the pool asks it only of a resting actor, whose calls failed (it died, so
        # the restarted process has none; or it was unreachable, and a render still running there
        # only means later batches queue in Ray behind the ones it holds, the lock keeping them apart).
        max_concurrency=IN_FLIGHT_PER_ACTOR,
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
    the write error when no other batch could be written either (a full disk); ``alone`` when
    the call that carried it with other batches failed as a whole (nothing says which batch
    caused it: each should go again in a call of its own). The ticket is whatever the driver
    handed in with the batch.
    """

    ticket: Ticket
    rows: list[dict[str, Any]] | pa.Table | None = None  # a table from an actor (render_batches)
    lost: BaseException | None = None
    error: BaseException | None = None
    fatal: bool = False
    stop: OSError | None = None
    alone: bool = False


def error_reply(ticket: Ticket, exc: BaseException) -> Reply[Ticket]:
    """The reply for a batch whose render raised ``exc`` (Ray's error, or the one the actor returned)."""
    fatal = fatal_cause(exc)
    # stop: the write error a fatal one carries when no batch's writes could succeed (a full disk)
    return Reply(ticket, error=exc, fatal=fatal is not None, stop=getattr(fatal, "write_error", None))


class ActorPool(Generic[Ticket]):
    """Render actors with a bounded number of batches each (backpressure), resting the dead."""

    def __init__(self, actors: list[Any], in_flight_per_actor: int = IN_FLIGHT_PER_ACTOR) -> None:
        self.actors = actors
        self.limit = in_flight_per_actor
        self.load = [0] * len(actors)
        # render call -> actor index, its batches' tickets, when it was sent
        self.in_flight: dict[Any, tuple[int, list[Ticket], float]] = {}
        self.resting: dict[int, float] = {}  # actor index -> when to ask it whether it is back
        self.rests = [0] * len(actors)  # consecutive failed asks, for the back-off
        self.probes: dict[Any, int] = {}  # ready() calls in flight -> actor index
        self.answered = [0.0] * len(actors)  # when each actor last answered a call (time.monotonic())
        self.batch_seconds: float | None = None  # an actor's time per batch, from its replies

    @property
    def busy(self) -> int:
        """Calls handed out and not yet answered."""
        return len(self.in_flight)

    @property
    def batches_out(self) -> int:
        """Batches handed out and not yet answered."""
        return sum(len(tickets) for _, tickets, _ in self.in_flight.values())

    def group_size(self) -> int:
        """How many batches the next call carries: one, until replies show batches render in well
        under GROUP_SECONDS; then enough for about that much work (at most MAX_GROUP)."""
        if self.batch_seconds is None or self.batch_seconds >= GROUP_SECONDS:
            return 1
        return max(1, min(MAX_GROUP, int(GROUP_SECONDS / max(self.batch_seconds, 1e-6))))

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

    def submit(self, index: int, batches: list[Batch], skips: list[frozenset[str]], tickets: list[Ticket]) -> None:
        """Send ``batches`` to actor ``index`` in one call (``BatchRenderer.render_batches``); the tasks
        in each one's ``skips`` entry are not rendered again. A call takes one of the actor's slots."""
        call = self.actors[index].render_batches.remote(batches, skips)
        self.in_flight[call] = (index, tickets, time.monotonic())
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
            index, tickets, sent = self.in_flight.pop(ref)
            self.load[index] -= 1
            try:
                outcomes = ray.get(ref)
            except RayActorError as exc:  # the actor died or is restarting: it rests
                self.rest(index)
                replies.extend(Reply(ticket, lost=exc) for ticket in tickets)
                continue
            except RayError as exc:  # the call raised: its batch's error, or one of several's
                if len(tickets) > 1:
                    replies.extend(Reply(ticket, error=exc, alone=True) for ticket in tickets)
                else:
                    replies.append(error_reply(tickets[0], exc))
                continue
            self.timed(index, sent, len(tickets))
            data, counts = outcomes
            table = table_from_ipc(data)
            offset = 0
            for ticket, count in zip(tickets, counts, strict=True):
                if isinstance(count, BaseException):  # the render raised; the actor says so
                    replies.append(error_reply(ticket, count))
                else:  # its rows: a slice of the call's table (no copy)
                    replies.append(Reply(ticket, rows=table.slice(offset, count)))
                    offset += count
        return replies

    def timed(self, index: int, sent: float, batches: int) -> None:
        """Update the time per batch from a call's reply: the actor worked on it from when it was
        sent or from its reply before (two calls are queued at an actor), whichever came later."""
        now = time.monotonic()
        seconds = (now - max(sent, self.answered[index])) / batches
        self.answered[index] = now
        previous = self.batch_seconds
        self.batch_seconds = seconds if previous is None else previous + GROUP_SMOOTHING * (seconds - previous)

    def rest(self, index: int) -> None:
        """Give actor ``index`` no work for a while, twice as long as last time (to a limit)."""
        self.resting[index] = time.monotonic() + min(
            ACTOR_REST_SECONDS * 2 ** self.rests[index], MAX_ACTOR_REST_SECONDS
        )
        self.rests[index] += 1
