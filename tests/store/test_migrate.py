"""Versioned migrations against a real PostgreSQL: order, idempotence, locking, refusal."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from eventbus._errors import StoreError
from eventbus.store import Store, _migrate, migrate
from eventbus.store._migrate import Migration, discover
from tests.fixtures.wait import eventually


def test_package_migrations_are_ordered_and_start_with_the_audit_schema() -> None:
    found = discover()
    versions = [m.version for m in found]
    assert versions == sorted(set(versions))
    assert (found[0].version, found[0].name) == (1, "audit")
    assert "CREATE TABLE events" in found[0].sql


def test_discover_reads_any_number_in_order_and_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "0010_later.sql").write_text("SELECT 10")
    (tmp_path / "0002_second.sql").write_text("SELECT 2")
    (tmp_path / "README.md").write_text("not a migration")
    assert [(m.version, m.name) for m in discover(tmp_path)] == [(2, "second"), (10, "later")]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["1_short.sql"], "not named NNNN_name.sql"),
        (["0001_Upper.sql"], "not named NNNN_name.sql"),
        (["0001_a.sql", "0001_b.sql"], "both claim version 0001"),
    ],
)
def test_discover_rejects_badly_named_files(tmp_path: Path, names: list[str], message: str) -> None:
    for name in names:
        (tmp_path / name).write_text("SELECT 1")
    with pytest.raises(StoreError, match=message):
        discover(tmp_path)


async def test_applies_every_migration_once_then_nothing(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        first = await migrate(conn)
        assert [m.version for m in first] == [m.version for m in discover()]
        assert await migrate(conn) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        expected = [(m.version, m.name) for m in discover()]
        assert [(r["version"], r["name"]) for r in rows] == expected
    finally:
        await conn.close()


async def test_indexes_an_earlier_form_of_a_migration_made_are_repaired(database_dsn: str) -> None:
    # 0006 and 0001 were edited after some databases had applied them: those kept the first
    # form (a trail index the query cannot use, so every trail lookup read all of events)
    conn = await asyncpg.connect(database_dsn)
    try:
        await migrate(conn)
        await conn.execute(
            """
            DROP INDEX events_caused_by;
            CREATE INDEX events_caused_by ON events
                ((event->>'eventbuscausesource'), (event->>'eventbuscauseid'), received_at, seq)
                WHERE event ? 'eventbuscauseid';
            CREATE INDEX events_type_received_at ON events (type, received_at);
            DELETE FROM schema_migrations WHERE version = 10;
            """
        )
        assert [m.name for m in await migrate(conn)] == ["index_repairs"]
        defined = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'events_caused_by'"
        )
        assert defined.endswith("WHERE (via = 'reply'::text)"), defined
        assert await conn.fetchval("SELECT to_regclass('events_type_received_at')") is None
        plan = await conn.fetchval(
            "EXPLAIN SELECT seq FROM events WHERE via = 'reply' "
            "AND event->>'eventbuscausesource' = 'a' AND event->>'eventbuscauseid' = 'b'"
        )
        assert "events_caused_by" in plan, plan
    finally:
        await conn.close()


async def test_concurrent_opens_on_a_fresh_database_both_succeed(database_dsn: str) -> None:
    stores = await asyncio.gather(*(Store.open(database_dsn) for _ in range(3)))
    try:
        count = await stores[0].pool.fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(discover())
    finally:
        for store in stores:
            await store.close()


async def test_a_newer_schema_is_refused(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'future')")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match=r"version 9999 \(future\), newer than this eventbus"):
        await Store.open(database_dsn)


async def test_a_failing_migration_rolls_back_alone_and_unlocks(database_dsn: str) -> None:
    good = Migration(1, "good", "CREATE TABLE a (x int)")
    bad = Migration(2, "bad", "CREATE TABLE b (x int); SELECT 1 / 0")
    conn = await asyncpg.connect(database_dsn)
    try:
        with pytest.raises(StoreError, match=r"0002_bad\.sql failed: division by zero"):
            await migrate(conn, [good, bad])
        assert await conn.fetchval("SELECT to_regclass('a') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        fixed = Migration(2, "bad", "CREATE TABLE b (x int)")
        assert await migrate(conn, [good, fixed]) == [fixed]
    finally:
        await conn.close()


async def test_a_start_waiting_on_the_migration_lock_says_who_holds_it(
    database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An instance frozen while it held the lock kept the next one "starting" without a word.
    holder = await asyncpg.connect(database_dsn)
    waiting = await asyncpg.connect(database_dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", _migrate._LOCK_KEY)
        pid = holder.get_server_pid()
        with caplog.at_level(logging.WARNING, logger="eventbus.store._migrate"):
            take = asyncio.create_task(_migrate._take_lock(waiting, say_every=0.3))
            await eventually(lambda: f"backend {pid}" in caplog.text, within=10)
            assert not take.done()
            await holder.execute("SELECT pg_advisory_unlock($1)", _migrate._LOCK_KEY)
            await asyncio.wait_for(take, 10)
        assert "waiting" in caplog.text and "schema migration lock" in caplog.text
    finally:
        await holder.close()
        await waiting.close()
