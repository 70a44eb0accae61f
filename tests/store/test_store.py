"""Store lifecycle against a real PostgreSQL: open, ping, event trail, close, bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from eventbus._errors import ConfigError, StoreError
from eventbus.bus._nats_server import free_port as _free_port
from eventbus.store import Attempt, AttemptOutcome, EmbeddedPostgres, Store


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


@pytest.mark.parametrize(
    "settings",
    [{"audit_batch": 0}, {"audit_batch": 10, "audit_buffer": 5}, {"audit_interval": -1.0}],
)
async def test_inconsistent_audit_settings_are_refused(
    database_dsn: str, settings: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError, match="audit settings need"):
        await Store.open(database_dsn, **settings)
