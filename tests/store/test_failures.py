"""The store's reads on a real PostgreSQL: a value the database refuses is StoreDataError (the
caller's fault: the API answers 400), distinct from StoreError (the database's: 503)."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import asyncpg
import pytest

from eventbus._errors import StoreDataError, StoreError, StoreUnavailable
from eventbus.delivery import DeadLetterFilter, DeliveryStore
from eventbus.sources import list_dead_letters
from eventbus.store import Store, dumps_jsonb, loads_jsonb
from eventbus.store._audit import _bad_data
from eventbus.store._failures import run_db
from tests.fixtures.wait import eventually


@pytest.mark.parametrize(
    "flt",
    [
        DeadLetterFilter(rule="a\x00b"),
        DeadLetterFilter(source="\x00"),
        DeadLetterFilter(ids=(2**70,)),
        DeadLetterFilter(status=2**40),
    ],
    ids=["NUL in text", "NUL alone", "id beyond bigint", "status beyond integer"],
)
async def test_refused_filter_values_are_data_errors(
    database_dsn: str, flt: DeadLetterFilter
) -> None:
    async with await Store.open(database_dsn) as store:
        deliveries = DeliveryStore(store.pool)
        with pytest.raises(StoreDataError, match="listing dead letters"):
            await deliveries.list_dead_letters(flt)
        with pytest.raises(StoreDataError, match="purging dead letters"):
            await deliveries.purge(flt)
        # the pool is fine afterwards
        assert await deliveries.list_dead_letters(DeadLetterFilter()) == []


async def test_trail_and_source_dead_letters_refuse_nul_as_data_errors(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        with pytest.raises(StoreDataError, match="cannot read the trail"):
            await store.event_trail("/s", "a\x00")
        with pytest.raises(StoreDataError, match="listing source dead letters"):
            await list_dead_letters(store.pool, source="\x00")
        with pytest.raises(StoreDataError):
            await DeliveryStore(store.pool).get_dead_letter(-(2**64))
        assert await store.event_trail("/s", "a") is None


async def test_a_deadline_turns_a_slow_statement_into_store_error(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        with pytest.raises(StoreError, match=r"did not answer within 0\.2 s") as info:
            await run_db("sleeping", store.pool.execute("SELECT pg_sleep(30)"), deadline=0.2)
        assert not isinstance(info.value, StoreDataError)

        # the statement is cancelled on the server, and its connection returns to the pool
        async def cancelled() -> bool:
            running = await store.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
            )
            return bool(running == 0)

        await eventually(cancelled, within=10, every=0.1, what="the abandoned statement ended")


async def test_a_full_server_is_unavailable_not_a_refusal(database_dsn: str) -> None:
    # SQLSTATE 53300 says the server is full now: a write waits it out (_durably retries
    # StoreUnavailable). As a refusal, an attempt made but not recorded was made again.
    admin = await asyncpg.connect(database_dsn)
    role = f"full_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}' CONNECTION LIMIT 1")
        url = urlsplit(database_dsn)
        dsn = url._replace(netloc=f"{role}:pw-{role}@{url.netloc.rpartition('@')[2]}").geturl()
        first = await asyncpg.connect(dsn)
        try:
            with pytest.raises(StoreUnavailable, match="connecting"):
                await run_db("connecting", asyncpg.connect(dsn))
        finally:
            await first.close()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


@pytest.mark.parametrize(
    ("value", "wrapped"),
    [
        ({"path": "C:\\u0000dir"}, False),  # the text \u0000: jsonb holds it as it is
        ({"path": "\\\\u0000"}, False),
        ({"text": "a\x00b"}, True),  # the character U+0000: jsonb cannot hold it
        ({"text": "\\\x00"}, True),
    ],
    ids=["text-u0000", "text-two-backslashes", "nul", "backslash-then-nul"],
)
async def test_jsonb_wraps_a_nul_only_not_its_text(
    database_dsn: str, value: dict[str, str], wrapped: bool
) -> None:
    # A value wrapped is opaque to SQL (event->>'...' is null): the text "\u0000" in an event
    # made a reply vanish from its cause's trail.
    stored = dumps_jsonb(value)
    assert ("$eventbus.b64" in stored) is wrapped
    conn = await asyncpg.connect(database_dsn)
    try:
        back = await conn.fetchval("SELECT $1::text::jsonb::text", stored)
    finally:
        await conn.close()
    assert loads_jsonb(back) == value


async def test_an_object_wrapped_for_a_nul_keeps_its_other_entries_readable(
    database_dsn: str,
) -> None:
    # A reply whose data held U+0000 was stored whole as base64: its eventbuscausesource was
    # hidden from SQL, and its cause's trail did not list it.
    event = {"id": "r-1", "eventbuscausesource": "/rep", "data": {"x": "a\x00b"}, "n": 2}
    stored = dumps_jsonb(event)
    conn = await asyncpg.connect(database_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT $1::text::jsonb->>'eventbuscausesource' AS cause,"
            " $1::text::jsonb->'data' AS data, $1::text::jsonb::text AS back",
            stored,
        )
    finally:
        await conn.close()
    assert (row["cause"], row["data"]) == ("/rep", None)
    assert loads_jsonb(row["back"]) == event


@pytest.mark.parametrize(
    ("exc", "blames_the_rows"),
    [
        (asyncpg.InternalClientError("cannot switch to state 15; another operation"), False),
        (asyncpg.InterfaceError("connection is closed"), False),
        (ConnectionResetError(), False),
        (ValueError("a value the encoder refused"), True),
    ],
)
def test_a_broken_connection_is_not_blamed_on_the_audit_rows(
    exc: Exception, blames_the_rows: bool
) -> None:
    # PostgreSQL killed during a COMMIT surfaces as InternalClientError: taken for bad data,
    # the batch was split and good rows set aside instead of written again
    assert _bad_data(exc) is blames_the_rows
