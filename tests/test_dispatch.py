"""The dispatch loop, its actor pool and its row sink, without Ray: fake actors answer at once.

The rules under test (farm.driver.dispatch): a render that raises is retried, then failed; a
lost actor is not the batch's fault and rests until it answers ready(); no actor holds more
than IN_FLIGHT_PER_ACTOR batches; tasks already done are skipped; a failed chain frame fails
the rest of its shot; rows reach the manifest on size, on time, and on any exit.
(The same rules on a real Ray, with real actors killed: test_resume.py, test_faults.py.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import RayActorError, RayError

from farm import pool as pool_module
from farm import sink as sink_module
from farm.columns import table_to_ipc
from farm.driver import (
    MAX_ACTOR_LOSSES,
    Planned,
    RenderOptions,
    Summary,
    WorkQueue,
    cut_batches,
    dispatch,
    plan_work,
)
from farm.manifest import base_row, read_manifest, rows_to_table
from farm.pool import IN_FLIGHT_PER_ACTOR, ActorPool
from farm.sink import RowSink
from farm.spec import Batch, parse_job

JOB = "name: d\ndefaults: {steps: 2, width: 64, height: 64}\nsweep: {prompt: [a, boom, c, d, e, f]}\n"


class Ref:
    """A call's answer, ready at once: its value, or the exception ray.get raises."""

    def __init__(self, actor: FakeActor, call: Callable[[], Any]) -> None:
        self.actor = actor
        try:
            self.value, self.error = call(), None
        except RayError as exc:
            self.value, self.error = None, exc


class Method:
    """``actor.method.remote(...)``: runs the call now; render calls count as held until got."""

    def __init__(self, actor: FakeActor, call: Callable[..., Any], held: bool) -> None:
        self.actor, self.call, self.held = actor, call, held

    def remote(self, *args: Any) -> Ref:
        ref = Ref(self.actor, lambda: self.call(*args))
        if self.held:
            self.actor.held.add(ref)
            self.actor.most = max(self.actor.most, len(self.actor.held))
        return ref


class FakeActor:
    """``render(batch, skip)`` -> ok rows for the tasks not skipped, unless ``fate`` raises."""

    def __init__(self, fate: Callable[[Batch], None] = lambda batch: None, ready: Callable[[], None] = lambda: None):
        self.fate, self.is_ready = fate, ready
        self.held: set[Ref] = set()  # render calls not yet got
        self.most = 0  # the most render calls it held at once
        self.batches: list[tuple[Batch, frozenset[str]]] = []
        self.calls: list[int] = []  # batches per render call
        self.probes = 0
        self.render_batches = Method(self, self._render_batches, held=True)
        self.ready = Method(self, self._ready, held=False)

    def _render(self, batch: Batch, skip: frozenset[str]) -> list[dict[str, Any]]:
        self.batches.append((batch, skip))
        self.fate(batch)
        return [
            base_row("d", t, batch, i) | {"status": "ok"} for i, t in enumerate(batch.tasks) if t.task_id not in skip
        ]

    def _render_batches(self, batches: list[Batch], skips: list[frozenset[str]]) -> tuple[Any, list[Any]]:
        """As BatchRenderer.render_batches: the call's rows as one table, and per batch its row count
        or its error; a lost actor loses the call."""
        self.calls.append(len(batches))
        rows: list[dict[str, Any]] = []
        outcomes: list[Any] = []
        for batch, skip in zip(batches, skips, strict=True):
            try:
                batch_rows = self._render(batch, skip)
            except RayActorError:
                raise
            except RayError as exc:
                outcomes.append(exc)
                continue
            rows += batch_rows
            outcomes.append(len(batch_rows))
        return table_to_ipc(rows_to_table(rows)), outcomes

    def _ready(self) -> bool:
        self.probes += 1
        self.is_ready()
        return True


def fake_ray() -> SimpleNamespace:
    """ray.wait: the first ref asked about (all are ready); ray.get: its value, or raise."""

    def wait(refs: list[Ref], num_returns: int = 1, timeout: float | None = None) -> tuple[list[Ref], list[Ref]]:
        return refs[:num_returns], refs[num_returns:]

    def get(ref: Ref) -> Any:
        ref.actor.held.discard(ref)
        if ref.error is not None:
            raise ref.error
        return ref.value

    return SimpleNamespace(wait=wait, get=get)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", fake_ray())
    monkeypatch.setattr(pool_module, "ACTOR_REST_SECONDS", 0.001)  # rests in milliseconds, not seconds
    # Fake actors answer at once, which would send them several batches a call: the rules below
    # are each batch's, so one batch a call (as real renders get); grouping has its own tests.
    monkeypatch.setattr(pool_module, "MAX_GROUP", 1)


def run(actors: list[FakeActor], work: WorkQueue, tmp_path: Path, done: set[str] | None = None, **options: Any):
    spec = parse_job(JOB)
    summary = Summary(job_root=str(tmp_path / "d"))
    settings = RenderOptions(progress=False, **{"retries": 2, "flush_seconds": 60.0, **options})
    dispatch(spec, summary.job_root, actors, work, set() if done is None else done, Planned(), settings, summary)
    rows = read_manifest(summary.job_root).to_pylist() if (tmp_path / "d" / "manifest").exists() else []
    return summary, rows


def tasks() -> list:
    return list(parse_job(JOB).tasks())


def boom(batch: Batch) -> None:
    if any(t.prompt == "boom" for t in batch.tasks):
        raise RayError("ValueError: cannot render boom")


def test_a_render_that_raises_is_retried_then_failed_and_the_job_goes_on(tmp_path: Path):
    actor = FakeActor(fate=boom)
    summary, rows = run([actor], WorkQueue(cut_batches(tasks(), 1)), tmp_path, retries=2)
    assert (summary.rendered, summary.failed) == (5, 1)
    assert summary.errors == ["ValueError: cannot render boom"]
    by_prompt = {r["prompt"]: r for r in rows}
    assert len(rows) == 6 and by_prompt["boom"]["status"] == "failed"
    assert by_prompt["boom"]["error"] == "ValueError: cannot render boom"
    assert len(actor.batches) == 5 + 3  # the bad batch: 1 try + 2 retries


def test_a_lost_actor_rests_until_ready_and_does_not_use_up_retries(tmp_path: Path):
    lost = {"calls": 0, "asks": 0}

    def dies_once(batch: Batch) -> None:
        lost["calls"] += 1
        if lost["calls"] == 1:
            raise RayActorError()

    def back_on_second_ask() -> None:
        lost["asks"] += 1
        if lost["asks"] == 1:
            raise RayActorError()

    # The only actor: while it rests nothing is in flight, and the loop sleeps until it is asked.
    flaky = FakeActor(fate=dies_once, ready=back_on_second_ask)
    summary, rows = run([flaky], WorkQueue(cut_batches(tasks(), 1)), tmp_path, retries=0)
    assert (summary.rendered, summary.failed, summary.errors) == (6, 0, [])
    assert sorted(r["prompt"] for r in rows) == ["a", "boom", "c", "d", "e", "f"]
    assert flaky.probes == 2  # not back at the first ask; back at the second, then given work
    # a was lost (boom, already sent, came back): a goes out again first, ahead of new work
    assert [b.tasks[0].prompt for b, _ in flaky.batches] == ["a", "boom", "a", "c", "d", "e", "f"]


def test_a_batch_that_kills_every_actor_fails_after_max_losses(tmp_path: Path):
    def dies_on_boom(batch: Batch) -> None:
        if any(t.prompt == "boom" for t in batch.tasks):
            raise RayActorError()

    actors = [FakeActor(fate=dies_on_boom), FakeActor(fate=dies_on_boom)]
    summary, rows = run(actors, WorkQueue(cut_batches(tasks(), 1)), tmp_path, retries=0)
    assert (summary.rendered, summary.failed) == (5, 1)
    message = summary.errors[0]
    assert message.startswith(f"lost {MAX_ACTOR_LOSSES + 1} actors rendering this batch; last: ")
    assert [r["error"] for r in rows if r["status"] == "failed"] == [message]


def test_no_actor_holds_more_than_its_in_flight_limit_and_work_spreads(tmp_path: Path):
    actors = [FakeActor(), FakeActor()]
    summary, _ = run(actors, WorkQueue(cut_batches(tasks(), 1)), tmp_path)
    assert summary.rendered == 6
    assert [a.most for a in actors] == [IN_FLIGHT_PER_ACTOR] * 2
    assert [len(a.batches) for a in actors] == [3, 3]


def test_tasks_already_done_in_a_batch_are_skipped(tmp_path: Path):
    all_tasks = tasks()
    actor = FakeActor()
    summary, rows = run([actor], WorkQueue(cut_batches(all_tasks, 2)), tmp_path, done={all_tasks[0].task_id})
    assert actor.batches[0][1] == {all_tasks[0].task_id}
    assert summary.rendered == 5 and len(rows) == 5
    assert all_tasks[0].task_id not in {r["task_id"] for r in rows}


def test_a_failed_chain_batch_fails_the_rest_of_its_chain(tmp_path: Path):
    chain = [Batch.of([t]) for t in tasks()[:4]]  # a, boom, c, d
    actor = FakeActor(fate=boom)
    summary, rows = run([actor], WorkQueue(chains=[chain]), tmp_path, retries=0)
    assert [len(b.tasks) for b, _ in actor.batches] == [1, 1]  # a, then boom; c and d never sent
    status = {r["prompt"]: (r["status"], r["error"]) for r in rows}
    assert status["a"] == ("ok", None) and status["boom"] == ("failed", "ValueError: cannot render boom")
    for prompt in ("c", "d"):
        assert status[prompt][0] == "failed" and status[prompt][1].startswith("not rendered: frame ")
    assert (summary.rendered, summary.failed) == (1, 3)


def test_the_first_batch_goes_out_before_the_rest_of_the_job_is_planned(tmp_path: Path):
    """Planning streams: a 1,200-task job's first batch is rendered when only its own tasks (and
    one task of lookahead) have been expanded, and planning counts every task by the end."""
    spec = parse_job("name: d\ndefaults: {steps: 2, width: 64, height: 64}\nsweep: {seed: {range: [0, 1200]}}\n")
    pulled = [0]

    def stream():
        for task in spec.tasks():
            pulled[0] += 1
            yield task

    at_first: list[int] = []
    actor = FakeActor(fate=lambda batch: at_first.append(pulled[0]))
    planned = Planned()
    work = plan_work(spec, stream(), set(), 4, planned)
    summary = Summary(job_root=str(tmp_path / "d"), total=spec.count())
    dispatch(spec, summary.job_root, [actor], work, set(), planned, RenderOptions(progress=False), summary)
    assert at_first[0] <= 4 + 1
    assert (planned.seen, planned.skipped, planned.finished) == (1200, 0, True)
    assert summary.rendered == 1200


def test_planning_counts_the_tasks_already_done_as_it_passes_them(tmp_path: Path):
    spec = parse_job(JOB)
    done = {t.task_id for t in tasks()[1:4]}
    planned = Planned()
    work = plan_work(spec, spec.tasks(), set(done), 2, planned)
    batches = []
    while (batch := work.take()) is not None:
        batches.append(batch)
    assert (planned.seen, planned.skipped, planned.finished) == (6, 3, True)
    # batches of two: [a, boom] has boom to do, [c, d] is all done, [e, f] is to do
    assert [[t.prompt for t in b.tasks] for b in batches] == [["a", "boom"], ["e", "f"]]


def test_peek_shows_the_batch_that_take_hands_out_next():
    work = WorkQueue(cut_batches(tasks(), 4))
    first = work.peek()
    assert work.peek() is first and not work.empty
    assert work.take() is first
    assert work.take() is not first and work.take() is None and work.empty


# ---------------------------------------------------------------------------------------
# Several batches a call, once batches render in milliseconds (farm.pool.group_size)

MANY = "name: d\ndefaults: {steps: 2, width: 64, height: 64}\nsweep: {seed: {range: [0, 40]}}\n"


def test_the_group_size_follows_the_time_a_batch_takes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pool_module, "MAX_GROUP", 32)
    pool = ActorPool([FakeActor()])
    assert pool.group_size() == 1  # nothing measured yet: one batch a call
    for seconds, size in ((0.5, 1), (pool_module.GROUP_SECONDS, 1), (pool_module.GROUP_SECONDS / 5, 5), (1e-6, 32)):
        pool.batch_seconds = seconds
        assert pool.group_size() == size


def test_batches_that_render_at_once_go_several_to_a_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pool_module, "MAX_GROUP", 4)
    spec = parse_job(MANY)
    actor = FakeActor()
    summary = Summary(job_root=str(tmp_path / "d"), total=40)
    work = WorkQueue(cut_batches(spec.tasks(), 1))
    dispatch(spec, summary.job_root, [actor], work, set(), Planned(), RenderOptions(progress=False), summary)
    assert summary.rendered == 40 and sum(actor.calls) == 40  # every batch once
    assert actor.calls[0] == 1 and max(actor.calls) == 4  # one until timed, then up to MAX_GROUP
    assert len(actor.calls) < 20
    rows = read_manifest(summary.job_root).to_pylist()
    assert sorted(r["seed"] for r in rows) == list(range(40))


def test_a_batch_that_fails_among_others_in_a_call_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pool_module, "MAX_GROUP", 4)
    actor = FakeActor(fate=boom)
    summary, rows = run([actor], WorkQueue(cut_batches(tasks(), 1)), tmp_path, retries=1)
    assert (summary.rendered, summary.failed) == (5, 1)
    assert {r["prompt"] for r in rows if r["status"] == "failed"} == {"boom"}
    assert [b.tasks[0].prompt for b, _ in actor.batches].count("boom") == 2  # tried 1 + 1 retry


def test_a_call_that_fails_as_a_whole_sends_its_batches_again_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Nothing says which batch broke the call: each goes again alone, and only the one at fault
    uses up its retries; the others render."""
    monkeypatch.setattr(pool_module, "MAX_GROUP", 4)

    class WholeCall(FakeActor):
        def _render_batches(self, batches, skips):
            self.calls.append(len(batches))
            if any(t.prompt == "boom" for b in batches for t in b.tasks):
                raise RayError("the reply could not be sent")
            rendered = [self._render(b, s) for b, s in zip(batches, skips, strict=True)]
            table = rows_to_table([r for rows in rendered for r in rows])
            return table_to_ipc(table), [len(rows) for rows in rendered]

    actor = WholeCall()
    summary, rows = run([actor], WorkQueue(cut_batches(tasks(), 1)), tmp_path, retries=0)
    assert (summary.rendered, summary.failed) == (5, 1)
    assert {r["prompt"] for r in rows if r["status"] == "failed"} == {"boom"}
    assert any(size > 1 for size in actor.calls)  # boom shared a call before it went alone


def test_an_actor_pool_fills_in_rounds_one_slot_per_actor():
    pool: ActorPool[str] = ActorPool([FakeActor(), FakeActor(), FakeActor()], in_flight_per_actor=2)
    batch = Batch.of(tasks()[:1])
    handed = []
    for index in pool.free_slots():
        handed.append(index)
        pool.submit(index, [batch], [frozenset()], ["ticket"])
    assert handed == [0, 1, 2, 0, 1, 2] and pool.busy == 6
    pool.rest(1)
    assert pool.resting[1] > time.monotonic() - 1 and pool.rests[1] == 1


# ---------------------------------------------------------------------------------------
# The row sink


def rows_of(batch: Batch, status: str = "ok", error: str | None = None) -> list[dict[str, Any]]:
    return [base_row("d", t, batch, i) | {"status": status, "error": error} for i, t in enumerate(batch.tasks)]


def test_the_sink_counts_images_once_and_drops_a_retrys_repeats(tmp_path: Path):
    batch = Batch.of(tasks()[:3])
    summary = Summary(job_root=str(tmp_path))
    done: set[str] = set()
    with RowSink("d", str(tmp_path), done, summary, 3, progress=False) as sink:
        sink.record(rows_of(batch))
        sink.record(rows_of(batch))  # a batch that came back twice: its rows are not written again
        capture = rows_of(batch)[0] | {"capture": "x0", "task_id": "step-of-a"}
        sink.record([capture])  # a step capture: written, not counted as an image
        assert sink.done_in(batch) == frozenset(done) == {t.task_id for t in batch.tasks}
    assert (summary.rendered, summary.failed) == (3, 0)
    assert read_manifest(str(tmp_path)).num_rows == 4


def test_the_sink_keeps_each_error_once(tmp_path: Path):
    summary = Summary(job_root=str(tmp_path))
    with RowSink("d", str(tmp_path), set(), summary, 3, progress=False) as sink:
        sink.record(rows_of(Batch.of(tasks()[:3]), "failed", "bad input"))
    assert (summary.failed, summary.errors) == (3, ["bad input"])


def test_the_sink_flushes_on_size_and_on_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sink_module, "FLUSH_ROWS", 4)
    monkeypatch.setattr(sink_module, "FLUSH_MIN_SECONDS", 0)
    parts = tmp_path / "manifest"
    sink = RowSink("d", str(tmp_path), set(), Summary(job_root=str(tmp_path)), 6, flush_seconds=60, progress=False)
    assert sink.due_at() is None  # nothing buffered: nothing falls due
    sink.record(rows_of(Batch.of(tasks()[:2])))
    assert sink.due_at() == pytest.approx(sink.last_flush + 60)
    sink.flush_if_due()
    assert not parts.exists()  # 2 rows, well within the time
    sink.record(rows_of(Batch.of(tasks()[2:4])))
    sink.flush_if_due()
    assert len(list(parts.glob("part-*.parquet"))) == 1  # 4 rows: a part
    sink.flush_seconds = 0
    sink.record(rows_of(Batch.of(tasks()[4:5])))
    sink.flush_if_due()
    assert len(list(parts.glob("part-*.parquet"))) == 2  # its time is up: a part of one row
    sink.close()


def test_by_count_the_sink_writes_no_more_than_a_part_per_min_seconds(tmp_path: Path, monkeypatch):
    """Tens of thousands of rows a second make a few parts a second, not one per FLUSH_ROWS."""
    monkeypatch.setattr(sink_module, "FLUSH_ROWS", 2)
    monkeypatch.setattr(sink_module, "FLUSH_MIN_SECONDS", 60)
    parts = tmp_path / "manifest"
    sink = RowSink("d", str(tmp_path), set(), Summary(job_root=str(tmp_path)), 6, flush_seconds=600, progress=False)
    sink.last_flush -= 60  # the last part was written a minute ago
    sink.record(rows_of(Batch.of(tasks()[:2])))
    sink.flush_if_due()
    assert len(list(parts.glob("part-*.parquet"))) == 1
    sink.record(rows_of(Batch.of(tasks()[2:6])))
    sink.flush_if_due()  # 4 rows, over FLUSH_ROWS, but a part went out just now
    assert (len(list(parts.glob("part-*.parquet"))), sink.buffered) == (1, 4)
    sink.close()
    assert len(read_manifest(str(tmp_path)).to_pylist()) == 6


def test_the_sink_writes_its_rows_when_left_by_ctrl_c(tmp_path: Path):
    summary = Summary(job_root=str(tmp_path))
    with pytest.raises(KeyboardInterrupt), RowSink("d", str(tmp_path), set(), summary, 2, progress=False) as sink:
        sink.record(rows_of(Batch.of(tasks()[:2])))
        raise KeyboardInterrupt
    assert read_manifest(str(tmp_path)).num_rows == 2


def test_an_actor_that_died_loading_its_model_reports_the_message_alone():
    """An actor whose __init__ raised carries only the traceback text (no cause): the user's line
    is the message, without the exception's dotted class name."""
    text = (
        "The actor died because of an error raised in its creation task\n"
        "Traceback (most recent call last):\n"
        '  File "farm/actor.py", line 80, in __init__\n'
        "farm.models.ModelError: model './no/such/model': not a preset (tiny)"
    )
    message = pool_module.error_message(type("Died", (Exception,), {"__str__": lambda self: text})())
    assert message == "model './no/such/model': not a preset (tiny)"
    assert pool_module.error_message(ValueError("boom")) == "boom"
