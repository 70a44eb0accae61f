"""Retention against a real PostgreSQL: rows past their age are deleted in batches, an event's
trail stays while a dead letter or a waiting retry of it exists, one instance prunes at a time,
and a failed round is tried again."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

from eventbus import metrics
from eventbus.store import Pruner, RetentionPolicy, Store
from eventbus.store._retention import LOCK_KEY
from tests.fixtures.postgres import table_locked
from tests.fixtures.service import StartService
from tests.fixtures.wait import eventually

DAY = 86400.0
OLD = "now() - interval '40 days'"
NEW = "now() - interval '1 hour'"


async def _trail(conn: asyncpg.Connection, event_id: str, at: str) -> None:
    """An event's audit rows (accepted, matched, one attempt), written ``at``."""
    await conn.execute(
        "INSERT INTO events (source, id, received_at, via, event)"
        f" VALUES ('/s', $1, {at}, 'http', '{{}}')",
        event_id,
    )
    await conn.execute(
        f"INSERT INTO matches (source, id, rule, target, at) VALUES ('/s', $1, 'r', 't', {at})",
        event_id,
    )
    await conn.execute(
        "INSERT INTO attempts (source, id, rule, target, attempt, outcome, duration_ms, at)"
        f" VALUES ('/s', $1, 'r', 't', 1, 'failed', 1.0, {at})",
        event_id,
    )


async def _dead_letter(conn: asyncpg.Connection, event_id: str, at: str) -> None:
    await conn.execute(
        "INSERT INTO dead_letters (created_at, event_source, event_id, event, rule, target,"
        " payload, is_cloudevent, attempts, history, reason, first_attempt_at)"
        f" VALUES ({at}, '/s', $1, '{{}}', 'r', 't', '{{}}', true, 1, '[]',"
        f" 'attempts-exhausted', {at})",
        event_id,
    )


async def _retry(conn: asyncpg.Connection, event_id: str) -> None:
    await conn.execute(
        "INSERT INTO delivery_retries (due_at, event_source, event_id, event, rule, target,"
        " payload, is_cloudevent) VALUES (now(), '/s', $1, '{}', 'r', 't', '{}', true)",
        event_id,
    )


async def _rows(conn: asyncpg.Connection) -> dict[str, Any]:
    return {
        table: sorted(r[0] for r in await conn.fetch(f"SELECT {column} FROM {table}"))
        for table, column in (
            ("events", "id"),
            ("matches", "id"),
            ("attempts", "id"),
            ("dead_letters", "event_id"),
            ("refusals", "reason"),
            ("audit_quarantine", "error"),
            ("source_dead_letters", "error"),
        )
    }


async def _fill(conn: asyncpg.Connection) -> None:
    """Old and new rows of every pruned table: old-plain has nothing keeping it, old-dead has
    a dead letter (old itself), old-retry a waiting retry, new is recent."""
    for n in range(7):  # more than a batch of 2: pruned in several statements
        await _trail(conn, f"old-plain-{n}", OLD)
    await _trail(conn, "old-dead", OLD)
    await _dead_letter(conn, "old-dead", OLD)
    await _trail(conn, "old-retry", OLD)
    await _retry(conn, "old-retry")
    await _trail(conn, "new", NEW)
    for at, name in ((OLD, "old"), (NEW, "new")):
        await conn.execute(
            f"INSERT INTO refusals (at, path, reason) VALUES ({at}, '/events', $1)", name
        )
        await conn.execute(
            "INSERT INTO audit_quarantine (at, table_name, record, error)"
            f" VALUES ({at}, 'events', '()', $1)",
            name,
        )
        await conn.execute(
            "INSERT INTO source_dead_letters (source, received_at, payload, error)"
            f" VALUES ('logs', {at}, '\\x00', $1)",
            name,
        )


def _deleted(table: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("eventbus_retention_deleted_total", {"table": table})
        or 0.0
    )


async def test_old_rows_go_and_the_trails_of_dead_letters_and_retries_stay(
    database_dsn: str,
) -> None:
    async with await Store.open(database_dsn) as store, store.pool.acquire() as conn:
        await _fill(conn)
        before = _deleted("events")
        pruner = Pruner(store.pool, RetentionPolicy(audit=30 * DAY), batch=2)

        deleted = await pruner.prune()

        assert deleted == {
            "source_dead_letters": 1,
            "attempts": 7,
            "matches": 7,
            "events": 7,
            "refusals": 1,
            "audit_quarantine": 1,
        }
        kept = ["new", "old-dead", "old-retry"]
        assert await _rows(conn) == {
            "events": kept,
            "matches": kept,
            "attempts": kept,
            "dead_letters": ["old-dead"],  # dead letters are kept for ever by default
            "refusals": ["new"],
            "audit_quarantine": ["new"],
            "source_dead_letters": ["new"],
        }
        assert _deleted("events") - before == 7
        trail = await store.event_trail("/s", "old-dead")  # its dead letter's replay has it
        assert trail is not None and [a["outcome"] for a in trail.to_dict()["attempts"]] == [
            "failed"
        ]
        assert await store.event_trail("/s", "old-plain-0") is None
        assert await pruner.prune() == {}  # nothing left past its age


async def test_a_dead_letter_past_its_age_goes_with_its_trail_in_the_same_round(
    database_dsn: str,
) -> None:
    async with await Store.open(database_dsn) as store, store.pool.acquire() as conn:
        await _fill(conn)
        policy = RetentionPolicy(audit=30 * DAY, dead_letters=30 * DAY, source_dead_letters=None)

        deleted = await Pruner(store.pool, policy).prune()

        assert deleted is not None
        assert deleted["dead_letters"] == 1
        assert "source_dead_letters" not in deleted
        rows = await _rows(conn)
        assert rows["events"] == ["new", "old-retry"]
        assert rows["dead_letters"] == []
        assert rows["source_dead_letters"] == ["new", "old"]


async def test_forever_everywhere_prunes_nothing(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store, store.pool.acquire() as conn:
        await _fill(conn)
        before = await _rows(conn)
        policy = RetentionPolicy(audit=None, dead_letters=None, source_dead_letters=None)
        pruner = Pruner(store.pool, policy)
        pruner.start()  # nothing to prune: no task at all

        assert await pruner.prune() == {}
        assert await _rows(conn) == before
        await pruner.stop()


async def test_one_instance_prunes_at_a_time(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store, store.pool.acquire() as conn:
        await _fill(conn)
        pruner = Pruner(store.pool, RetentionPolicy(audit=30 * DAY))
        other = await asyncpg.connect(database_dsn)
        try:
            # another instance pruning holds the lock
            key = LOCK_KEY
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", key)
            assert await pruner.prune() is None
            assert "old-plain-0" in (await _rows(conn))["events"]
            await other.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await other.close()
        assert await pruner.prune()
        assert "old-plain-0" not in (await _rows(conn))["events"]


async def test_a_round_that_fails_is_logged_and_the_next_one_prunes(
    database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "eventbus.store._retention")
    async with await Store.open(database_dsn) as store, store.pool.acquire() as conn:
        await _fill(conn)
        pruner = Pruner(store.pool, RetentionPolicy(audit=30 * DAY, every=1), timeout=0.5)
        async with table_locked(database_dsn, "attempts"):
            pruner.start()
            await eventually(
                lambda: "retention: pruning failed" in caplog.text,
                within=10,
                what="the failed round logged",
            )
        try:

            async def pruned() -> bool:
                return "old-plain-0" not in (await _rows(conn))["events"]

            await eventually(pruned, within=10, every=0.1, what="the next round's pruning")
            await eventually(lambda: "retention: deleted" in caplog.text, within=5)
        finally:
            await pruner.stop()
        assert not pruner.running


async def test_the_service_prunes_by_its_retention_settings(
    eventbus: StartService, database_dsn: str
) -> None:
    svc = await eventbus(
        rules="[]",
        targets=[],
        settings={"retention": {"audit": "30d", "every": "1s"}},
    )
    status, _ = await svc.post_event(
        {"specversion": "1.0", "id": "fresh", "source": "/s", "type": "t"}
    )
    assert status == 202
    await svc.trail("/s", "fresh")
    conn = await asyncpg.connect(database_dsn)
    try:
        await _trail(conn, "stale", OLD)

        async def stale_gone() -> bool:
            ids = await conn.fetch("SELECT id FROM events")
            return [r["id"] for r in ids] == ["fresh"]

        await eventually(stale_gone, within=15, every=0.1, what="the stale event pruned")
    finally:
        await conn.close()
