"""The Store: eventbus's one handle on Postgres, opened by the composition root at start-up.

:meth:`Store.open` connects a pool (waiting a bounded time for Postgres to come up), applies the
schema migrations and starts the :class:`~eventbus.store.AuditWriter`. Other components use
``store.pool`` for their own tables (retries, dead letters, checkpoints) and ``store.audit`` to
record what happened; the API reads an event's history back with :meth:`Store.event_trail` and
finds accepted events with :meth:`Store.search_events`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl as ssl_module  # the parameter named ssl is asyncpg's
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import asyncpg

from eventbus._errors import StoreError, error_text
from eventbus.config import redact_url
from eventbus.store._audit import AuditWriter
from eventbus.store._failures import READ_TIMEOUT, run_db
from eventbus.store._jsonb import dumps_jsonb, loads_jsonb
from eventbus.store._migrate import migrate

__all__ = ["EventCursor", "EventTrail", "Store", "cause_of", "set_aside"]

_CLOSE_TIMEOUT = 10.0
_QUERY_TIMEOUT = 10.0

CAUSE_SOURCE, CAUSE_ID = "eventbuscausesource", "eventbuscauseid"
"""Attributes of an event a function answered with (a reply), naming the event it answers:
the dispatcher sets them, the trail follows them both ways."""
CAUSED_LIMIT = 100
"""The replies a trail lists at most."""
TRAIL_LIMIT = 1000
"""The matches, and the attempts, a trail lists at most: the latest (an event accepted again
and again, or retried for days, has had 400,000 attempt rows, 383 MiB to read at once)."""


def cause_of(event: Mapping[str, Any]) -> dict[str, str] | None:
    """``{"source", "id"}`` of the event ``event`` names in its ``CAUSE_SOURCE`` and
    ``CAUSE_ID`` attributes, or None when it does not name one."""
    source, id = event.get(CAUSE_SOURCE), event.get(CAUSE_ID)
    if isinstance(source, str) and isinstance(id, str):
        return {"source": source, "id": id}
    return None


# Postgres errors that mean "not ready yet" (starting up, shutting down, too busy): wait and retry.
_NOT_YET = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_CURSOR = re.compile(r"(-?[0-9]{1,19})-([0-9]{1,19})")
# What a search answers about each event: its attributes as the audit indexed them.
_SUMMARY = "seq, source, id, type, subject, time, received_at, via, size"


@dataclass(frozen=True)
class EventCursor:
    """Where a page of :meth:`Store.search_events` ended: the last event's ``received_at`` and
    its audit row's ``seq`` (events stored by the bus in the same microsecond keep their
    order). ``str()`` is the token the API hands out; :meth:`parse` reads it back."""

    received_at: datetime
    seq: int

    def __str__(self) -> str:
        return f"{(self.received_at - _EPOCH) // _MICROSECOND}-{self.seq}"

    @classmethod
    def parse(cls, token: str) -> EventCursor:
        """The cursor ``token`` (``str()`` of one) stands for; raises ValueError for any other
        text, or for a moment outside years 1-9999 or a ``seq`` beyond 64 bits."""
        match = _CURSOR.fullmatch(token)
        if match is None:
            raise ValueError("not a cursor")
        micros, seq = int(match[1]), int(match[2])
        if seq >= 2**63:
            raise ValueError("seq beyond 64 bits")
        try:
            return cls(_EPOCH + micros * _MICROSECOND, seq)
        except OverflowError:
            raise ValueError("a moment outside years 1-9999") from None


@dataclass(frozen=True)
class EventTrail:
    """What happened to one event: the event as first accepted, its matches and attempts, the
    event it answers (``cause``: a reply's ``eventbuscausesource``/``eventbuscauseid``) and the
    events that answer it (``caused``: its functions' replies).

    ``matches`` items: rule, target, at. ``attempts`` items: rule, target, attempt, outcome,
    status, duration_ms, error, at (a destination's delivery is among them, its rule
    ``orders#on-success``). ``caused`` items: source, id, type, received_at, via, the first
    ``CAUSED_LIMIT``. All in time order; ``at`` values are datetimes. ``truncated``: the
    matches or the attempts are only their latest ``TRAIL_LIMIT``.
    """

    event: dict[str, Any]
    received_at: datetime
    via: str
    matches: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    caused: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    truncated: bool = False

    @property
    def cause(self) -> dict[str, str] | None:
        """``{"source", "id"}`` of the event this one answers, or None (as well for an event
        that carries the attributes but did not come in as a reply)."""
        return cause_of(self.event) if self.via == "reply" else None

    def to_dict(self) -> dict[str, Any]:
        """The trail as JSON-ready values (timestamps as ISO 8601 strings)."""
        return {
            "event": self.event,
            "received_at": self.received_at.isoformat(),
            "via": self.via,
            "matches": [_jsonable(m) for m in self.matches],
            "attempts": [_jsonable(a) for a in self.attempts],
            "cause": self.cause,
            "caused": [_jsonable(c) for c in self.caused],
            "truncated": self.truncated,
        }


class Store:
    """Connection pool, migrated schema and audit writer; close it (or use ``async with``)."""

    def __init__(self, pool: asyncpg.Pool, audit: AuditWriter) -> None:
        self.pool = pool
        self.audit = audit

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        audit_batch: int = 1000,
        audit_interval: float = 0.05,
        audit_buffer: int = 50_000,
        connect_timeout: float = 10.0,
        password: str | None = None,
        ssl: ssl_module.SSLContext | str | None = None,
    ) -> Store:
        """Connect to ``dsn``, migrate the schema and start the audit writer.

        ``password`` replaces the DSN's; ``ssl`` is asyncpg's: an ``sslmode`` name or a context
        (``DatabaseSettings.ssl_option``).

        Waits up to ``connect_timeout`` seconds for Postgres to accept connections. Raises
        StoreError if it does not, if it refuses us (bad credentials, unknown database), if the
        DSN is malformed, or if the schema cannot be migrated (including a database newer than
        this code); ConfigError if the audit settings are inconsistent.
        """
        pool = await _connect(dsn, min_size, max_size, connect_timeout, password, ssl)
        try:
            audit = AuditWriter(
                pool, batch=audit_batch, interval=audit_interval, capacity=audit_buffer
            )
            async with pool.acquire() as conn:
                await migrate(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            await pool.close()
            raise StoreError(f"cannot prepare the schema at {redact_url(dsn)}: {exc}") from exc
        except BaseException:
            await pool.close()
            raise
        audit.start()
        return cls(pool, audit)

    async def ping(self) -> bool:
        """Whether Postgres answers a trivial query now (never raises)."""
        try:
            async with self.pool.acquire(timeout=_QUERY_TIMEOUT) as conn:
                return bool(await conn.fetchval("SELECT true", timeout=_QUERY_TIMEOUT))
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
            TimeoutError,
        ):
            return False

    async def event_trail(self, source: str, id: str) -> EventTrail | None:
        """The audit trail of the event ``(source, id)``, or None if it was never accepted.

        If the event was accepted several times (sent again after the duplicate window) the
        trail shows the first acceptance and every match and attempt of all of them. Raises
        StoreError if Postgres cannot be queried within ``READ_TIMEOUT`` seconds,
        StoreDataError if it refuses the values (a NUL character, say). Only committed rows are
        visible: flush the audit first if needed.
        """
        rows = await run_db(
            f"cannot read the trail of event {id[:200]!r} from {source[:200]!r}",
            self._trail_rows(source, id),
            deadline=READ_TIMEOUT,
        )
        if rows is None:
            return None
        first, matches, attempts, caused = rows
        return EventTrail(
            event=loads_jsonb(first["event"]),
            received_at=first["received_at"],
            via=first["via"],
            matches=[dict(row) for row in matches[-TRAIL_LIMIT:]],
            attempts=[dict(row) for row in attempts[-TRAIL_LIMIT:]],
            caused=[dict(row) for row in caused],
            truncated=len(matches) > TRAIL_LIMIT or len(attempts) > TRAIL_LIMIT,
        )

    async def search_events(
        self,
        *,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        after: EventCursor | None = None,
    ) -> tuple[list[dict[str, Any]], EventCursor | None]:
        """Accepted events, newest first (by ``received_at``, when the bus stored them), at most
        ``limit``: those from ``source``, of ``type``, stored at or after ``since`` and before
        ``until``, older than ``after``. Returns their summaries (``source``, ``id``, ``type``,
        ``subject``, ``time``, ``received_at``, ``via``, ``size``; times as ISO 8601) and the
        cursor of the next page, None when this one is the last.

        An event accepted several times (sent again after the duplicate window) appears once
        per acceptance; a redelivery by the bus (the same ``bus_ref``) or a replay adds none.
        Each filter has an index that yields its rows in this order (migration 0005), so a
        page costs its own rows, however long the trail. Raises as :meth:`event_trail`.
        """
        # one row more than the page: a last page exactly full had a cursor, and the console
        # and the CLI offered a next page that was empty
        query, args = _search_query(source, type, since, until, limit + 1, after)
        rows = await run_db(
            "cannot search the accepted events",
            self.pool.fetch(query, *args),
            deadline=READ_TIMEOUT,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items = [_jsonable({k: v for k, v in row.items() if k != "seq"}) for row in rows]
        last = rows[-1] if more else None
        return items, None if last is None else EventCursor(last["received_at"], last["seq"])

    async def _trail_rows(
        self, source: str, id: str
    ) -> (
        tuple[asyncpg.Record, list[asyncpg.Record], list[asyncpg.Record], list[asyncpg.Record]]
        | None
    ):
        key = (source, id)
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            first = await conn.fetchrow(
                "SELECT event, received_at, via FROM events WHERE source = $1 AND id = $2 "
                "ORDER BY received_at, seq LIMIT 1",
                *key,
            )
            if first is None:
                return None
            # the latest TRAIL_LIMIT (one more: whether there are more), in time order
            matches = await conn.fetch(
                "SELECT rule, target, at FROM (SELECT rule, target, at, seq FROM matches "
                "WHERE source = $1 AND id = $2 ORDER BY at DESC, seq DESC LIMIT $3) AS latest "
                "ORDER BY at, seq",
                *key,
                TRAIL_LIMIT + 1,
            )
            attempts = await conn.fetch(
                "SELECT rule, target, attempt, outcome, status, duration_ms, error, at FROM "
                "(SELECT * FROM attempts WHERE source = $1 AND id = $2 "
                "ORDER BY at DESC, seq DESC LIMIT $3) AS latest ORDER BY at, seq",
                *key,
                TRAIL_LIMIT + 1,
            )
            # served by the partial index of migration 0006 (the same expressions)
            caused = await conn.fetch(
                "SELECT source, id, type, received_at, via FROM events "
                f"WHERE via = 'reply' AND event->>'{CAUSE_SOURCE}' = $1 "
                f"AND event->>'{CAUSE_ID}' = $2 ORDER BY received_at, seq LIMIT {CAUSED_LIMIT}",
                *key,
            )
        return first, matches, attempts, caused

    async def close(self) -> None:
        """Flush the audit buffer (waiting at most 10 s; rows left over are logged as lost) and
        close the pool. Idempotent."""
        await self.audit.close(_CLOSE_TIMEOUT)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.pool.close()
        except TimeoutError:
            self.pool.terminate()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def set_aside(
    pool: asyncpg.Pool,
    source: str,
    payload: bytes,
    error: str,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Keep input that could not become an event, with its error, in ``source_dead_letters``
    (a source's unreadable input; ``source="bus"`` for a bus message that is not a CloudEvent).

    Durable when this returns; raises StoreError when the row could not be written, in which
    case the caller must not skip the input.
    """
    await run_db(
        f"setting aside input of {source}",
        pool.execute(
            "INSERT INTO source_dead_letters (source, payload, error, meta)"
            " VALUES ($1, $2, $3, $4::jsonb)",
            source,
            payload,
            error.replace("\x00", "\\x00"),
            dumps_jsonb(dict(meta or {}), default=str),
            timeout=_QUERY_TIMEOUT,
        ),
    )


async def _connect(
    dsn: str,
    min_size: int,
    max_size: int,
    wait: float,
    password: str | None,
    ssl: ssl_module.SSLContext | str | None,
) -> asyncpg.Pool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.1
    while True:
        remaining = deadline - loop.time()
        try:
            return await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=max(remaining, 0.5),
                password=password,
                ssl=ssl,
            )
        except ssl_module.SSLCertVerificationError as exc:  # a ValueError: not the DSN's fault
            raise StoreError(f"TLS with Postgres at {redact_url(dsn)} failed: {exc}") from exc
        except (asyncpg.ClientConfigurationError, ValueError) as exc:
            # The parser's own words may quote a piece of a password it misread (an unencoded
            # "/" or "@" in it): not shown when the URL holds one.
            masked = redact_url(dsn)
            why = str(exc)
            if masked != dsn:
                why = "it cannot be parsed (percent-encode @ : / ? # in the user and password)"
            raise StoreError(f"invalid Postgres DSN {masked}: {why}") from exc
        except _NOT_YET as exc:
            last: BaseException = exc
        except asyncpg.PostgresError as exc:
            raise StoreError(
                f"Postgres at {redact_url(dsn)} refused the connection: {exc}"
            ) from exc
        if loop.time() + delay > deadline:
            raise StoreError(
                f"Postgres at {redact_url(dsn)} is unreachable (gave up after {wait:g} s): "
                f"{error_text(last)}"
            ) from last
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _search_query(
    source: str | None,
    type: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after: EventCursor | None,
) -> tuple[str, list[Any]]:
    """The statement of :meth:`Store.search_events` and its arguments: only the filters given,
    so each combination is a statement of its own, planned for the index it can use."""
    clauses: list[str] = []
    args: list[Any] = []

    def where(sql: str, *values: Any) -> None:
        first = len(args) + 1
        args.extend(values)
        clauses.append(sql.format(*(f"${first + i}" for i in range(len(values)))))

    if source is not None:
        where("source = {}", source)
    if type is not None:
        where("type = {}", type)
    if since is not None:
        where("received_at >= {}", since)
    if until is not None:
        where("received_at < {}", until)
    if after is not None:
        where("(received_at, seq) < ({}, {})", after.received_at, after.seq)
    args.append(limit)
    query = (
        f"SELECT {_SUMMARY} FROM events WHERE {' AND '.join(clauses) or 'TRUE'}"
        f" ORDER BY received_at DESC, seq DESC LIMIT ${len(args)}"
    )
    return query, args


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
