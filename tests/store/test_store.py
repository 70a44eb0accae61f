"""Store lifecycle against a real PostgreSQL: open, ping, event trail, close, bad input."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from eventbus._errors import ConfigError, StoreError
from eventbus.bus._nats_server import free_port as _free_port
from eventbus.store import Attempt, AttemptOutcome, EmbeddedPostgres, EventCursor, Store
from eventbus.store._pool import TRAIL_LIMIT, _search_query


def _event(n: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "source": "/uploads",
        "id": f"evt-{n}",
        "type": "object.created",
        "subject": "photos/cat.jpg",
        "time": "2026-11-28T12:00:00Z",
        "data": {"size": 1024},
        **extra,
    }


async def test_event_trail_returns_event_matches_and_attempts_in_order(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        event = _event()
        await store.audit.event_accepted(event, via="http", size=321)
        await store.audit.rule_matched(event, "thumbnails", "resize-fn")
        await store.audit.rule_matched(event, "archive", "archive-topic")
        await store.audit.attempt(
            Attempt(
                event=event,
                rule="thumbnails",
                target="resize-fn",
                number=1,
                outcome=AttemptOutcome.RETRY_SCHEDULED,
                status=503,
                duration_ms=12.5,
                error="503 Service Unavailable",
            )
        )
        await store.audit.attempt(
            Attempt(
                event=event,
                rule="thumbnails",
                target="resize-fn",
                number=2,
                outcome=AttemptOutcome.DELIVERED,
                status=200,
                duration_ms=3.0,
            )
        )
        await store.audit.event_accepted(_event(2), via="kafka")
        await store.audit.flush()

        trail = await store.event_trail("/uploads", "evt-1")
        assert trail is not None
        assert trail.event == event
        assert trail.via == "http"
        assert [(m["rule"], m["target"]) for m in trail.matches] == [
            ("thumbnails", "resize-fn"),
            ("archive", "archive-topic"),
        ]
        assert [(a["attempt"], a["outcome"], a["status"]) for a in trail.attempts] == [
            (1, "retry-scheduled", 503),
            (2, "delivered", 200),
        ]
        assert trail.attempts[0]["error"] == "503 Service Unavailable"
        assert trail.attempts[1]["error"] is None
        assert trail.received_at <= trail.matches[0]["at"] <= trail.attempts[0]["at"]

        as_json = orjson.loads(orjson.dumps(trail.to_dict()))
        assert as_json["event"] == event
        assert as_json["attempts"][1]["duration_ms"] == 3.0
        assert isinstance(as_json["matches"][0]["at"], str)

        row = await store.pool.fetchrow(
            "SELECT type, subject, time, size FROM events WHERE id = 'evt-1'"
        )
        assert row is not None
        assert (row["type"], row["subject"]) == ("object.created", "photos/cat.jpg")
        assert row["size"] == 321
        assert row["time"].isoformat() == "2026-11-28T12:00:00+00:00"


async def test_a_trail_lists_the_latest_attempts_and_says_it_is_cut(database_dsn: str) -> None:
    # 400,000 attempt rows of one event were read at once (383 MiB for one request).
    async with await Store.open(database_dsn) as store:
        event = _event()
        await store.audit.event_accepted(event, via="http")
        await store.audit.rule_matched(event, "r", "fn")
        for number in range(1, TRAIL_LIMIT + 6):
            attempt = Attempt(
                event=event,
                rule="r",
                target="fn",
                number=number,
                outcome=AttemptOutcome.RETRY_SCHEDULED,
                status=503,
            )
            await store.audit.attempt(attempt)
        await store.audit.flush()
        trail = await store.event_trail("/uploads", "evt-1")
        assert trail is not None and trail.truncated and len(trail.matches) == 1
        numbers = [a["attempt"] for a in trail.attempts]
        assert numbers == list(range(6, TRAIL_LIMIT + 6))  # the latest, in time order
        assert trail.to_dict()["truncated"] is True
        await store.audit.event_accepted(_event(2), via="http")
        await store.audit.flush()
        whole = await store.event_trail("/uploads", "evt-2")
        assert whole is not None and not whole.truncated


async def test_unknown_event_has_no_trail(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        assert await store.event_trail("/nowhere", "nothing") is None


async def test_duplicates_are_kept_and_the_trail_shows_the_first(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        await store.audit.event_accepted(_event(), via="http")
        await store.audit.event_accepted(_event(), via="replay")
        await store.audit.flush()
        assert await store.pool.fetchval("SELECT count(*) FROM events WHERE id = 'evt-1'") == 2
        trail = await store.event_trail("/uploads", "evt-1")
        assert trail is not None
        assert trail.via == "http"


async def test_refusals_are_recorded(database_dsn: str) -> None:
    async with await Store.open(database_dsn) as store:
        assert store.audit.refused(remote="127.0.0.1", path="/events", reason="missing API key")
        assert store.audit.refused(remote=None, path="/rules", reason="invalid API key")
        await store.audit.flush()
        rows = await store.pool.fetch("SELECT remote, path, reason FROM refusals ORDER BY seq")
        assert [tuple(r) for r in rows] == [
            ("127.0.0.1", "/events", "missing API key"),
            (None, "/rules", "invalid API key"),
        ]


async def test_a_refusal_never_waits_for_room(database_dsn: str) -> None:
    # A flood of refused requests must not queue behind a full buffer: beyond it, not recorded.
    async with await Store.open(
        database_dsn, audit_batch=2, audit_buffer=4, audit_interval=60
    ) as store:
        recorded = [
            store.audit.refused(remote=None, path="/events", reason="missing API key")
            for _ in range(10)
        ]
        assert recorded == [True] * 4 + [False] * 6
        await store.audit.flush()
        assert await store.pool.fetchval("SELECT count(*) FROM refusals") == 4


async def test_ping_and_idempotent_close(database_dsn: str) -> None:
    store = await Store.open(database_dsn, min_size=1, max_size=2)
    assert await store.ping()
    await store.close()
    await store.close()
    assert not await store.ping()
    with pytest.raises(StoreError, match="closed"):
        await store.audit.event_accepted(_event(), via="http")


async def test_unreachable_postgres_is_a_clear_error_after_a_bounded_wait() -> None:
    dsn = f"postgresql://eventbus:secret@127.0.0.1:{_free_port()}/eventbus"
    with pytest.raises(StoreError, match=r"unreachable \(gave up after 1 s\)") as caught:
        await asyncio.wait_for(Store.open(dsn, connect_timeout=1), 30)
    assert "secret" not in str(caught.value)
    assert "eventbus:***@127.0.0.1" in str(caught.value)


async def test_unknown_database_is_refused_at_once(postgres_server: EmbeddedPostgres) -> None:
    with pytest.raises(StoreError, match=r"refused the connection.*does not exist"):
        await asyncio.wait_for(Store.open(postgres_server.dsn_for("no_such_db")), 30)


@pytest.mark.parametrize("dsn", ["mysql://localhost/x", "postgresql://h:notaport/db"])
async def test_malformed_dsn_is_a_clear_error(dsn: str) -> None:
    with pytest.raises(StoreError, match="invalid Postgres DSN"):
        await asyncio.wait_for(Store.open(dsn, connect_timeout=1), 30)


async def test_a_malformed_dsn_with_a_password_shows_no_piece_of_it() -> None:
    # an unencoded "/" in the password: the URL's masking stopped there, and asyncpg's own
    # message quoted the rest ("invalid literal for int(): 'TopSecret'")
    dsn = "postgresql://postgres:hunter@2:TopSecret/x@127.0.0.1:1/postgres"
    with pytest.raises(StoreError) as refused:
        await asyncio.wait_for(Store.open(dsn, connect_timeout=1), 30)
    assert "TopSecret" not in str(refused.value) and "hunter" not in str(refused.value)
    assert "invalid Postgres DSN postgresql://postgres:***@127.0.0.1:1/postgres" in str(
        refused.value
    )


@pytest.mark.parametrize(
    "settings",
    [{"audit_batch": 0}, {"audit_batch": 10, "audit_buffer": 5}, {"audit_interval": -1.0}],
)
async def test_inconsistent_audit_settings_are_refused(
    database_dsn: str, settings: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError, match="audit settings need"):
        await Store.open(database_dsn, **settings)


async def test_search_events_newest_first_filtered_and_paged(database_dsn: str) -> None:
    base = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    # (id, source, type, seconds after base): c and d were stored in the same microsecond
    rows = [
        ("a", "/uploads", "object.created", 0),
        ("b", "/orders", "order.created", 1),
        ("c", "/uploads", "object.created", 2),
        ("d", "/uploads", "object.deleted", 2),
        ("e", "/orders", "order.created", 3),
    ]
    async with await Store.open(database_dsn) as store:
        for event_id, source, type_, seconds in rows:
            event = _event(id=event_id, source=source, type=type_)
            received = base + timedelta(seconds=seconds)
            await store.audit.event_accepted(event, via="http", received_at=received)
        await store.audit.flush()

        items, cursor = await store.search_events()
        assert [i["id"] for i in items] == ["e", "d", "c", "b", "a"] and cursor is None
        assert items[0] == {
            "source": "/orders",
            "id": "e",
            "type": "order.created",
            "subject": "photos/cat.jpg",
            "time": "2026-11-28T12:00:00+00:00",
            "received_at": "2026-12-01T12:00:03+00:00",
            "via": "http",
            "size": items[0]["size"],
        }
        items, _ = await store.search_events(type="object.created")
        assert [i["id"] for i in items] == ["c", "a"]
        items, _ = await store.search_events(source="/uploads", type="object.deleted")
        assert [i["id"] for i in items] == ["d"]
        # since is inclusive, until exclusive
        window = {"since": base + timedelta(seconds=1), "until": base + timedelta(seconds=3)}
        items, _ = await store.search_events(**window)
        assert [i["id"] for i in items] == ["d", "c", "b"]
        assert (await store.search_events(source="/nowhere"))[0] == []

        # pages of two: every event once, the tie split across pages in order
        seen: list[str] = []
        after = None
        while True:
            items, after = await store.search_events(limit=2, after=after)
            seen += [i["id"] for i in items]
            if after is None:
                break
            assert EventCursor.parse(str(after)) == after
        assert seen == ["e", "d", "c", "b", "a"]
        items, after = await store.search_events(source="/uploads", limit=1)
        assert [i["id"] for i in items] == ["d"] and after is not None
        items, _ = await store.search_events(source="/uploads", limit=5, after=after)
        assert [i["id"] for i in items] == ["c", "a"]


@pytest.mark.parametrize(
    "token",
    ["", "1", "1-", "-1", "a-1", "1-2-3", "1--2", " 1-2", "1-9223372036854775808", "\uff11-2"],
)
def test_event_cursor_refuses_what_it_did_not_make(token: str) -> None:
    with pytest.raises(ValueError):
        EventCursor.parse(token)


def test_event_cursor_reads_back_any_moment() -> None:
    for moment in (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, tzinfo=UTC)):
        cursor = EventCursor(moment, 2**63 - 1)
        assert EventCursor.parse(str(cursor)) == cursor
    with pytest.raises(ValueError):  # a moment beyond year 9999
        EventCursor.parse("999999999999999999-1")


async def test_search_events_reads_through_an_index(database_dsn: str) -> None:
    """Every filter of ``GET /events`` reads its page from an index in the answer's order
    (no sort of the matching rows), on a trail long enough for the planner to care."""
    async with await Store.open(database_dsn) as store:
        await store.pool.execute(
            "INSERT INTO events (source, id, type, received_at, via, event)"
            " SELECT 'src/' || (g % 50), 'e-' || g, 'type.' || (g % 200),"
            " now() - g * interval '1 millisecond', 'http', '{}'::jsonb"
            " FROM generate_series(1, 50000) g"
        )
        await store.pool.execute("ANALYZE events")
        now = datetime.now(UTC)
        cursor = EventCursor(now - timedelta(seconds=10), 2**40)
        cases = [
            ({"type": "type.7"}, "events_type_received"),
            ({"type": "type.7", "since": now - timedelta(seconds=20)}, "events_type_received"),
            ({"type": "type.7", "after": cursor}, "events_type_received"),
            ({"source": "src/3"}, "events_source_received"),
            ({"source": "src/3", "after": cursor}, "events_source_received"),
            ({}, "events_received_at"),
            ({"since": now - timedelta(seconds=30), "after": cursor}, "events_received_at"),
        ]
        for filters, index in cases:
            args: dict[str, Any] = {"source": None, "type": None, "since": None, "until": None}
            args.update(filters)
            query, values = _search_query(
                args["source"], args["type"], args["since"], args["until"], 50, args.get("after")
            )
            plan = "\n".join(r[0] for r in await store.pool.fetch("EXPLAIN " + query, *values))
            assert f"Index Scan Backward using {index}" in plan, (filters, plan)
            # no sort of what matched (the unfiltered order sorts equal moments by seq, as
            # an incremental sort over events_received_at: a few rows at a time)
            assert not re.search(r"(?m)^\s*(->\s+)?Sort\s+\(", plan), (filters, plan)
