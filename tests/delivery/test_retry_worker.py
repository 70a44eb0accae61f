"""The retry worker against a real PostgreSQL and a real function endpoint: it attempts a row
when the row falls due by the database's clock (not at its next poll), and an outcome it
cannot record while Postgres is down is waited out, never paid for with an extra attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import pytest
import pytest_asyncio

from eventbus.delivery import (
    DeadLetterFilter,
    Delivery,
    DeliveryStore,
    Dispatcher,
    RetryWorker,
    target_policies,
)
from eventbus.store import EmbeddedPostgres, Store
from eventbus.targets import HttpTarget, HttpTargetSpec
from tests.fixtures.postgres import table_locked
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.wait import eventually


@dataclass
class Rig:
    store: Store
    deliveries: DeliveryStore
    dispatcher: Dispatcher


@pytest_asyncio.fixture
async def rig(database_dsn: str, receiver: Receiver) -> AsyncIterator[Rig]:
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(await Store.open(database_dsn))
        target = await stack.enter_async_context(
            HttpTarget(HttpTargetSpec(name="fn", url=receiver.url("/fn"), timeout=10))
        )
        policies = target_policies(
            {
                "fn": {
                    "retry": {
                        "strategy": "fixed",
                        "initial_delay": "200ms",
                        "max_attempts": 4,
                        "jitter": False,
                    },
                    "circuit_breaker": False,
                }
            }
        )
        deliveries = DeliveryStore(store.pool)

        async def publish(event: dict[str, object]) -> None:
            raise AssertionError("nothing replies in these tests")

        dispatcher = Dispatcher({"fn": target}, policies, deliveries, store.audit, publish)
        # A poll so slow that only knowing the next due time can make an attempt on time,
        # and a short lease, so an unrecorded outcome would soon be attempted again.
        worker = RetryWorker(dispatcher, deliveries, instance="t", lease=2.0, idle_poll=60.0)
        dispatcher.scheduled = worker.due_in
        worker.start()
        stack.push_async_callback(worker.stop, 5.0)
        yield Rig(store, deliveries, dispatcher)


def _delivery(i: int) -> Delivery:
    event = {"specversion": "1.0", "id": f"r-{i}", "source": "tests/retry", "type": "t"}
    return Delivery(event=event, rule="rule", target="fn", payload=event, is_cloudevent=True)


async def test_a_retry_is_attempted_when_due_not_at_the_next_poll(
    rig: Rig, receiver: Receiver
) -> None:
    # The first attempt fails: the retry is due 200 ms later by the database's clock, which
    # runs a moment behind the worker's own timer. The worker polls once a minute.
    receiver.script(503)
    await rig.dispatcher.run(_delivery(1))
    await receiver.wait_for(2, path="/fn", timeout=15)


async def test_a_retry_for_a_target_this_process_lacks_is_left_to_an_instance_that_has_it(
    rig: Rig, receiver: Receiver
) -> None:
    # Another instance (a rolling deploy adding target "fn2") scheduled it; this one claimed it
    # and dead-lettered it as unknown-target, and a replay could not help: it claimed it again.
    event = {"specversion": "1.0", "id": "r-other", "source": "tests/retry", "type": "t"}
    other = Delivery(event=event, rule="rule", target="fn2", payload=event, is_cloudevent=True)
    await rig.deliveries.schedule(other, due_in=0)
    receiver.script(503)
    await rig.dispatcher.run(_delivery(2))  # its retry wakes the worker, due after fn2's row
    await receiver.wait_for(2, path="/fn", timeout=15)

    async def fn_row_done() -> bool:
        return await rig.deliveries.backlog() == 1

    await eventually(fn_row_done, within=10)
    assert await rig.deliveries.list_dead_letters(DeadLetterFilter()) == []


async def test_a_worker_held_by_a_locked_table_is_reported_not_ready(
    rig: Rig, database_dsn: str
) -> None:
    # Its pass read the disabled targets with no deadline: a lock on that table held the
    # worker, no retry went out, and readiness said ok for as long as the lock lasted.
    worker = RetryWorker(rig.dispatcher, rig.deliveries, instance="t2", idle_poll=0.1)
    async with table_locked(database_dsn, "disabled_targets"):
        worker.start()
        try:
            await eventually(lambda: not worker.health(after=0)[0], within=20)
            _, why = worker.health(after=0)
            assert "no pass over the schedule" in why and "disabled targets" in why, why
            assert worker.health()[0]  # red only once it has lasted STALLED_AFTER (45 s)
        finally:
            await worker.stop(5.0)
    worker = RetryWorker(rig.dispatcher, rig.deliveries, instance="t3", idle_poll=0.1)
    worker.start()
    try:
        await asyncio.sleep(0.5)
        assert worker.health(after=0) == (True, "ok")
    finally:
        await worker.stop(5.0)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_no_attempt_beyond_the_budget_while_postgres_is_down(
    rig: Rig, receiver: Receiver, postgres_server: EmbeddedPostgres
) -> None:
    # Attempts 1-3 fail and are rescheduled; the 4th (the last) answers slowly, and Postgres
    # goes down meanwhile, so its outcome cannot be written when it comes back.
    receiver.script(503, 503, 503, Response(503, delay=2.0))
    await rig.dispatcher.run(_delivery(2))
    await receiver.wait_for(4, path="/fn", timeout=30)
    await postgres_server.stop()
    try:
        await asyncio.sleep(6)  # three leases: time enough for an unrecorded re-attempt
    finally:
        await postgres_server.start()

    async def dead_lettered() -> bool:
        return bool(await rig.deliveries.list_dead_letters(DeadLetterFilter(ids=())))

    await eventually(dead_lettered, within=60)
    (letter,) = await rig.deliveries.list_dead_letters(DeadLetterFilter())
    assert letter["attempts"] == 4 and letter["reason"] == "attempts-exhausted"
    assert len(receiver.requests) == 4
    await rig.store.audit.flush()
    outcomes = await rig.store.pool.fetch("SELECT attempt, outcome FROM attempts ORDER BY seq")
    assert [tuple(r) for r in outcomes] == [
        (1, "retry-scheduled"),
        (2, "retry-scheduled"),
        (3, "retry-scheduled"),
        (4, "dead-lettered"),
    ]


async def test_an_override_the_running_policy_refuses_is_delivered_with_the_targets_own(
    rig: Rig, receiver: Receiver
) -> None:
    # Checked at load against the settings of its time (a retry stored before a restart with
    # other connector settings): building its policy raised at every attempt, for ever.
    job = _delivery(3)
    job.override = {"retry": {"strategy": "exponential", "initial_delay": "20m"}}  # > max_delay
    receiver.script(204)
    await rig.dispatcher.run(job)
    await receiver.wait_for(1, path="/fn", timeout=15)


@asynccontextmanager
async def _worker(
    dsn: str,
    receiver: Receiver,
    *,
    lease: float,
    concurrency: int,
    names: tuple[str, ...] = ("slow", "fast"),
    idle_poll: float = 0.5,
    due: dict[str, range] | None = None,
    cap: int = 1,
    audit_interval: float = 0.05,
) -> AsyncIterator[DeliveryStore]:
    """A retry worker over targets with a concurrency cap of one, /slow and /fast (or
    ``names``)."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            await Store.open(dsn, audit_interval=audit_interval)
        )
        targets = {
            name: await stack.enter_async_context(
                HttpTarget(
                    HttpTargetSpec(
                        name=name, url=receiver.url(f"/{name}"), timeout=10, concurrency=cap
                    )
                )
            )
            for name in names
        }
        policies = target_policies({name: {"circuit_breaker": False} for name in targets})
        deliveries = DeliveryStore(store.pool)

        async def publish(event: dict[str, object]) -> None:
            raise AssertionError("nothing replies in these tests")

        dispatcher = Dispatcher(targets, policies, deliveries, store.audit, publish)
        worker = RetryWorker(
            dispatcher,
            deliveries,
            instance="t",
            lease=lease,
            concurrency=concurrency,
            idle_poll=idle_poll,
        )
        for target, ids in (due or {}).items():  # due before the worker's first look
            await _due(deliveries, target, ids)
        worker.start()
        stack.push_async_callback(worker.stop, 5.0)
        yield deliveries


async def _due(deliveries: DeliveryStore, target: str, ids: range) -> None:
    for i in ids:
        job = _delivery(i)
        job.target = target
        await deliveries.schedule(job, due_in=0)


async def test_a_retry_waiting_for_its_targets_slot_keeps_its_claim(
    database_dsn: str, receiver: Receiver
) -> None:
    # Four rows for a target that takes one request at a time, a second each: the last waits
    # three seconds for its slot, twice its lease. Its lease ran out while it waited, the row
    # was claimed again and delivered twice.
    receiver.respond(Response(204, delay=1.0))
    async with _worker(database_dsn, receiver, lease=1.5, concurrency=8) as deliveries:
        await _due(deliveries, "slow", range(4))

        async def done() -> bool:
            return await deliveries.backlog() == 0

        await eventually(done, within=30, what="every retry delivered")
        await asyncio.sleep(3.0)  # a second claim of a row, waiting for the slot, comes by now
    assert sorted(r.cloudevent["id"] for r in receiver.requests) == [f"r-{i}" for i in range(4)]


async def test_one_slow_target_leaves_the_other_targets_retries_slots(
    database_dsn: str, receiver: Receiver
) -> None:
    # Ten rows for a target taking one request a second, then one for another target: the
    # slow target's rows held every slot of the worker waiting for its own, and the other's
    # retry came after nearly all of them.
    receiver.respond(Response(204, delay=1.0))
    async with _worker(database_dsn, receiver, lease=60, concurrency=4) as deliveries:
        await _due(deliveries, "slow", range(10))
        await _due(deliveries, "fast", range(10, 11))
        await receiver.wait_for(1, path="/fast", timeout=30)
        slow_before = len([r for r in receiver.requests if r.path == "/slow"])
    assert slow_before <= 3, slow_before


async def test_targets_that_take_one_request_at_a_time_leave_the_others_slots(
    database_dsn: str, receiver: Receiver
) -> None:
    # Each target could claim half the worker's slots whatever its own concurrency: two slow
    # targets taking one request at a time held them all (31 of 32 rows each waiting for its
    # own target), and a third target's retries waited 14 s instead of 1.
    receiver.respond(Response(204, delay=1.0))
    names = ("slow1", "slow2", "fast")
    async with _worker(database_dsn, receiver, lease=60, concurrency=4, names=names) as deliveries:
        await _due(deliveries, "slow1", range(10))
        await _due(deliveries, "slow2", range(10, 20))
        await _due(deliveries, "fast", range(20, 21))
        await receiver.wait_for(1, path="/fast", timeout=30)
        slow_before = len([r for r in receiver.requests if r.path != "/fast"])
    assert slow_before <= 2, slow_before  # the first of each, at most


async def test_a_full_targets_rows_are_claimed_as_its_slots_free_not_at_the_next_poll(
    database_dsn: str, receiver: Receiver
) -> None:
    # The claim skips a target whose slots are all taken; nothing looked again until the next
    # poll: after an outage 1,200 retries of one target drained 32 each half second. Here the
    # poll is a minute away and the target takes one request at a time.
    receiver.respond(Response(204, delay=0.05))
    due = {"slow": range(12)}
    async with _worker(
        database_dsn, receiver, lease=60, concurrency=8, idle_poll=60, due=due
    ) as rows:

        async def done() -> bool:
            return await rows.backlog() == 0

        await eventually(done, within=20, what="every retry delivered before the next poll")
    assert sorted(r.cloudevent["id"] for r in receiver.requests) == sorted(
        f"r-{i}" for i in range(12)
    )


async def test_one_targets_rows_take_every_slot_while_no_other_target_has_any_due(
    database_dsn: str, receiver: Receiver
) -> None:
    # Half the slots are a target's share so that others' retries find room; with nothing
    # else due, a backlog after an outage drained on half the worker (123 rows a second in
    # bench/delivery_bench.py, then 900; 1,600 on all of them)
    receiver.respond(Response(204, delay=0.5))
    due = {"slow": range(8)}
    async with _worker(database_dsn, receiver, lease=60, concurrency=8, due=due, cap=16) as rows:

        async def done() -> bool:
            return await rows.backlog() == 0

        await eventually(done, within=20, what="every retry delivered")
    assert receiver.max_in_flight == 8, receiver.max_in_flight


async def test_a_targets_room_counts_its_requests_not_the_outcomes_being_recorded(
    database_dsn: str, receiver: Receiver
) -> None:
    # A row held its target's room until its outcome was written, which waits for the audit's
    # next batch: a target's retries drained at its concurrency per audit interval however
    # fast it answered (a review's 5,000 due retries: 6.6 s late at the median for a 1 s
    # backoff). One request at a time here, an audit interval of 0.4 s.
    receiver.respond(204)
    due = {"fast": range(6)}
    async with _worker(
        database_dsn, receiver, lease=60, concurrency=8, due=due, audit_interval=0.4
    ) as rows:

        async def done() -> bool:
            return await rows.backlog() == 0

        await eventually(done, within=20, what="every retry delivered")
    times = sorted(r.at for r in receiver.requests)
    assert len(times) == 6 and receiver.max_in_flight == 1, times
    assert times[-1] - times[0] < 1.0, [round(t - times[0], 3) for t in times]


async def test_rows_recording_their_outcome_still_count_against_their_targets_share(
    database_dsn: str, receiver: Receiver
) -> None:
    # Counted by their requests only, one target's rows waiting for the audit (or running
    # their follow-ups) took every slot of the worker, and another target's retries, due a
    # moment later, waited for that whole backlog to be claimed. Eight slots, four a
    # target's share.
    receiver.respond(204)
    async with _worker(
        database_dsn,
        receiver,
        lease=60,
        concurrency=8,
        names=("a", "b"),
        cap=4,
        audit_interval=0.5,
        due={"a": range(40)},
    ) as rows:
        for i in range(40, 44):
            job = _delivery(i)
            job.target = "b"
            await rows.schedule(job, due_in=0.3)

        async def done() -> bool:
            return await rows.backlog() == 0

        await eventually(done, within=30, what="every retry delivered")
    first = min(r.at for r in receiver.requests)
    b_first = min(r.at for r in receiver.requests if r.path == "/b")
    assert b_first - first < 1.2, b_first - first
