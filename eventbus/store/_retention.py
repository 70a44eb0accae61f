"""Retention: the tables that only grow (the audit trail, dead letters, sources' dead letters)
pruned by age in the background, as the ``retention`` settings say.

Guarantees:

- An event's trail stays whole while a dead letter or a waiting retry of it exists: its
  ``events``, ``matches`` and ``attempts`` rows are kept past the audit's age until that dead
  letter is replayed, purged or pruned (by ``retention.dead_letters``), so a replay still has
  its history and ``GET /events/trail`` still knows the event.
- One instance prunes at a time (a session-level advisory lock; the others skip that round),
  in batches of :data:`BATCH` rows, one short transaction each, so no prune holds locks or
  bloats the WAL for long, and a stop ends it between two batches.
- A failure (the database down, a statement timed out) is logged and tried again at the next
  round; the service goes on. What was deleted is counted (``eventbus_retention_deleted``)
  and logged once per round.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from eventbus import metrics
from eventbus._tasks import cancel_and_wait
from eventbus.store._failures import DB_FAILURES

__all__ = ["BATCH", "LOCK_KEY", "Pruner", "RetentionPolicy"]

_log = logging.getLogger(__name__)

BATCH = 5000
"""Rows one DELETE removes at most (one transaction)."""

LOCK_KEY = 0x6576_6275_7370_7275
"""The advisory lock (``evbuspru`` in ASCII) the instance pruning holds."""
_STATEMENT_TIMEOUT = 120.0
_FIRST_AFTER = 30.0
"""Seconds from the start to the first round (at most ``every``): a process restarted
more often than ``every`` still prunes."""

# An event's rows are kept while a dead letter or a waiting retry of it exists.
_TRAIL_IN_USE = (
    "NOT EXISTS (SELECT 1 FROM dead_letters d"
    " WHERE d.event_source = t.source AND d.event_id = t.id)"
    " AND NOT EXISTS (SELECT 1 FROM delivery_retries r"
    " WHERE r.event_source = t.source AND r.event_id = t.id)"
)


@dataclass(frozen=True)
class _Table:
    name: str
    key: str
    time: str
    keep: str | None = None  # a condition a row to delete must also meet


_AUDIT = (
    _Table("attempts", "seq", "at", _TRAIL_IN_USE),
    _Table("matches", "seq", "at", _TRAIL_IN_USE),
    _Table("events", "seq", "received_at", _TRAIL_IN_USE),
    _Table("refusals", "seq", "at"),
    _Table("audit_quarantine", "id", "at"),
)
_DEAD_LETTERS = (_Table("dead_letters", "id", "created_at"),)
_SOURCE_DEAD_LETTERS = (_Table("source_dead_letters", "id", "received_at"),)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of row is kept, in seconds (None: for ever), and the seconds
    between two rounds."""

    audit: float | None = 30 * 86400.0
    dead_letters: float | None = None
    source_dead_letters: float | None = 30 * 86400.0
    every: float = 3600.0

    def plan(self) -> list[tuple[_Table, float]]:
        """Each table pruned, with its age: dead letters first, so the trails they kept
        go in the same round."""
        out: list[tuple[_Table, float]] = []
        for tables, age in (
            (_DEAD_LETTERS, self.dead_letters),
            (_SOURCE_DEAD_LETTERS, self.source_dead_letters),
            (_AUDIT, self.audit),
        ):
            if age is not None:
                out.extend((table, age) for table in tables)
        return out

    def describe(self) -> str:
        def age(seconds: float | None) -> str:
            if seconds is None:
                return "kept"
            for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
                if seconds >= size and seconds % size == 0:
                    return f"{seconds / size:g}{unit}"
            return f"{seconds:g}s"

        return (
            f"audit {age(self.audit)}, dead letters {age(self.dead_letters)}, "
            f"source dead letters {age(self.source_dead_letters)}"
        )


class Pruner:
    """Runs :meth:`prune` every ``policy.every`` seconds (the first round sooner) until
    :meth:`stop`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        policy: RetentionPolicy,
        *,
        batch: int = BATCH,
        timeout: float = _STATEMENT_TIMEOUT,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._batch = batch
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None and self._policy.plan():
            self._task = asyncio.create_task(self._run(), name="eventbus-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        wait = min(self._policy.every, _FIRST_AFTER)
        while True:
            await asyncio.sleep(wait)
            wait = self._policy.every
            try:
                deleted = await self.prune()
            except DB_FAILURES as exc:  # (InternalClientError: PostgreSQL killed mid-DELETE)
                _log.warning("retention: pruning failed (tried again in %g s): %r", wait, exc)
                continue
            except Exception:  # a housekeeping loop outlives its rounds, whatever ends one
                _log.exception("retention: pruning failed (tried again in %g s)", wait)
                continue
            if deleted:
                _log.info(
                    "retention: deleted %s",
                    ", ".join(f"{n} {table}" for table, n in deleted.items()),
                )

    async def prune(self) -> dict[str, int] | None:
        """One round: the rows past their age deleted, counted by table (tables with none
        left out); None when another instance is pruning."""
        deleted: dict[str, int] = {}
        conn = await self._pool.acquire(timeout=self._timeout)
        try:
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", LOCK_KEY, timeout=self._timeout
            )
            if not locked:
                return None
            # Not unlocked on the way out of a failure or a cancellation (no statement more
            # on a connection that failed): the pool's reset on release unlocks it, or the
            # session ends with the connection.
            # Each batch planned for its own bounds: a prepared statement's generic plan
            # (from its sixth run on) read, and sorted, all that was left of the old rows for
            # every batch. (RESET ALL, as the pool releases it, undoes this.)
            await conn.execute("SET plan_cache_mode = force_custom_plan", timeout=self._timeout)
            for table, age in self._policy.plan():
                n = await self._prune_table(conn, table, timedelta(seconds=age))
                if n:
                    deleted[table.name] = n
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY, timeout=self._timeout)
        finally:
            # Within the timeout: a statement that timed out is cancelled, and the release
            # waits for that (for ever, the server frozen) unless told how long.
            await self._pool.release(conn, timeout=self._timeout)
        return deleted

    async def _prune_table(self, conn: asyncpg.Connection, table: _Table, age: timedelta) -> int:
        """Delete ``table``'s rows older than ``age`` (and not kept), oldest first, a batch a
        statement. Each statement reads the table by its time index from where the one
        before stopped (``low``, the latest time it deleted), so the rows kept (the trails
        of dead letters) are passed over once a round. Without the order, PostgreSQL read the
        whole table for each batch, by another index or none (a review measured 5 s a
        statement at 2 million rows): past the timeout, a round never got past attempts,
        and matches and events were never pruned."""
        keep = f" AND {table.keep}" if table.keep else ""
        name, key, time = table.name, table.key, table.time
        sql = (
            f"WITH chosen AS (SELECT t.{key}, t.{time} FROM {name} t"
            f" WHERE t.{time} < $1 AND t.{time} >= $2{keep}"
            f" ORDER BY t.{time} LIMIT {self._batch}),"
            f" gone AS (DELETE FROM {name} USING chosen WHERE {name}.{key} = chosen.{key}"
            f" RETURNING chosen.{time} AS at)"
            " SELECT count(*), max(at) FROM gone"
        )
        cutoff = await conn.fetchval("SELECT now() - $1::interval", age, timeout=self._timeout)
        low = datetime.min.replace(tzinfo=UTC)  # before any row
        total = 0
        while True:
            n, last = await conn.fetchrow(sql, cutoff, low, timeout=self._timeout)
            total += int(n)
            metrics.RETENTION_DELETED.labels(table.name).inc(n)
            if n < self._batch:
                return total
            low = last  # (rows at that very time that the batch left are still >= it)
            await asyncio.sleep(0)  # the loop's other work between two batches
