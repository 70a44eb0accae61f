"""Postgres persistence of delivery state: the durable retry schedule and the dead letters.

Where it sits: the dispatcher writes here whenever an attempt does not end delivered, and
awaits the write before the bus message is acknowledged (guarantee 2); the retry worker claims
due rows here; the API and CLI list, replay and purge dead letters here. Tables come from
migration ``0002_delivery.sql``.

Claiming uses ``FOR UPDATE SKIP LOCKED`` plus a lease (``locked_until``): several instances share
the due rows without sending one twice, and rows claimed by an instance that died become due
again when its lease runs out.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psutil

from eventbus._errors import SelectionChanged
from eventbus.delivery._model import DeadLetterReason, Delivery, DeliveryKind, split_stored_rule
from eventbus.store import (
    READ_TIMEOUT,
    AttemptOutcome,
    Outstanding,
    dumps_jsonb,
    loads_jsonb,
    run_db,
)

__all__ = [
    "REPLAY_BATCH",
    "UNKNOWN_TARGET_GRACE",
    "DeadLetterCount",
    "DeadLetterFilter",
    "DeliveryStore",
]

REPLAY_BATCH = 1000  # dead letters moved back into the retry schedule by one statement

UNKNOWN_TARGET_GRACE = 300.0
"""Seconds a due retry for a target this process does not have waits for an instance that has
it, before this one claims it (and dead-letters it as ``unknown-target``)."""


def _columns(d: Delivery) -> tuple[Any, ...]:
    """Values of the columns both tables share, in ``_SHARED`` order: keyed by the event
    whose trail the delivery is in (``Delivery.trail_event``)."""
    key = d.trail_event
    return (
        str(key.get("source", "")),
        str(key.get("id", "")),
        _json(d.event),
        d.stored_rule,
        d.target,
        _json({"v": d.payload}),
        d.is_cloudevent,
        None if d.override is None else _json(d.override),
        d.attempts,
        _json(d.history),
    )


_SHARED = (
    "event_source, event_id, event, rule, target, payload, is_cloudevent, delivery, attempts,"
    " history"
)
_SHARED_VALUES = "$1, $2, $3::jsonb, $4, $5, $6::jsonb, $7, $8::jsonb, $9, $10::jsonb"
# An insert made again finds the row its first try wrote (migration 0008).
_FOUND_BY_KEY = " ON CONFLICT (write_key) DO UPDATE SET write_key = EXCLUDED.write_key RETURNING id"


def _unless_ended(key: str) -> str:
    """A first write of a chain (a retry row, or a dead letter with no row before it) is not
    made when a chain under its write key (the parameter ``key``) ended already: see
    ``schedule`` and migration 0012."""
    return f" WHERE NOT EXISTS (SELECT 1 FROM delivery_ends WHERE write_key = {key})"


# Delete retry row $1 if claim $2 still holds it, keeping the end of its chain; how many went.
_END_ROW = (
    "WITH gone AS (DELETE FROM delivery_retries"
    " WHERE id = $1 AND locked_by IS NOT DISTINCT FROM $2 RETURNING write_key),"
    " ended AS (INSERT INTO delivery_ends (write_key) SELECT write_key FROM gone"
    " WHERE write_key IS NOT NULL ON CONFLICT (write_key) DO NOTHING)"
    " SELECT count(*) FROM gone"
)
ENDS_KEPT = 86_400.0
"""Seconds the end of a chain is kept (``delivery_ends``): far past any bus's ack wait and
redelivery backoff."""


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters a list, replay or purge applies to; every field is optional."""

    ids: Sequence[int] = field(default_factory=tuple)
    rule: str | None = None
    target: str | None = None
    status: int | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    source: str | None = None
    through: int | None = None
    """Only ids up to this one: the newest a count found (``last_id``), so that a replay or
    purge confirmed by that count leaves out those dead-lettered since."""

    def where(self, first_param: int = 1) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []

        def add(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.format(f"${first_param + len(args) - 1}"))

        if self.ids:
            add("id = ANY({}::bigint[])", list(self.ids))
        if self.rule is not None:
            add("rule = {}", self.rule)
        if self.target is not None:
            add("target = {}", self.target)
        if self.status is not None:
            add("last_status = {}", self.status)
        if self.reason is not None:
            add("reason = {}", self.reason)
        if self.since is not None:
            add("created_at >= {}", self.since)
        if self.until is not None:
            add("created_at < {}", self.until)
        if self.source is not None:
            add("event_source = {}", self.source)
        if self.through is not None:
            add("id <= {}", self.through)
        return (" AND ".join(clauses) or "TRUE"), args


@dataclass(frozen=True)
class DeadLetterCount:
    """What a filter selects now: how many, the newest's time and the highest id (None: none);
    a replay or purge given ``through=last_id`` and ``expect=count`` acts on exactly these."""

    count: int
    newest: datetime | None
    last_id: int | None


_json = dumps_jsonb
_load = loads_jsonb


_COLUMNS = (
    "id, event, rule, target, payload, is_cloudevent, delivery, attempts, first_attempt_at,"
    " history, locked_by, replay_count"
)


def _pending(row: asyncpg.Record) -> Delivery:
    rule, kind = split_stored_rule(row["rule"])
    return Delivery(
        event=_load(row["event"]),
        rule=rule,
        kind=kind,
        target=row["target"],
        payload=_load(row["payload"])["v"],
        is_cloudevent=row["is_cloudevent"],
        override=_load(row["delivery"]) if row["delivery"] is not None else None,
        attempts=row["attempts"],
        first_attempt_at=row["first_attempt_at"],
        history=_load(row["history"]),
        pending_id=row["id"],
        claim=row["locked_by"],
        replay_count=row["replay_count"],
    )


_WRITE_KEYS = uuid.UUID("6f1d2a8e-5b7c-4c1e-9a43-0e8b2f6d7c15")
"""The namespace of the write keys (``uuid5``)."""


def _write_key(d: Delivery) -> uuid.UUID:
    """``d``'s write key: the same on every write of it made again.

    A rule's delivery taken from the bus (``kind`` route, no schedule row yet) has the same
    key in whichever process makes it: its event's ``source`` and ``id``, the rule, the target
    and the bus message it came from (``acceptance``) name it (a rule lists a target once). A
    random key made per process let a retry row committed as its process died (PostgreSQL
    frozen, the commit in its socket) and the chain the bus's redelivery of that message began
    both run: twice the attempts, and two dead letters for one event. Without the bus message,
    an event accepted a second time (past the bus's duplicate window: two messages) found the
    first acceptance's row, and its own delivery had no retry and no dead letter.

    Any other write keeps a random key, made on its first call: a follow-up (the copies of two
    targets' dead letters to one ``dead_letter_target`` carry the same event, rule and target,
    and one key for both lost the second copy), and the dead letter of a row from the schedule
    (its transaction deletes that row: made again, it finds none and writes nothing)."""
    if d.write_key is None:
        if d.kind is not DeliveryKind.ROUTE or d.pending_id is not None:
            d.write_key = uuid.uuid4()
            return d.write_key
        name = "\x00".join(
            (
                str(d.event.get("source")),
                str(d.event.get("id")),
                d.rule,
                d.target,
                str(d.replay_count),
                d.acceptance or "",
            )
        )
        d.write_key = uuid.uuid5(_WRITE_KEYS, name)
    return d.write_key


def _dead_letter(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    out.pop("write_key", None)  # the store's own (migration 0008), not the dead letter's
    for key in ("event", "history", "delivery"):
        if out.get(key) is not None:
            out[key] = _load(out[key])
    if "payload" in out:
        out["payload"] = _load(out["payload"])["v"]
    for key in ("created_at", "first_attempt_at"):
        if isinstance(out.get(key), datetime):
            out[key] = out[key].isoformat()
    return out


class DeliveryStore:
    """Every method raises StoreUnavailable (a StoreError) when Postgres cannot be reached right
    now, StoreDataError (a StoreError) when it refuses a value given (a filter, say), and
    StoreError for any other refusal. The reads the
    API serves give up after ``READ_TIMEOUT`` seconds."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.writes = Outstanding()
        """The statements deliveries and the retry worker wait on, still awaited (readiness
        asks ``stalled``)."""

    async def _run(
        self, what: str, coro: Any, *, deadline: float | None = None, watched: bool = False
    ) -> Any:
        """``run_db``; a ``watched`` statement (one a delivery or the retry worker waits on) is
        counted in ``writes`` while it runs. Not the operator's bulk ones (a purge of millions
        of dead letters may take minutes, and is no reason to take the instance out of
        service)."""
        if not watched:
            return await run_db(what, coro, deadline=deadline)
        with self.writes.write(what):
            return await run_db(what, coro, deadline=deadline)

    async def schedule(
        self, d: Delivery, *, due_in: float, waiting_for: str = "retry"
    ) -> int | None:
        """Insert ``d`` into the schedule, due in ``due_in`` seconds; durable when this returns.
        Made again after a failure (its commit may have landed), it finds the row it wrote by
        ``d.write_key`` (set on the first call) instead of writing a second one. None, with
        nothing written, when a chain under that key ended already (``delivery_ends``: the
        bus delivered its message again after the chain its first delivery began was over)."""
        found = await self._run(
            "scheduling a retry",
            self._pool.fetchval(
                f"INSERT INTO delivery_retries ({_SHARED}, due_at, waiting_for,"
                f" first_attempt_at, write_key) SELECT {_SHARED_VALUES},"
                " now() + make_interval(secs => $11), $12, coalesce($13, now()), $14"
                + _unless_ended("$14")
                + _FOUND_BY_KEY,
                *_columns(d),
                due_in,
                waiting_for,
                d.first_attempt_at,
                _write_key(d),
            ),
            watched=True,
        )
        return None if found is None else int(found)

    async def claim_due(
        self,
        *,
        limit: int,
        lease: float,
        instance: str,
        skip: Sequence[str] = (),
        known: Sequence[str] | None = None,
        orphan_after: float = UNKNOWN_TARGET_GRACE,
    ) -> list[Delivery]:
        """Claim up to ``limit`` due rows for ``lease`` seconds, none for the targets in
        ``skip``; others skip them meanwhile. With ``known`` (the targets this process has),
        a row for another target is claimed only once it has been due ``orphan_after`` seconds
        unclaimed: the instance that has that target (a rolling deploy adding one) takes it
        first, and a row no instance can send is still dead-lettered in the end."""
        rows = await self._run(
            "claiming due retries",
            self._pool.fetch(
                f"UPDATE delivery_retries SET locked_by = $3 || '/' || gen_random_uuid(),"
                # clock_timestamp(), not now() (the statement's start): a claim that waited
                # (a lock, a server frozen) wrote a lease already run out, which another
                # claimer took again at once, and both attempted the row
                f" locked_until = clock_timestamp() + make_interval(secs => $2)"
                f" WHERE id IN (SELECT id FROM delivery_retries"
                f"   WHERE due_at <= now() AND (locked_until IS NULL OR locked_until < now())"
                f"   AND target <> ALL($4::text[])"
                f"   AND ($5::text[] IS NULL OR target = ANY($5::text[])"
                f"     OR due_at <= now() - make_interval(secs => $6))"
                f"   ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_COLUMNS}",
                limit,
                lease,
                instance,
                list(skip),
                None if known is None else list(known),
                orphan_after,
            ),
            watched=True,
        )
        return [_pending(r) for r in rows]

    async def extend(self, claims: Mapping[int, str], *, lease: float) -> None:
        """Extend to ``lease`` seconds from now the lease of each row (id: claim) still held
        under its claim: rows waiting for their target's slot, or slow to answer, are not
        claimed again (and attempted twice) while their first claim still runs."""
        await self._run(
            "extending retry leases",
            self._pool.execute(
                "UPDATE delivery_retries r"
                " SET locked_until = clock_timestamp() + make_interval(secs => $3)"
                " FROM unnest($1::bigint[], $2::text[]) AS c(id, claim)"
                " WHERE r.id = c.id AND r.locked_by = c.claim",
                list(claims),
                list(claims.values()),
                lease,
            ),
            watched=True,
        )

    async def take_back(self, here: str) -> dict[int, int]:
        """Give back, due as they were, the rows held by claimers named ``here<pid>|...`` (a
        process of this installation on this host) whose process no longer runs (SIGKILL,
        OOM): they waited for their lease, twice the slowest target's timeout plus 10 s,
        before anyone tried them again. One whose pid runs (another worker, this process, or
        a pid taken again) is left alone. Returns the rows given back by pid."""
        rows = await self._run(
            "listing retry claimers",
            self._pool.fetch(
                "SELECT DISTINCT split_part(locked_by, '/', 1) AS claimer FROM delivery_retries"
                " WHERE starts_with(locked_by, $1) AND locked_until > now()",
                here,
            ),
            watched=True,
        )
        given: dict[int, int] = {}
        for row in rows:
            claimer: str = row["claimer"]
            pid = claimer[len(here) :].split("|", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or psutil.pid_exists(int(pid)):
                continue
            released = await self._run(
                "giving back a claimer's retries",
                self._pool.fetch(
                    "UPDATE delivery_retries SET locked_by = NULL, locked_until = NULL"
                    " WHERE split_part(locked_by, '/', 1) = $1 RETURNING id",
                    claimer,
                ),
                watched=True,
            )
            given[int(pid)] = len(released)
        return given

    async def release(self, claimed: Sequence[Delivery]) -> None:
        """Give back rows claimed but not attempted, due as they were, for any claimer."""
        await self._run(
            "giving back claimed retries",
            self._pool.execute(
                "UPDATE delivery_retries r SET locked_by = NULL, locked_until = NULL"
                " FROM unnest($1::bigint[], $2::text[]) AS c(id, claim)"
                " WHERE r.id = c.id AND r.locked_by = c.claim",
                [d.pending_id for d in claimed],
                [d.claim for d in claimed],
            ),
            watched=True,
        )

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest unclaimed row that is not yet due becomes due, by the
        database's clock (the one ``due_at`` is written and claimed by); None if none."""
        value = await self._run(
            "reading the retry schedule",
            self._pool.fetchval(
                "SELECT extract(epoch FROM due_at - now()) FROM delivery_retries"
                " WHERE due_at > now() AND locked_until IS NULL ORDER BY due_at LIMIT 1"
            ),
            watched=True,
        )
        return None if value is None else float(value)

    async def circuit_closed(self, target: str) -> int:
        """Make the deliveries parked behind ``target``'s circuit due now (the circuit closed
        again); returns how many. Those a worker holds are left to it."""
        status = await self._run(
            "releasing the deliveries parked behind a circuit",
            self._pool.execute(
                "UPDATE delivery_retries SET due_at = now()"
                " WHERE target = $1 AND waiting_for = 'circuit' AND due_at > now()"
                " AND locked_until IS NULL",
                target,
            ),
            deadline=READ_TIMEOUT,  # a saving only: they come due on their own otherwise
            watched=True,
        )
        return int(str(status).rsplit(" ", 1)[-1])

    async def reschedule(self, d: Delivery, *, due_in: float, waiting_for: str = "retry") -> bool:
        """Set the row's next due time and history and release it; False (nothing written)
        when the row is no longer ``d``'s: its lease ran out and another claim took it."""
        status = await self._run(
            "rescheduling a retry",
            self._pool.execute(
                "UPDATE delivery_retries SET due_at = now() + make_interval(secs => $2),"
                " attempts = $3, history = $4::jsonb, waiting_for = $5,"
                " locked_by = NULL, locked_until = NULL"
                " WHERE id = $1 AND locked_by IS NOT DISTINCT FROM $6",
                d.pending_id,
                due_in,
                d.attempts,
                _json(d.history),
                waiting_for,
                d.claim,
            ),
            watched=True,
        )
        return str(status) != "UPDATE 0"

    async def complete(self, d: Delivery) -> bool:
        """Drop the row of a delivered ``d`` (its chain's end kept, see ``delivery_ends``);
        False when the row is no longer ``d``'s."""
        gone = await self._run(
            "completing a retry",
            self._pool.fetchval(_END_ROW, d.pending_id, d.claim),
            watched=True,
        )
        return bool(gone)

    async def dead_letter(
        self,
        d: Delivery,
        *,
        last_status: int | None,
        final_error: str | None,
        reason: DeadLetterReason,
    ) -> int | None:
        """Store ``d`` as a dead letter and drop its schedule row, in one transaction; None
        (nothing written) when the row is no longer ``d``'s."""

        key = _write_key(d)  # (a retry row's DELETE makes its dead letter happen once anyway)

        async def tx() -> int | None:
            async with self._pool.acquire() as conn, conn.transaction():
                if d.pending_id is not None:
                    mine = await conn.fetchval(_END_ROW, d.pending_id, d.claim)
                    if not mine:
                        return None
                dl_id = await conn.fetchval(
                    f"INSERT INTO dead_letters ({_SHARED}, event_type, last_status, final_error,"
                    f" reason, first_attempt_at, replay_count, write_key) SELECT"
                    f" {_SHARED_VALUES}, $11, $12, $13, $14, coalesce($15, now()), $16, $17"
                    + _unless_ended("$17")
                    + _FOUND_BY_KEY,
                    *_columns(d),
                    d.event.get("type"),
                    last_status,
                    final_error,
                    reason.value,
                    d.first_attempt_at,
                    d.replay_count,
                    key,
                )
                return None if dl_id is None else int(dl_id)

        result: int | None = await self._run("storing a dead letter", tx(), watched=True)
        return result

    async def prune_ends(self) -> int:
        """Forget the chain ends older than ``ENDS_KEPT``; how many went."""
        status = await self._run(
            "forgetting ended retry chains",
            self._pool.execute(
                "DELETE FROM delivery_ends WHERE ended_at < now() - make_interval(secs => $1)",
                ENDS_KEPT,
            ),
            deadline=READ_TIMEOUT,
        )
        return int(str(status).split()[-1])

    async def backlog(self) -> int:
        return int(
            await self._run(
                "counting retries",
                self._pool.fetchval("SELECT count(*) FROM delivery_retries"),
                deadline=READ_TIMEOUT,
            )
        )

    async def list_retries(
        self,
        *,
        limit: int = 100,
        event: tuple[str, str] | None = None,
        target: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """The pending retries (of the ``(source, id)`` event, and of ``target``, only, when
        given: indexes of migrations 0002 and 0006 find them), the next due first (claimed
        ones too: their attempt is under way), at most ``limit`` of them, and how many are
        pending in all (of those). Each names the last attempt's status and error; ``rule``
        as rows name it (``orders#dead-letter`` for a follow-up)."""
        args: list[Any] = [*(event or ())]
        conditions = [] if event is None else ["event_source = $2", "event_id = $3"]
        if target is not None:
            args.append(target)
            conditions.append(f"target = ${len(args) + 1}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._run(
            "listing retries",
            self._pool.fetch(
                "SELECT id, event_source, event_id, rule, target, attempts, due_at, waiting_for,"
                " first_attempt_at, locked_until IS NOT NULL AND locked_until > now() AS claimed,"
                " (history->-1->>'status')::int AS last_status,"
                " history->-1->>'error' AS last_error, count(*) OVER () AS total"
                f" FROM delivery_retries{where} ORDER BY due_at, id LIMIT $1",
                limit,
                *args,
            ),
            deadline=READ_TIMEOUT,
        )
        total = int(rows[0]["total"]) if rows else 0
        items = []
        for row in rows:
            item = dict(row)
            del item["total"]
            for key in ("due_at", "first_attempt_at"):
                item[key] = item[key].isoformat()
            items.append(item)
        return items, total

    async def list_dead_letters(
        self, flt: DeadLetterFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; page with ``after_id`` = the last id of the previous page."""
        where, args = flt.where()
        if after_id is not None:
            args.append(after_id)
            where += f" AND id < ${len(args)}"
        args.append(limit)
        rows = await self._run(
            "listing dead letters",
            self._pool.fetch(
                "SELECT id, created_at, event_source, event_id, event_type, rule, target,"
                " attempts, last_status, final_error, reason, replay_count, first_attempt_at"
                f" FROM dead_letters WHERE {where} ORDER BY id DESC LIMIT ${len(args)}",
                *args,
            ),
            deadline=READ_TIMEOUT,
        )
        return [_dead_letter(r) for r in rows]

    async def count_dead_letters(self, flt: DeadLetterFilter) -> DeadLetterCount:
        """How many dead letters ``flt`` selects, when the newest of them was written and the
        highest id among them."""
        where, args = flt.where()
        row = await self._run(
            "counting dead letters",
            self._pool.fetchrow(
                "SELECT count(*) AS n, max(created_at) AS newest, max(id) AS last_id"
                f" FROM dead_letters WHERE {where}",
                *args,
            ),
            deadline=READ_TIMEOUT,
        )
        return DeadLetterCount(int(row["n"]), row["newest"], row["last_id"])

    async def get_dead_letter(self, dl_id: int) -> dict[str, Any] | None:
        row = await self._run(
            "reading a dead letter",
            self._pool.fetchrow("SELECT * FROM dead_letters WHERE id = $1", dl_id),
            deadline=READ_TIMEOUT,
        )
        return None if row is None else _dead_letter(row)

    async def replay(
        self, flt: DeadLetterFilter, *, expect: int | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Move matching dead letters back into the retry schedule, due now, with a fresh
        attempt budget, their history and one more replay counted, ``REPLAY_BATCH`` at a time
        (oldest first, each batch in its own statement, which writes its ``replay-requested``
        audit rows too); yields what each batch replayed (id, source, event id, rule, target).
        One statement moved them all: 200,000 dead letters held their locks, and their rows in
        memory, at once. With ``expect``, raises SelectionChanged (nothing moved) unless
        exactly that many match."""
        # Only those there now, by their ids: a replayed delivery that fails again while later
        # batches move is a new dead letter, which a batch moved again (replayed twice by one
        # request, and new ones arriving as fast as batches move kept it going); and a bound
        # on the id or the time let in those whose transaction began before the count and
        # committed after it (more replayed than the operator confirmed).
        where, args = flt.where()
        ids = await self._run(
            "replaying dead letters",
            self._pool.fetchval(
                f"SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM dead_letters"
                f" WHERE {where}",
                *args,
            ),
        )
        if expect is not None and len(ids) != expect:
            raise SelectionChanged(expect, len(ids))
        for start in range(0, len(ids), REPLAY_BATCH):
            rows = await self._run(
                "replaying dead letters",
                self._pool.fetch(
                    # One another replay or a purge holds is waited for, in id order (no
                    # deadlock between replays): skipped, it was left as a dead letter when
                    # that purge rolled back (a count it was confirmed by no longer matched),
                    # and the replay answered fewer than confirmed. One they took is gone.
                    "WITH moved AS (DELETE FROM dead_letters WHERE id IN (SELECT id FROM"
                    " dead_letters WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE)"
                    " RETURNING *),"
                    " queued AS (INSERT INTO delivery_retries (due_at, event_source, event_id,"
                    " event, rule, target, payload, is_cloudevent, delivery, attempts, history,"
                    " waiting_for, replay_count)"
                    " SELECT now(), event_source, event_id, event, rule, target, payload,"
                    # first_attempt_at: now() (the default), the start of the fresh budget
                    # max_age is counted from (the first attempt's time made an old dead
                    # letter's replay one attempt, then too-old)
                    " is_cloudevent, delivery, 0, history, 'replay', replay_count + 1"
                    " FROM moved),"
                    # the audit's replay-requested row, in the move's transaction: written
                    # through the audit buffer after the answer, a crash lost every one. Its
                    # time is this process's, as every attempt row's is (PostgreSQL's clock,
                    # on another host running ahead, put it after the attempt it caused)
                    " audited AS (INSERT INTO attempts (source, id, rule, target, attempt,"
                    " outcome, duration_ms, at) SELECT event_source, event_id, rule, target, 0,"
                    f" '{AttemptOutcome.REPLAY_REQUESTED.value}', 0, $2 FROM moved)"
                    " SELECT id, event_source, event_id, rule, target FROM moved ORDER BY id",
                    ids[start : start + REPLAY_BATCH],
                    datetime.now(UTC),
                ),
            )
            if rows:
                yield [dict(r) for r in rows]

    async def purge(self, flt: DeadLetterFilter, *, expect: int | None = None) -> int:
        """Delete the dead letters ``flt`` selects; how many. With ``expect``, raises
        SelectionChanged (nothing deleted) unless exactly that many match."""
        where, args = flt.where()

        async def tx() -> int:
            async with self._pool.acquire() as conn, conn.transaction():
                n = await conn.fetchval(
                    f"WITH gone AS (DELETE FROM dead_letters WHERE {where} RETURNING 1)"
                    " SELECT count(*) FROM gone",
                    *args,
                )
                if expect is not None and n != expect:
                    raise SelectionChanged(expect, n)  # rolls the delete back
                return int(n)

        return int(await self._run("purging dead letters", tx()))

    async def disable_target(self, target: str, reason: str) -> None:
        await self._run(
            "disabling a target",
            self._pool.execute(
                "INSERT INTO disabled_targets (target, reason) VALUES ($1, $2)"
                " ON CONFLICT (target) DO NOTHING",
                target,
                reason,
            ),
        )

    async def enable_target(self, target: str) -> bool:
        status = await self._run(
            "enabling a target",
            self._pool.execute("DELETE FROM disabled_targets WHERE target = $1", target),
        )
        return str(status) != "DELETE 0"

    async def retries_by_target(self) -> dict[str, int]:
        """How many deliveries wait in the retry schedule for each target that has any
        (claimed ones too: their attempt is under way), counted by the database."""
        rows = await self._run(
            "counting retries",
            self._pool.fetch("SELECT target, count(*) AS n FROM delivery_retries GROUP BY target"),
            deadline=READ_TIMEOUT,
        )
        return {r["target"]: int(r["n"]) for r in rows}

    async def disabled_since(
        self, *, deadline: float | None = READ_TIMEOUT
    ) -> dict[str, dict[str, str]]:
        """Each disabled target's reason and the time it was disabled (ISO 8601)."""
        rows = await self._run(
            "reading disabled targets",
            self._pool.fetch("SELECT target, reason, disabled_at FROM disabled_targets"),
            deadline=deadline,
        )
        return {
            r["target"]: {"reason": r["reason"], "at": r["disabled_at"].isoformat()} for r in rows
        }

    async def disabled_targets(self) -> dict[str, str]:
        """Each disabled target's reason: read at start-up, with no deadline of its own."""
        return {t: d["reason"] for t, d in (await self.disabled_since(deadline=None)).items()}
