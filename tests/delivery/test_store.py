"""The retry schedule on a real PostgreSQL: claims skip each other, a claim whose lease ran out
cannot overwrite what the row's new owner decided."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from eventbus.delivery import (
    DeadLetterFilter,
    DeadLetterReason,
    Delivery,
    DeliveryKind,
    DeliveryStore,
)
from eventbus.delivery import _store as store_module
from eventbus.store import migrate
from tests.fixtures.postgres import table_locked
from tests.fixtures.wait import eventually


@pytest_asyncio.fixture
async def store(database_dsn: str) -> AsyncIterator[DeliveryStore]:
    pool = await asyncpg.create_pool(database_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield DeliveryStore(pool)
    await pool.close()


def _delivery(i: int) -> Delivery:
    event = {"specversion": "1.0", "id": f"s-{i}", "source": "tests/store", "type": "t"}
    return Delivery(
        event=event,
        rule="rule",
        target="fn",
        payload=event,
        is_cloudevent=True,
        acceptance="nats:stream:1:0",
    )


async def test_two_claimers_split_due_rows(store: DeliveryStore) -> None:
    for i in range(10):
        await store.schedule(_delivery(i), due_in=0)
    a, b = await asyncio.gather(
        store.claim_due(limit=6, lease=60, instance="a"),
        store.claim_due(limit=6, lease=60, instance="b"),
    )
    ids_a = {d.pending_id for d in a}
    ids_b = {d.pending_id for d in b}
    assert len(ids_a | ids_b) == 10 and not ids_a & ids_b
    assert await store.claim_due(limit=10, lease=60, instance="c") == []


async def test_a_claim_that_waited_holds_its_whole_lease(
    store: DeliveryStore, database_dsn: str
) -> None:
    # The lease counted from the statement's start: a claim that waited (a lock, a server
    # frozen) wrote one already run out, another claimer took the rows at once, and both
    # attempted them.
    await store.schedule(_delivery(1), due_in=0)
    async with table_locked(database_dsn, "delivery_retries"):
        claim = asyncio.create_task(store.claim_due(limit=1, lease=1.0, instance="a"))
        await asyncio.sleep(1.5)  # past the lease, the claim waiting on the lock
    (claimed,) = await claim
    assert await store.claim_due(limit=1, lease=1.0, instance="b") == []  # still a's
    left = await store._pool.fetchval(
        "SELECT extract(epoch FROM locked_until - clock_timestamp()) FROM delivery_retries"
        " WHERE id = $1",
        claimed.pending_id,
    )
    assert 0.5 < left <= 1.0, left


async def test_rows_of_a_target_the_claimer_lacks_wait_for_one_that_has_it(
    store: DeliveryStore,
) -> None:
    other = _delivery(2)
    other.target = "fn2"
    await store.schedule(_delivery(1), due_in=0)
    await store.schedule(other, due_in=0)
    (mine,) = await store.claim_due(limit=10, lease=60, instance="a", known=["fn"], orphan_after=1)
    assert mine.target == "fn"
    assert await store.claim_due(limit=10, lease=60, instance="a", known=["fn"]) == []
    # due for longer than the grace, no instance with "fn2" took it: this one does (and will
    # dead-letter it as unknown-target)
    await asyncio.sleep(1.2)
    (orphan,) = await store.claim_due(
        limit=10, lease=60, instance="a", known=["fn"], orphan_after=1
    )
    assert orphan.target == "fn2"


async def test_a_stale_claim_cannot_write(store: DeliveryStore) -> None:
    await store.schedule(_delivery(1), due_in=0)
    (first,) = await store.claim_due(limit=1, lease=0.2, instance="a")
    await asyncio.sleep(0.3)  # the lease runs out while "a" is still busy
    (second,) = await store.claim_due(limit=1, lease=60, instance="a")
    assert second.pending_id == first.pending_id and second.claim != first.claim

    first.attempts = 5
    assert not await store.complete(first)
    assert not await store.reschedule(first, due_in=10)
    assert (
        await store.dead_letter(
            first, last_status=500, final_error="x", reason=DeadLetterReason.GONE
        )
        is None
    )

    second.attempts = 2
    assert await store.dead_letter(
        second, last_status=503, final_error="y", reason=DeadLetterReason.GONE
    )
    assert await store.backlog() == 0
    (item,) = await store.list_dead_letters(DeadLetterFilter())
    assert item["attempts"] == 2 and item["last_status"] == 503


async def test_a_write_made_again_finds_the_row_its_first_try_wrote(
    store: DeliveryStore,
) -> None:
    # PostgreSQL killed as it committed: the row was in, the answer lost, and the write made
    # again scheduled (and delivered) the delivery twice. Made again, it finds its row.
    parked = _delivery(1)
    first = await store.schedule(parked, due_in=60, waiting_for="circuit")
    assert await store.schedule(parked, due_in=60, waiting_for="circuit") == first
    assert await store.backlog() == 1
    # a dead letter of a delivery never scheduled, the same
    routed = _delivery(2)
    failed = {"last_status": 500, "final_error": "x", "reason": DeadLetterReason.NON_RETRYABLE}
    dl_id = await store.dead_letter(routed, **failed)
    assert await store.dead_letter(routed, **failed) == dl_id
    assert len(await store.list_dead_letters(DeadLetterFilter())) == 1
    # and so does the same delivery made by another process (the bus delivered its event
    # again after a crash: the retry row of the first was committed as it died), whose chain
    # ran beside the first one's: twice the attempts, two dead letters for one event
    assert await store.schedule(_delivery(1), due_in=60) == first
    assert await store.dead_letter(_delivery(2), **failed) == dl_id
    assert await store.backlog() == 1
    # another target, rule, kind or replay round of the same event is a row of its own, and
    # so is another acceptance of it (a second bus message, past the duplicate window: it
    # found the first one's row, and its own delivery had no retry and no dead letter)
    others = [
        dataclasses.replace(_delivery(1), target="other"),
        dataclasses.replace(_delivery(1), rule="other"),
        dataclasses.replace(_delivery(1), kind=DeliveryKind.DEAD_LETTER),
        dataclasses.replace(_delivery(1), replay_count=1),
        dataclasses.replace(_delivery(1), acceptance="nats:stream:2:0"),
    ]
    ids = {first, *[await store.schedule(d, due_in=60) for d in others]}
    assert len(ids) == 6 and await store.backlog() == 6
    again = dataclasses.replace(_delivery(2), acceptance="nats:stream:3:0")
    assert await store.dead_letter(again, **failed) != dl_id
    # two acceptances' chains, each dead-lettered from the schedule: two dead letters
    for bus_message in ("nats:stream:4:0", "nats:stream:5:0"):
        await store.schedule(dataclasses.replace(_delivery(5), acceptance=bus_message), due_in=0)
    chains = await store.claim_due(limit=10, lease=60, instance="a")
    assert [d.event["id"] for d in chains] == ["s-5", "s-5"]
    assert len({await store.dead_letter(d, **failed) for d in chains}) == 2
    # follow-ups alike are not one: two targets' dead letters copied to one dead-letter
    # target carry the same event, rule and target (one key for both lost the second copy)
    copies = [dataclasses.replace(_delivery(3), kind=DeliveryKind.DEAD_LETTER) for _ in "ab"]
    assert len({await store.dead_letter(copy, **failed) for copy in copies}) == 2


@pytest.mark.parametrize("end", ["dead-lettered", "delivered"])
async def test_a_chain_that_ended_is_not_begun_again_by_its_bus_messages_redelivery(
    store: DeliveryStore, end: str
) -> None:
    # A process wrote a delivery's retry row and died before acking its bus message; another
    # instance ran the chain to its end within seconds, deleting the row. The bus delivered
    # the message again after its ack wait: its delivery found no row under its key and began
    # a second chain (twice the attempts, two dead letters for one message).
    failed = {"last_status": 500, "final_error": "x", "reason": DeadLetterReason.ATTEMPTS_EXHAUSTED}
    await store.schedule(_delivery(1), due_in=0)
    (chain,) = await store.claim_due(limit=1, lease=60, instance="b")
    if end == "delivered":
        assert await store.complete(chain)
    else:
        assert await store.dead_letter(chain, **failed) is not None
    # the redelivery's first attempt failed: neither a row nor a dead letter of its own
    assert await store.schedule(_delivery(1), due_in=0) is None
    assert await store.dead_letter(_delivery(1), **failed) is None
    assert await store.backlog() == 0
    dead = await store.list_dead_letters(DeadLetterFilter())
    assert len(dead) == (1 if end == "dead-lettered" else 0)
    # another bus message of the event (accepted again) is a chain of its own
    assert await store.schedule(dataclasses.replace(_delivery(1), acceptance="b:2"), due_in=0)
    # the ends are kept a day, then forgotten
    assert await store.prune_ends() == 0
    await store._pool.execute("UPDATE delivery_ends SET ended_at = now() - interval '2 days'")
    assert await store.prune_ends() == 1
    assert await store.schedule(_delivery(1), due_in=0) is not None


async def test_a_replay_moves_only_the_dead_letters_there_when_it_began(
    store: DeliveryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replayed delivery failing again while later batches moved was a new dead letter (a
    # higher id) that a later batch moved again: replayed twice by one request.
    monkeypatch.setattr(store_module, "REPLAY_BATCH", 2)
    failed = {"last_status": 400, "final_error": "x", "reason": DeadLetterReason.NON_RETRYABLE}
    for i in range(5):
        await store.dead_letter(_delivery(i), **failed)
    moved: list[int] = []
    async for batch in store.replay(DeadLetterFilter()):
        moved += [item["id"] for item in batch]
        if len(moved) == 2:  # one of them, dead-lettered again meanwhile
            await store.dead_letter(_delivery(0), **failed)
    assert len(moved) == 5
    assert len(await store.list_dead_letters(DeadLetterFilter())) == 1


async def test_a_follow_up_is_stored_under_its_rule_and_kind(store: DeliveryStore) -> None:
    # Rows name a follow-up "<rule>#<kind>", as they always have: rows written before the kind
    # was explicit read back the same, and the dead letters' rule filter keeps its meaning.
    for kind in DeliveryKind:
        event = {"specversion": "1.0", "id": f"k-{kind.value}", "source": "tests/store"}
        follow_up = Delivery(
            event=event, rule="orders", kind=kind, target="fn", payload=event, is_cloudevent=True
        )
        await store.schedule(follow_up, due_in=0)
    claimed = await store.claim_due(limit=10, lease=60, instance="a")
    assert sorted((d.rule, d.kind) for d in claimed) == sorted(
        ("orders", kind) for kind in DeliveryKind
    )
    for d in claimed:
        await store.dead_letter(
            d, last_status=None, final_error=None, reason=DeadLetterReason.NON_RETRYABLE
        )
    rules = {item["rule"] for item in await store.list_dead_letters(DeadLetterFilter())}
    assert rules == {"orders", "orders#dead-letter", "orders#on-success", "orders#on-failure"}
    only = await store.list_dead_letters(DeadLetterFilter(rule="orders#on-failure"))
    assert [item["event_id"] for item in only] == ["k-on-failure"]


async def test_a_write_that_never_returns_is_reported_stalled(
    store: DeliveryStore, database_dsn: str
) -> None:
    # Readiness asks this: a retry row's INSERT that hangs raised nothing, and the delivery
    # (and the router's window slot) waited on it for ever while a ping still answered.
    async with table_locked(database_dsn, "delivery_retries"):
        scheduled = asyncio.ensure_future(store.schedule(_delivery(1), due_in=0))
        assert store.writes.stalled(after=0.3) is None  # just started

        await eventually(lambda: store.writes.stalled(after=0.3) is not None, within=30)
        why = store.writes.stalled(after=0.3) or ""
        assert why.startswith("scheduling a retry unanswered for"), why
        assert store.writes.stalled() is None  # the default: 45 s
    await asyncio.wait_for(scheduled, 30)
    assert store.writes.stalled(after=0.0) is None


async def test_an_operators_bulk_work_is_not_a_stalled_write(
    store: DeliveryStore, database_dsn: str
) -> None:
    # A purge of millions of dead letters may take minutes: it made readiness report the
    # database stalled, taking the instance out of service while it ran.
    async with table_locked(database_dsn, "dead_letters"):
        purging = asyncio.ensure_future(store.purge(DeadLetterFilter(target="fn")))
        await asyncio.sleep(0.5)
        assert not purging.done()
        assert store.writes.stalled(after=0.1) is None
    assert await asyncio.wait_for(purging, 30) == 0


async def test_claims_of_a_process_that_ended_are_given_back_at_once(
    store: DeliveryStore,
) -> None:
    # A process killed while it held retries: they waited for its lease (30 s by default)
    # before anyone tried them. Given back at the next start of this installation on this
    # host, but only a dead process's: a running one (another worker) keeps its claims.
    here = "inst-1|host-a|"
    ended = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await ended.wait()  # its pid runs no more (and is not taken again within this test)
    running = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    try:
        for i in range(6):
            await store.schedule(_delivery(i), due_in=0)
        claimers = {
            "dead": f"{here}{ended.pid}|x",
            "alive": f"{here}{running.pid}|y",
            "elsewhere": f"inst-1|host-b|{ended.pid}|z",
        }
        for claimer in claimers.values():
            assert len(await store.claim_due(limit=2, lease=3600, instance=claimer)) == 2
        assert await store.take_back(here) == {ended.pid: 2}
        again = await store.claim_due(limit=10, lease=60, instance="next")
        assert sorted(d.claim.split("/")[0] for d in again if d.claim) == ["next", "next"]
        assert await store.take_back(here) == {}  # nothing more of the dead one's
    finally:
        running.kill()
        await running.wait()
