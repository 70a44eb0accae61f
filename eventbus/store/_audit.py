"""The audit writer: the last stop of every event's trip, turning audit facts into Postgres rows.

The router, the API and the sources call :class:`AuditWriter` methods on the hot path; each one
turns its fact into a row tuple and appends it to an in-memory buffer, without I/O. One writer
task drains the buffer in batches with ``COPY`` (``copy_records_to_table``), one transaction per
batch, so a batch lands entirely or not at all.

Guarantees:

- Bounded memory: at most ``capacity`` rows are held (buffered or being written); a producer
  that finds the buffer full waits for room (backpressure), or, given ``within``, at most
  that long (a caller who waits for an answer: a synchronous invocation).
- Nothing buffered is lost while the process lives: when Postgres is unreachable or restarts,
  the writer retries the same batch with capped exponential backoff until it lands.
- One bad row never stops the writer: a batch rejected for its data (SQLSTATE class 22/23, or
  any value the driver cannot encode, whatever it raises) is split in halves until the
  offending rows are isolated; those are set aside in ``audit_quarantine`` with their error,
  logged and counted (:attr:`AuditWriter.quarantined`), and every other row lands. Errors that
  blame the server or the connection are retried instead: they say nothing about the rows.
- Idempotent acceptance: an ``events`` row recorded again under the same bus message
  (``bus_ref``, a redelivery after a crash) is skipped, not duplicated.
- Progress is visible: :meth:`AuditWriter.health` says whether writes are failing and for how
  long, so readiness turns red when the trail cannot be written.
- :meth:`AuditWriter.flush` is a group commit: concurrent callers share the same COPYs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import asyncpg
import orjson

from eventbus import metrics
from eventbus._errors import (
    ConfigError,
    FailureRun,
    StoreError,
    StoreUnavailable,
    truncate_error,
)
from eventbus._rfc3339 import read_time
from eventbus._tasks import cancel_and_wait, wait_event
from eventbus.store._failures import STALLED_AFTER, Outstanding
from eventbus.store._jsonb import dumps_jsonb

__all__ = ["Attempt", "AttemptOutcome", "AuditWriter"]

_log = logging.getLogger(__name__)

_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": (
        "source",
        "id",
        "type",
        "subject",
        "time",
        "received_at",
        "via",
        "event",
        "size",
        "bus_ref",
    ),
    "matches": ("source", "id", "rule", "target", "at"),
    "attempts": (
        "source",
        "id",
        "rule",
        "target",
        "attempt",
        "outcome",
        "status",
        "duration_ms",
        "error",
        "at",
    ),
    "refusals": ("at", "remote", "path", "reason"),
}
_QUARANTINE_CHARS = 64 * 1024
_WRITE_TIMEOUT = 30.0  # seconds for one batch; a hung server is treated like a lost one
_PRUNE_BATCHES_EVERY = 60.0  # seconds between deletions of old audit_batches rows
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0

_Row = tuple[str, tuple[Any, ...]]


class AttemptOutcome(StrEnum):
    """What became of a delivery attempt. Each value is spelled as the ``outcome`` column of
    ``attempts`` stores it and, but for ``REPLAY_REQUESTED`` (no attempt of a target), as the
    ``outcome`` label of the metric ``eventbus_deliveries_total``."""

    DELIVERED = "delivered"
    RETRY_SCHEDULED = "retry-scheduled"
    DEAD_LETTERED = "dead-lettered"
    """Also written for a delivery dead-lettered without a further attempt (its target unknown
    or disabled): ``number`` is then the count of attempts made so far, ``status`` None."""
    REPLAY_REQUESTED = "replay-requested"
    """An operator moved the dead letter back into the retry schedule (attempt number 0)."""
    FAILED = "failed"
    """A synchronous invocation's attempt that did not deliver: its error went back to the
    caller, nothing is retried or dead-lettered."""
    REFUSED = "refused"
    """A synchronous invocation that made no attempt (attempt number 0): the target's circuit
    was open, its concurrency cap full or the target disabled; ``error`` says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One row of ``attempts``: attempt ``number`` (from 1) of delivering ``event`` for
    ``rule`` to ``target``, and what became of it. Only the event's ``source`` and ``id`` are
    recorded; ``status`` is the endpoint's HTTP status, if it answered one."""

    event: Mapping[str, Any]
    rule: str
    target: str
    number: int
    outcome: AttemptOutcome
    status: int | None = None
    duration_ms: float = 0.0
    error: str | None = None


class AuditWriter:
    """Buffers audit rows and writes them to Postgres in COPY batches from one background task.

    Built and started by :meth:`eventbus.store.Store.open`; ``batch`` rows per COPY at most,
    a partial batch waits at most ``interval`` seconds, ``capacity`` rows are held at most.
    The recording methods raise StoreError only once the writer is closed.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        batch: int = 1000,
        interval: float = 0.05,
        capacity: int = 50_000,
    ) -> None:
        if batch < 1 or capacity < batch or interval < 0:
            raise ConfigError(
                f"audit settings need batch >= 1, buffer >= batch and interval >= 0 "
                f"(got batch={batch}, buffer={capacity}, interval={interval})"
            )
        self._pool = pool
        self._batch = batch
        self._interval = interval
        self._capacity = capacity
        self._rows: deque[_Row] = deque()
        self._held = 0  # buffered plus in flight: what the capacity bounds
        self._enqueued = 0  # rows ever accepted; a flush waits for _done to reach this mark
        self._done = 0  # rows committed or dropped, in buffer order
        self._quarantined = 0
        self._failures = FailureRun()  # of the current write
        self._pruned = float("-inf")  # when old audit_batches rows were last deleted
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._urgent = False
        self._closing = False
        self._stopped: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.writes = Outstanding()
        """The batch being written, if any, and since when (``health`` asks ``stalled``)."""

    @property
    def pending(self) -> int:
        """Rows accepted but not yet committed (buffered or being written)."""
        return self._held

    @property
    def quarantined(self) -> int:
        """Rows set aside in ``audit_quarantine`` (or, failing even that, only logged) because
        Postgres rejected their data or the driver could not encode them."""
        return self._quarantined

    def health(
        self, stall_after: float = 5.0, unanswered_after: float = STALLED_AFTER
    ) -> tuple[bool, str]:
        """``(True, "ok")`` while writes land; ``(False, why)`` once writing has been failing
        for ``stall_after`` seconds, a write has gone unanswered for ``unanswered_after``, or
        the writer stopped (readiness reads this)."""
        if self._stopped is not None:
            return False, self._stopped
        stalled = self.writes.stalled(unanswered_after)
        if stalled is not None:
            return False, f"{stalled}, {self._held} rows waiting"
        failing = self._failures.longer_than(stall_after)
        if failing is None:
            return True, "ok"
        return False, (
            f"audit writes failing for {failing:.0f} s, {self._held} rows waiting: "
            f"{self._failures.last}"
        )

    def start(self) -> None:
        """Start the writer task on the running loop; idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")
            self._task.add_done_callback(self._on_exit)

    async def event_accepted(
        self,
        event: dict[str, Any],
        *,
        via: str,
        received_at: datetime | None = None,
        ref: str | None = None,
        size: int | None = None,
        within: float | None = None,
    ) -> None:
        """Record that ``event`` was accepted (``via``: http, kafka, source:<name>, reply, ...).

        ``received_at`` defaults to now; ``ref`` names the bus message the event came in, so a
        redelivery of it is recorded once. Missing or odd attributes are stored as NULL or
        text; ``size`` defaults to the length of the event's JSON form. With ``within``, a full
        buffer is waited on that many seconds at most, then StoreUnavailable is raised.
        """
        try:
            body = dumps_jsonb(event, default=str)
        except (orjson.JSONEncodeError, TypeError) as exc:
            await self._quarantine("events", (via, ref, repr(event)), exc)
            return
        attrs = _attributes(event)
        await self._put(
            "events",
            (
                _text(attrs.get("source")),
                _text(attrs.get("id")),
                _text(attrs.get("type")),
                _text(attrs.get("subject")),
                _time(attrs.get("time")),
                received_at or datetime.now(UTC),
                via,
                body,
                len(body) if size is None else size,
                ref,
            ),
            within,
        )

    async def rule_matched(
        self, event: dict[str, Any], rule: str, target: str, *, within: float | None = None
    ) -> None:
        """Record that ``rule`` matched ``event`` and routes it to ``target`` (``within`` as
        for :meth:`event_accepted`)."""
        attrs = _attributes(event)
        await self._put(
            "matches",
            (_text(attrs.get("source")), _text(attrs.get("id")), rule, target, datetime.now(UTC)),
            within,
        )

    async def attempt(self, record: Attempt, *, within: float | None = None) -> None:
        """Record one delivery attempt and its outcome; the error text is cut to
        ``MAX_ERROR_CHARS`` (``within`` as for :meth:`event_accepted`)."""
        await self._put("attempts", _attempt_row(record), within)

    def attempt_nowait(self, record: Attempt) -> bool:
        """:meth:`attempt` for a task that is ending (cancelled): never waits, so with the
        buffer full, or the writer closing, the row is not recorded and False is returned."""
        return self._offer("attempts", _attempt_row(record))

    def refused(self, *, remote: str | None, path: str, reason: str) -> bool:
        """Record a refused request (for example a missing or invalid API key).

        Never waits: a refusal must not hold up the refusing of the next one, so with the
        buffer full the row is not recorded and False is returned."""
        return self._offer("refusals", (datetime.now(UTC), remote, path, reason))

    async def flush(self, *, urgent: bool = True) -> None:
        """Return once every row recorded before this call is committed (or set aside as bad).

        ``urgent`` writes a partial batch at once; otherwise the rows go with the writer's
        next batch (within ``interval``), which keeps batches large when many callers wait
        (the router, before acknowledging each bus message). Waits as long as Postgres is
        unreachable: bound it with your own timeout. Raises StoreError if the writer is closed
        before those rows are written.
        """
        target = self._enqueued
        if self._done >= target:
            return
        if self._stopped is not None:
            raise StoreError(self._stopped)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        if urgent:
            self._urgent = True
            self._wake.set()
        await waiter

    async def close(self, grace: float = 10.0) -> None:
        """Write out everything buffered, waiting at most ``grace`` seconds, then stop.

        Rows still unwritten after that are lost; their count is logged and pending
        :meth:`flush` calls raise StoreError. Idempotent.
        """
        self._closing = True
        self._wake.set()
        self._space.set()
        task = self._task
        if task is None or task.done():
            self._stop("the audit writer is closed")
            return
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(task)
        except TimeoutError:
            await cancel_and_wait(task)
            _log.error("audit: closed with %d rows still unwritten after %gs", self._held, grace)
        finally:
            # also when this close is cancelled: pending flushes must not wait for ever
            self._stop("the audit writer closed before these rows were written")

    async def _put(self, table: str, record: tuple[Any, ...], within: float | None = None) -> None:
        if self._held >= self._capacity and not self._closing:
            try:
                async with asyncio.timeout(within):
                    while self._held >= self._capacity and not self._closing:
                        self._space.clear()
                        await self._space.wait()
            except TimeoutError:
                raise StoreUnavailable(
                    f"the audit trail is full: {self._held} rows wait for PostgreSQL"
                ) from None
        if self._closing:
            raise StoreError("the audit writer is closed")
        self._append(table, record)

    def _offer(self, table: str, record: tuple[Any, ...]) -> bool:
        """Buffer ``record`` if there is room and the writer is open, without waiting; whether
        it was."""
        if self._held >= self._capacity or self._closing:
            return False
        self._append(table, record)
        return True

    def _append(self, table: str, record: tuple[Any, ...]) -> None:
        self._rows.append((table, record))
        self._held += 1
        self._enqueued += 1
        if len(self._rows) == 1 or len(self._rows) >= self._batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self._rows:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._rows) < self._batch and not (self._urgent or self._closing):
                # Wait for a fuller batch: up to `interval` of latency buys far fewer COPYs.
                self._wake.clear()
                await wait_event(self._wake, self._interval)
            count = min(len(self._rows), self._batch)
            rows = [self._rows.popleft() for _ in range(count)]
            if not self._rows:
                self._urgent = False
            await self._write(rows)
            self._held -= count
            metrics.AUDIT_PENDING.set(self._held)
            self._done += count
            self._space.set()
            while self._waiters and self._waiters[0][0] <= self._done:
                _, waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    async def _write(self, rows: list[_Row], *, skip_known: bool = False) -> None:
        delay = _BACKOFF_FIRST
        batch = uuid.uuid4()  # recorded with the rows: a retry finds a commit that landed
        unsure = False  # a try failed in a way its commit may have landed anyway
        while True:
            try:
                with self.writes.write(f"writing {len(rows)} audit rows"):
                    if unsure and await self._landed(batch):
                        self._progress()
                        return
                    await self._copy(rows, batch, skip_known=skip_known)
            except Exception as exc:
                if _already_recorded(exc) and not skip_known:
                    # A redelivered event's acceptance is in already: write this batch again,
                    # skipping such rows (the rare slow path; COPY cannot skip conflicts).
                    skip_known = True
                    continue
                if _bad_data(exc):
                    self._progress()
                    await self._isolate(rows, exc, skip_known)
                    return
                self._failed(exc)
                metrics.AUDIT_PENDING.set(self._held)  # growing while the writes fail
                unsure = True
                _log.warning("audit: writing %d rows failed, retrying: %r", len(rows), exc)
            else:
                self._progress()
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _isolate(self, rows: list[_Row], exc: Exception, skip_known: bool) -> None:
        if len(rows) == 1:
            table, record = rows[0]
            await self._quarantine(table, record, exc)
            return
        # Bisect: each half is its own transaction, so good rows land and bad ones surface.
        middle = len(rows) // 2
        await self._write(rows[:middle], skip_known=skip_known)
        await self._write(rows[middle:], skip_known=skip_known)

    async def _quarantine(self, table: str, record: tuple[Any, ...], exc: BaseException) -> None:
        """Set one unwritable row aside with its error, retrying while Postgres is away."""
        self._quarantined += 1
        metrics.AUDIT_QUARANTINED.labels(table).inc()
        # ascii(): whatever made the row unwritable (a NUL, an unpaired surrogate, a date out of
        # range) becomes plain escapes that a text column always holds.
        text = ascii(record)[:_QUARANTINE_CHARS]
        error = truncate_error(ascii(exc))
        _log.error("audit: %s row rejected, set aside in audit_quarantine: %s", table, error)
        delay = _BACKOFF_FIRST
        while True:
            try:
                async with self._pool.acquire(timeout=_WRITE_TIMEOUT) as conn:
                    await conn.execute(
                        "INSERT INTO audit_quarantine (table_name, record, error)"
                        " VALUES ($1, $2, $3)",
                        table,
                        text,
                        error,
                        timeout=_WRITE_TIMEOUT,
                    )
                return
            except Exception as retry_exc:
                if _bad_data(retry_exc):
                    _log.error("audit: quarantine refused the row too, lost: %.2000s", text)
                    return
                self._failed(retry_exc)
                _log.warning("audit: quarantining a row failed, retrying: %r", retry_exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _landed(self, batch: uuid.UUID) -> bool:
        """Whether ``batch`` was committed (by a try whose answer was lost with the
        connection: written again, its matches and attempts were in twice)."""
        async with self._pool.acquire(timeout=_WRITE_TIMEOUT) as conn:
            found = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM audit_batches WHERE id = $1)",
                batch,
                timeout=_WRITE_TIMEOUT,
            )
        return bool(found)

    async def _copy(self, rows: list[_Row], batch: uuid.UUID, *, skip_known: bool) -> None:
        by_table: dict[str, list[tuple[Any, ...]]] = {}
        for table, record in rows:
            by_table.setdefault(table, []).append(record)
        now = asyncio.get_running_loop().time()
        prune = now - self._pruned >= _PRUNE_BATCHES_EVERY
        async with self._pool.acquire(timeout=_WRITE_TIMEOUT) as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO audit_batches (id) VALUES ($1)", batch, timeout=_WRITE_TIMEOUT
            )
            if prune:  # a batch's id is needed only while it may be retried
                await conn.execute(
                    "DELETE FROM audit_batches WHERE written_at < now() - interval '1 hour'",
                    timeout=_WRITE_TIMEOUT,
                )
            for table, records in by_table.items():
                if table == "events" and skip_known:
                    await _insert_new_events(conn, records)
                    continue
                await conn.copy_records_to_table(
                    table, records=records, columns=_COLUMNS[table], timeout=_WRITE_TIMEOUT
                )
        if prune:
            self._pruned = now

    def _progress(self) -> None:
        self._failures.ended()

    def _failed(self, exc: BaseException) -> None:
        self._failures.failed(exc)

    def _stop(self, reason: str) -> None:
        self._stopped = reason
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(StoreError(reason))

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _log.error("audit: writer task failed", exc_info=task.exception())
            self._closing = True
            self._space.set()
            self._stop(f"the audit writer failed: {task.exception()!r}")


# What a failed write may blame other than its rows: the connection, the server's state.
_NOT_THE_ROWS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    # "cannot switch to state ...": the connection broke mid-protocol (PostgreSQL killed
    # during a COMMIT), not a value of the rows
    asyncpg.InternalClientError,
)


def _bad_data(exc: Exception) -> bool:
    """Whether ``exc`` blames the rows themselves rather than the connection or the server.

    A server error blames the rows only in SQLSTATE classes 22 (data exception) and 23
    (integrity), and 54000 (a row over a limit: an index entry too long); any other server
    error (a missing table, no permission, a full disk) is the server's state, retried until
    it changes. An error raised on our side of the wire is the driver failing to encode a value
    (asyncpg raises what the encoder raises: ValueError, TypeError, OverflowError,
    UnicodeEncodeError ...) unless it is a connection error.
    """
    if isinstance(exc, asyncpg.PostgresError):
        # 54000: a value too long for an index entry (about 2.7 KB), a limit of the row too
        return str(exc.sqlstate)[:2] in {"22", "23"} or exc.sqlstate == "54000"
    if isinstance(exc, asyncpg.DataError):  # an InterfaceError raised for a value
        return True
    return not isinstance(exc, _NOT_THE_ROWS)


def _already_recorded(exc: Exception) -> bool:
    return (
        isinstance(exc, asyncpg.UniqueViolationError)
        and getattr(exc, "constraint_name", None) == "events_bus_ref"
    )


async def _insert_new_events(conn: asyncpg.Connection, records: list[tuple[Any, ...]]) -> None:
    """Insert ``events`` rows whose bus message is not recorded yet: COPY into a scratch table,
    then one INSERT that skips conflicts on ``bus_ref``."""
    columns = ", ".join(_COLUMNS["events"])
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS events_incoming ON COMMIT DELETE ROWS AS"
        f" SELECT {columns} FROM events WITH NO DATA"
    )
    await conn.copy_records_to_table(
        "events_incoming", records=records, columns=_COLUMNS["events"], timeout=_WRITE_TIMEOUT
    )
    await conn.execute(
        f"INSERT INTO events ({columns}) SELECT {columns} FROM events_incoming"
        " ON CONFLICT (bus_ref) DO NOTHING",
        timeout=_WRITE_TIMEOUT,
    )


def _attempt_row(record: Attempt) -> tuple[Any, ...]:
    attrs = _attributes(record.event)
    return (
        _text(attrs.get("source")),
        _text(attrs.get("id")),
        record.rule,
        record.target,
        record.number,
        record.outcome.value,
        record.status,
        record.duration_ms,
        None if record.error is None else truncate_error(record.error),
        datetime.now(UTC),
    )


def _attributes(event: object) -> dict[str, Any]:
    return event if isinstance(event, dict) else {}


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = read_time(value)  # as validation read it: leap second, lower-case t/z
        # RFC 3339 requires an offset; one without is read as UTC rather than thrown away.
        # Normalising here also turns a moment outside datetime's range into a NULL.
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None
