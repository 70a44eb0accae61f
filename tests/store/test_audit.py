"""The audit writer against a real PostgreSQL: COPY batches, flush, backpressure, bad rows and
a Postgres restart in the middle of writing."""

from __future__ import annotations

import asyncio
import random
import string
from datetime import UTC, datetime
from typing import Any

import pytest

from eventbus import metrics
from eventbus._errors import MAX_ERROR_CHARS, StoreError, StoreUnavailable
from eventbus.cloudevents import validate
from eventbus.store import Attempt, AttemptOutcome, EmbeddedPostgres, Store
from tests.fixtures.postgres import table_locked
from tests.fixtures.wait import eventually

# Guards against a hang, not speed assertions: every wait in these tests is bounded.
BOUND = 60.0


def _event(n: int, **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "source": "/test", "id": f"e{n}", "type": "t", **extra}


async def _count(store: Store, table: str) -> int:
    count: int = await store.pool.fetchval(f"SELECT count(*) FROM {table}")
    return count


async def _unhealthy(store: Store, **thresholds: float) -> str:
    """Why the audit writer reports itself unhealthy, once it does (within ``BOUND``)."""
    await eventually(lambda: not store.audit.health(**thresholds)[0], within=BOUND)
    healthy, why = store.audit.health(**thresholds)
    assert not healthy
    return why


async def test_many_rows_land_in_batches(database_dsn: str) -> None:
    async with await Store.open(database_dsn, audit_batch=100) as store:
        for n in range(1000):
            await store.audit.event_accepted(_event(n), via="http")
            await store.audit.rule_matched(_event(n), "r", "t")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert await _count(store, "events") == 1000
        assert await _count(store, "matches") == 1000
        assert store.audit.pending == 0


async def test_flush_waits_for_rows_recorded_before_it(database_dsn: str) -> None:
    # A long interval: without a flush the writer would sit on a partial batch for a minute.
    async with await Store.open(database_dsn, audit_interval=60.0) as store:
        await asyncio.wait_for(store.audit.flush(), BOUND)  # nothing buffered: returns
        await store.audit.event_accepted(_event(1), via="http")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert await _count(store, "events") == 1


async def test_concurrent_flushes_share_the_writes(database_dsn: str) -> None:
    async with await Store.open(database_dsn, audit_interval=60.0) as store:

        async def produce_then_flush(k: int) -> int:
            for n in range(50):
                await store.audit.event_accepted(_event(k * 100 + n), via="http")
            await store.audit.flush()
            # Everything this producer recorded is committed when its flush returns.
            count: int = await store.pool.fetchval(
                "SELECT count(*) FROM events WHERE id LIKE $1", f"e{k}__"
            )
            return count

        counts = await asyncio.wait_for(
            asyncio.gather(*(produce_then_flush(k) for k in range(10, 30))), BOUND
        )
        assert counts == [50] * 20
        assert await _count(store, "events") == 1000


async def test_close_writes_out_the_buffer(database_dsn: str) -> None:
    store = await Store.open(database_dsn, audit_interval=60.0)
    for n in range(10):
        await store.audit.event_accepted(_event(n), via="http")
    await asyncio.wait_for(store.close(), BOUND)
    async with await Store.open(database_dsn) as again:
        assert await _count(again, "events") == 10


async def test_backpressure_bounds_the_buffer_and_loses_nothing(database_dsn: str) -> None:
    async with await Store.open(database_dsn, audit_batch=2, audit_buffer=4) as store:
        most = 0

        async def produce(k: int) -> None:
            nonlocal most
            for n in range(25):
                await store.audit.attempt(
                    Attempt(
                        event=_event(k * 100 + n),
                        rule="r",
                        target="t",
                        number=1,
                        outcome=AttemptOutcome.DELIVERED,
                        status=200,
                        duration_ms=1.0,
                    )
                )
                most = max(most, store.audit.pending)

        await asyncio.wait_for(asyncio.gather(*(produce(k) for k in range(8))), BOUND)
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert most <= 4
        assert await _count(store, "attempts") == 200


async def test_a_bad_row_is_isolated_and_the_rest_land(
    database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Store.open(database_dsn, audit_batch=64) as store:
        for n in range(100):
            # Postgres text cannot hold NUL: these two rows are refused by the server.
            subject = "a\x00b" if n in (17, 80) else "ok"
            await store.audit.event_accepted(_event(n, subject=subject), via="http")
        # The driver cannot encode a str as an integer column: refused before it is sent.
        await store.audit.attempt(
            Attempt(
                event=_event(1),
                rule="r",
                target="t",
                number=1,
                outcome=AttemptOutcome.RETRY_SCHEDULED,
                status="500",  # type: ignore[arg-type]
                duration_ms=1.0,
            )
        )
        # Nor an integer beyond the column's range: asyncpg raises OverflowError for that,
        # neither a ValueError nor a server error, and the writer must still set it aside.
        await store.audit.attempt(
            Attempt(
                event=_event(2),
                rule="r",
                target="t",
                number=2**40,
                outcome=AttemptOutcome.RETRY_SCHEDULED,
                duration_ms=1.0,
            )
        )
        # An id too long for an index entry (a server limit, SQLSTATE 54000): retried for ever
        # before, which held every later row and so the acknowledgement of every message.
        long_id = "".join(random.Random(7).choices(string.ascii_letters, k=3000))
        await store.audit.event_accepted({**_event(0), "id": long_id}, via="http")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert await _count(store, "events") == 98
        assert await _count(store, "attempts") == 0
        assert store.audit.quarantined == 5
        assert "set aside in audit_quarantine" in caplog.text
        kept = await store.pool.fetch(
            "SELECT table_name, record, error FROM audit_quarantine ORDER BY id"
        )
        assert [r["table_name"] for r in kept] == [
            "events",
            "events",
            "attempts",
            "attempts",
            "events",
        ]
        assert "index row size" in kept[4]["error"]
        assert "a\\x00b" in kept[0]["record"] and "e17" in kept[0]["record"]
        assert "'500'" in kept[2]["record"]
        assert "OverflowError" in kept[3]["error"] or "out of range" in kept[3]["error"]
        assert store.audit.health() == (True, "ok")
        # The writer is still alive.
        await store.audit.event_accepted(_event(1000), via="http")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert await _count(store, "events") == 99


async def test_a_time_outside_datetime_range_is_stored_as_null(database_dsn: str) -> None:
    # Valid RFC 3339 whose instant in UTC is before year 1 or after 9999: Python cannot hold
    # it as a datetime, PostgreSQL's timestamptz could, the row keeps the event and no time.
    async with await Store.open(database_dsn) as store:
        for n, moment in enumerate(("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-00:01")):
            await store.audit.event_accepted(_event(n, time=moment), via="http")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        rows = await store.pool.fetch("SELECT time, event->>'time' AS raw FROM events")
        assert [r["time"] for r in rows] == [None, None]
        assert {r["raw"] for r in rows} == {
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59-00:01",
        }
        assert store.audit.quarantined == 0


async def test_a_time_validation_accepts_is_stored_as_that_instant(database_dsn: str) -> None:
    # A leap second and lower-case t/z are RFC 3339 and accepted; they were stored as NULL.
    times = {
        "2016-12-31T23:59:60Z": datetime(2017, 1, 1, tzinfo=UTC),
        "2026-01-01t10:00:00z": datetime(2026, 1, 1, 10, tzinfo=UTC),
        "2026-06-30t23:59:60.5+02:00": datetime(2026, 6, 30, 22, 0, 0, 500000, tzinfo=UTC),
    }
    async with await Store.open(database_dsn) as store:
        for n, moment in enumerate(times):
            event = validate(_event(n, time=moment))  # accepted as it is
            await store.audit.event_accepted(event, via="http")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        rows = await store.pool.fetch("SELECT time, event->>'time' AS raw FROM events")
        assert {r["raw"]: r["time"] for r in rows} == times


async def test_a_redelivered_acceptance_is_recorded_once(database_dsn: str) -> None:
    async with await Store.open(database_dsn, audit_interval=60.0) as store:
        await store.audit.event_accepted(_event(1), via="http", ref="nats:S:1:0")
        await asyncio.wait_for(store.audit.flush(), BOUND)
        # The same bus message again (a redelivery after a crash) among new ones, in one batch.
        for n, ref in ((1, "nats:S:1:0"), (2, "nats:S:2:0"), (3, None), (3, None)):
            await store.audit.event_accepted(_event(n), via="http", ref=ref)
        await asyncio.wait_for(store.audit.flush(), BOUND)
        rows = await store.pool.fetch("SELECT id, bus_ref FROM events ORDER BY seq")
        assert [(r["id"], r["bus_ref"]) for r in rows] == [
            ("e1", "nats:S:1:0"),
            ("e2", "nats:S:2:0"),
            ("e3", None),
            ("e3", None),
        ]
        assert store.audit.quarantined == 0


async def test_odd_events_are_stored_with_what_they_have(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        audit = store.audit
        await audit.event_accepted({}, via="http")
        await audit.event_accepted({"id": 7, "source": ["x"], "time": "yesterday"}, via="kafka")
        await audit.event_accepted({"id": "naive", "time": "2026-11-28T12:00:00"}, via="reply")
        await audit.event_accepted({"id": "set", "data": {1, 2}}, via="source:logs")
        await audit.rule_matched({}, "r", "t")
        await audit.attempt(
            Attempt(
                event={"id": "long"},
                rule="r",
                target="t",
                number=3,
                outcome=AttemptOutcome.DEAD_LETTERED,
                error="x" * 10_000,
            )
        )
        await asyncio.wait_for(audit.flush(), BOUND)
        rows = await store.pool.fetch("SELECT source, id, time, via FROM events ORDER BY seq")
        assert [(r["source"], r["id"], r["via"]) for r in rows] == [
            (None, None, "http"),
            ("['x']", "7", "kafka"),
            (None, "naive", "reply"),
            (None, "set", "source:logs"),
        ]
        assert rows[1]["time"] is None
        assert rows[2]["time"].isoformat() == "2026-11-28T12:00:00+00:00"
        assert await store.pool.fetchval("SELECT length(error) FROM attempts") == MAX_ERROR_CHARS
        assert await _count(store, "matches") == 1
        assert audit.quarantined == 0


async def test_postgres_restart_loses_no_buffered_row(
    postgres_server: EmbeddedPostgres, database_dsn: str
) -> None:
    async with await Store.open(database_dsn, audit_batch=10, audit_buffer=50) as store:
        for n in range(30):
            await store.audit.event_accepted(_event(n), via="http")
        await asyncio.wait_for(store.audit.flush(), BOUND)

        await postgres_server.stop()
        try:

            async def produce(k: int) -> None:
                for n in range(20):
                    await store.audit.event_accepted(_event(k * 100 + n), via="http")

            producers = asyncio.gather(*(produce(k) for k in range(1, 6)))
            flushed = asyncio.ensure_future(store.audit.flush())
            # 100 rows against a buffer of 50 with Postgres down: producers must be waiting.
            await eventually(lambda: store.audit.pending == 50, within=2, every=0.01)
            assert not producers.done()
            assert not flushed.done()
            # Meanwhile reads fail clearly instead of hanging.
            assert not await store.ping()
            with pytest.raises(StoreError, match="cannot read the trail"):
                await asyncio.wait_for(store.event_trail("/test", "e1"), BOUND)
        finally:
            await postgres_server.start()

        await asyncio.wait_for(producers, BOUND)
        await asyncio.wait_for(flushed, BOUND)
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert await _count(store, "events") == 130
        assert store.audit.quarantined == 0
        assert await store.ping()


async def test_close_gives_up_after_its_grace_when_postgres_stays_down(
    postgres_server: EmbeddedPostgres, database_dsn: str
) -> None:
    store = await Store.open(database_dsn)
    await postgres_server.stop()
    try:
        await store.audit.event_accepted(_event(1), via="http")
        flushed = asyncio.ensure_future(store.audit.flush())
        await asyncio.wait_for(store.audit.close(grace=0.5), BOUND)
        with pytest.raises(StoreError, match="closed before these rows were written"):
            await asyncio.wait_for(flushed, BOUND)
    finally:
        await postgres_server.start()
        await store.close()


async def test_a_server_side_failure_is_retried_not_quarantined_and_reported(
    database_dsn: str,
) -> None:
    # A missing table is the server's state, not the rows' fault: no bisecting, no setting
    # aside; the writer keeps the rows, reports the stall, and writes them once it is back.
    async with await Store.open(database_dsn) as store:
        await store.pool.execute("ALTER TABLE matches RENAME TO matches_away")
        try:
            await store.audit.rule_matched(_event(1), "r", "t")
            flushed = asyncio.ensure_future(store.audit.flush())
            why = await _unhealthy(store, stall_after=0.2)
            assert "1 rows waiting" in why and "matches" in why
            assert not flushed.done()
            # the backlog is a metric too (it was only in the health answer)
            assert metrics.REGISTRY.get_sample_value("eventbus_audit_pending") == 1
        finally:
            await store.pool.execute("ALTER TABLE matches_away RENAME TO matches")
        await asyncio.wait_for(flushed, BOUND)
        assert metrics.REGISTRY.get_sample_value("eventbus_audit_pending") == 0
        assert await _count(store, "matches") == 1
        assert store.audit.quarantined == 0
        assert store.audit.health(stall_after=0.2) == (True, "ok")


async def test_a_batch_whose_commit_landed_unanswered_is_not_written_again(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL killed as it committed: the batch was in, the answer lost with the
    # connection, and the retry wrote its matches and attempts a second time. Here the first
    # write commits and then fails as such a lost answer does.
    async with await Store.open(database_dsn) as store:
        copy = store.audit._copy
        lost: list[object] = []

        async def commit_then_lose_the_answer(*args: Any, **kwargs: Any) -> None:
            await copy(*args, **kwargs)
            if not lost:
                lost.append(args)
                raise ConnectionResetError("the connection broke after the commit")

        monkeypatch.setattr(store.audit, "_copy", commit_then_lose_the_answer)
        await store.audit.event_accepted(_event(1), via="http")
        await store.audit.rule_matched(_event(1), "r", "t")
        delivered = AttemptOutcome.DELIVERED
        attempt = Attempt(event=_event(1), rule="r", target="t", number=1, outcome=delivered)
        await store.audit.attempt(attempt)
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert lost  # the fault happened
        for table in ("events", "matches", "attempts"):
            assert await _count(store, table) == 1, table


async def test_a_flush_that_is_not_urgent_waits_for_the_next_batch(database_dsn: str) -> None:
    # A minute between partial batches: only a full batch (or an urgent flush) writes.
    async with await Store.open(database_dsn, audit_batch=10, audit_interval=60.0) as store:
        for n in range(5):
            await store.audit.event_accepted(_event(n), via="http")
        lazy = asyncio.ensure_future(store.audit.flush(urgent=False))
        for n in range(5, 10):
            await store.audit.event_accepted(_event(n), via="http")
        await asyncio.wait_for(lazy, BOUND)  # the tenth row filled the batch
        assert await _count(store, "events") == 10
        await store.audit.event_accepted(_event(10), via="http")
        lazy = asyncio.ensure_future(store.audit.flush(urgent=False))
        await asyncio.wait_for(store.audit.flush(), BOUND)  # an urgent one takes it along
        assert lazy.done()


async def test_a_write_that_never_returns_turns_health_red(database_dsn: str) -> None:
    # A write that hangs raises nothing (a COMMIT waiting for a synchronous standby that is
    # down, here a table another session holds locked): health was "ok" for as long as it hung.
    async with await Store.open(database_dsn) as store:
        async with table_locked(database_dsn, "matches"):
            await store.audit.rule_matched(_event(1), "r", "t")
            flushed = asyncio.ensure_future(store.audit.flush())
            why = await _unhealthy(store, unanswered_after=0.3)
            assert "writing 1 audit rows unanswered for" in why and "1 rows waiting" in why
            assert store.audit.health() == (True, "ok")  # within the default 45 s
            assert not flushed.done()
        await asyncio.wait_for(flushed, BOUND)
        assert store.audit.health(unanswered_after=0.3) == (True, "ok")


async def test_a_caller_who_waits_for_an_answer_waits_for_room_within_its_bound(
    database_dsn: str,
) -> None:
    # A synchronous invocation audits its rows before the call: with the buffer full and
    # PostgreSQL not taking rows, it waited until the database came back (its caller, an API
    # gateway's client, for ever). Given within, it is told so instead.
    async with await Store.open(database_dsn, audit_batch=2, audit_buffer=4) as store:
        async with table_locked(database_dsn, "events"):
            for n in range(4):
                await store.audit.event_accepted(_event(n), via="http", within=1.0)
            with pytest.raises(StoreUnavailable, match="the audit trail is full: 4 rows wait"):
                await store.audit.event_accepted(_event(4), via="http", within=0.2)
            with pytest.raises(StoreUnavailable):
                await store.audit.rule_matched(_event(4), "r", "t", within=0.2)
            waiting = asyncio.create_task(store.audit.event_accepted(_event(5), via="http"))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # without within: backpressure, as before
        await asyncio.wait_for(waiting, BOUND)  # room once the table is free
        await asyncio.wait_for(store.audit.flush(), BOUND)
        assert await _count(store, "events") == 5
