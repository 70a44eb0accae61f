"""What sources keep in Postgres: their checkpoints (``source_checkpoints``) and, read back for
the API, the input that could not become an event (``source_dead_letters``).

Where it sits: a source records its progress only after the events behind it are on the bus
(see ``_base``), through :class:`Checkpoints`; :meth:`SourceContext.dead_letter
<eventbus.sources.SourceContext.dead_letter>` writes the dead letters, :func:`list_dead_letters`
reads them. Tables come from migration ``0003_sources.sql``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import asyncpg
import orjson

from eventbus.store import READ_TIMEOUT, run_db

__all__ = ["Checkpoints", "Lease", "list_dead_letters"]


CHECKPOINT_TIMEOUT = 10.0
"""Seconds a checkpoint's read or write may take, a connection's wait included, plus a second
per ``ROWS_A_SECOND`` rows it writes or deletes (a bucket's first listing of a million objects
is one transaction of ten seconds), and ``READ_ALL_TIMEOUT`` for reading every key: a frozen
PostgreSQL held a source's reading (an s3 poll showed running, its lag standing) until its
lease ran out, and a source without a lease for ever."""
ROWS_A_SECOND = 20_000
READ_ALL_TIMEOUT = 60.0


# PostgreSQL's text holds no NUL, which an S3 object key may: keys are stored with ESC as
# ESC ESC and NUL as ESC "0". (A key stored with ESC before this escaping is read back as
# another key: that one item is reported again, once.)
_ESCAPE = "\x1b"
_UNESCAPED = re.compile("\x1b(.)", re.DOTALL)


def _stored(key: str) -> str:
    if _ESCAPE not in key and "\x00" not in key:
        return key
    return key.replace(_ESCAPE, _ESCAPE * 2).replace("\x00", _ESCAPE + "0")


def _key(stored: str) -> str:
    if _ESCAPE not in stored:
        return stored
    return _UNESCAPED.sub(lambda m: "\x00" if m[1] == "0" else m[1], stored)


def _deadline(rows: int) -> float:
    return CHECKPOINT_TIMEOUT + rows / ROWS_A_SECOND


class Checkpoints:
    """Durable key/value progress of one source (table ``source_checkpoints``).

    Values are anything orjson can serialize. Every method raises StoreError when Postgres
    cannot be reached or rejects the statement.
    """

    def __init__(self, pool: asyncpg.Pool, source: str) -> None:
        self._pool = pool
        self._source = source

    async def get(self, key: str) -> Any | None:
        """Return the stored value for ``key``, or None when nothing was stored."""
        text = await run_db(
            f"reading checkpoint {self._source}/{key!r}",
            self._pool.fetchval(
                "SELECT value::text FROM source_checkpoints WHERE source = $1 AND key = $2",
                self._source,
                _stored(key),
            ),
            deadline=CHECKPOINT_TIMEOUT,
        )
        return None if text is None else orjson.loads(text)

    async def items(self, prefix: str = "") -> dict[str, Any]:
        """Return every stored key starting with ``prefix`` and its value."""
        rows = await run_db(
            f"reading checkpoints of {self._source}",
            self._pool.fetch(
                "SELECT key, value::text AS value FROM source_checkpoints"
                " WHERE source = $1 AND starts_with(key, $2)",
                self._source,
                _stored(prefix),
            ),
            deadline=READ_ALL_TIMEOUT,
        )
        return {_key(row["key"]): orjson.loads(row["value"]) for row in rows}

    async def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (upsert); durable when this returns."""
        await self.put_many({key: value})

    async def put_many(self, values: Mapping[str, Any]) -> None:
        """Store several keys in one transaction: all of them are durable, or none."""
        rows = [(self._source, _stored(k), orjson.dumps(v).decode()) for k, v in values.items()]
        if not rows:
            return

        async def write() -> None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO source_checkpoints (source, key, value, updated_at)"
                    " VALUES ($1, $2, $3::jsonb, now())"
                    " ON CONFLICT (source, key) DO UPDATE"
                    " SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
                    rows,
                )

        what = f"writing checkpoints of {self._source}"
        await run_db(what, write(), deadline=_deadline(len(rows)))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Forget ``keys`` (those of items that are gone)."""
        if not keys:
            return
        await run_db(
            f"deleting checkpoints of {self._source}",
            self._pool.execute(
                "DELETE FROM source_checkpoints WHERE source = $1 AND key = ANY($2::text[])",
                self._source,
                [_stored(k) for k in keys],
            ),
            deadline=_deadline(len(keys)),
        )


class Lease:
    """The lease of one source (table ``source_leases``): the instance holding it runs the
    source; another takes it over once it has run out (its holder died, froze or lost the
    database)."""

    def __init__(self, pool: asyncpg.Pool, source: str, owner: str) -> None:
        self._pool = pool
        self._source = source
        self._owner = owner

    async def take(self, seconds: float, *, deadline: float = READ_TIMEOUT) -> bool:
        """Take the lease for ``seconds`` from now, or renew it: True when this instance holds
        it now. Raises StoreError (StoreUnavailable after ``deadline`` seconds)."""
        holder = await run_db(
            f"taking the lease of source {self._source}",
            self._pool.fetchval(
                "INSERT INTO source_leases (source, owner, expires_at)"
                " VALUES ($1, $2, now() + make_interval(secs => $3))"
                " ON CONFLICT (source) DO UPDATE"
                " SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at"
                " WHERE source_leases.owner = EXCLUDED.owner OR source_leases.expires_at < now()"
                " RETURNING owner",
                self._source,
                self._owner,
                seconds,
            ),
            deadline=deadline,
        )
        return holder is not None

    async def holder(self) -> str | None:
        """The instance holding the lease now, or None. Raises StoreError."""
        return cast(
            "str | None",
            await run_db(
                f"reading the lease of source {self._source}",
                self._pool.fetchval(
                    "SELECT owner FROM source_leases WHERE source = $1 AND expires_at >= now()",
                    self._source,
                ),
                deadline=READ_TIMEOUT,
            ),
        )

    async def release(self, *, deadline: float = READ_TIMEOUT) -> None:
        """Give the lease up (if this instance holds it), so another takes over at once.
        Raises StoreError (StoreUnavailable after ``deadline`` seconds)."""
        await run_db(
            f"releasing the lease of source {self._source}",
            self._pool.execute(
                "DELETE FROM source_leases WHERE source = $1 AND owner = $2",
                self._source,
                self._owner,
            ),
            deadline=deadline,
        )


def _text(payload: bytes, *, cut: bool) -> str | None:
    """``payload`` as UTF-8 text, or None if it is not; a ``cut`` one may end inside a
    character, which is left out."""
    try:
        return payload.decode()
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(payload) - 3 and exc.reason == "unexpected end of data":
            return payload[: exc.start].decode()
        return None


async def list_dead_letters(
    pool: asyncpg.Pool,
    source: str | None = None,
    limit: int = 100,
    payload_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Newest first: ``id, source, received_at, error, meta``, the payload as ``payload``
    (UTF-8 text) or ``payload_base64`` (binary), and its length, ``payload_size``. With
    ``payload_bytes``, only that many of each payload's first bytes are read (a set-aside
    message may be megabytes: a console listing fifty of them read 262 MB every 5 s). Raises
    StoreError on database failure (also after ``READ_TIMEOUT`` seconds), StoreDataError for
    a ``source`` the database refuses, and ValueError for a limit outside 1..1000."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be between 1 and 1000, got {limit}")
    rows = await run_db(
        "listing source dead letters",
        pool.fetch(
            "SELECT id, source, received_at, error, meta::text AS meta,"
            " octet_length(payload) AS size,"
            " CASE WHEN $3::int IS NULL THEN payload ELSE substring(payload FROM 1 FOR $3) END"
            " AS payload"
            " FROM source_dead_letters WHERE ($1::text IS NULL OR source = $1)"
            " ORDER BY id DESC LIMIT $2",
            source,
            limit,
            payload_bytes,
        ),
        deadline=READ_TIMEOUT,
    )
    result = []
    for row in rows:
        item: dict[str, Any] = {
            "id": row["id"],
            "source": row["source"],
            "received_at": row["received_at"].isoformat(),
            "error": row["error"],
            "meta": orjson.loads(row["meta"]),
            "payload_size": row["size"],
        }
        payload: bytes = row["payload"]
        text = _text(payload, cut=len(payload) < row["size"])
        if text is not None:
            item["payload"] = text
        else:
            item["payload_base64"] = base64.b64encode(payload).decode()
        result.append(item)
    return result
