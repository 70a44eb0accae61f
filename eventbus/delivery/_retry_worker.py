"""The retry worker: runs the next attempt of every delivery parked in the durable retry schedule.

    delivery_retries (Postgres) ─ claim due rows (SKIP LOCKED + lease) ─> Dispatcher.retry
        ─> delivered (row dropped) | retry again (row rescheduled) | dead letter (row moved)

Every instance runs one; they share the schedule without sending a row twice, and the rows an
instance that died had claimed become due again when their lease ends. A retry this process
schedules wakes the worker when it falls due (``due_in``); rows scheduled elsewhere are found
by the regular poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from eventbus import metrics
from eventbus._errors import StoreError
from eventbus._tasks import cancel_and_wait, stop_with_grace, wait_event
from eventbus.delivery._dispatcher import Dispatcher
from eventbus.delivery._model import Delivery
from eventbus.delivery._store import DeliveryStore
from eventbus.store import STALLED_AFTER

__all__ = ["RetryWorker"]

log = logging.getLogger("eventbus.delivery")

_CLOCK_MARGIN = 0.002  # seconds past a row's due time before claiming it


_PRUNE_ENDS_EVERY = 600.0
"""Seconds between deletions of the chain ends kept past ``ENDS_KEPT`` (``delivery_ends``)."""


class RetryWorker:
    """Claims due rows from the durable schedule and runs their next attempt.

    Several instances share the schedule (SKIP LOCKED + lease); at most ``concurrency``
    attempts run at once in this process.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        store: DeliveryStore,
        *,
        instance: str,
        lease: float = 120.0,
        batch: int = 100,
        concurrency: int = 64,
        idle_poll: float = 0.5,
    ) -> None:
        self._dispatcher = dispatcher
        self._store = store
        self._instance = instance
        self._lease = lease
        self._batch = batch
        self._concurrency = concurrency
        self._sem = asyncio.Semaphore(concurrency)
        self._idle_poll = idle_poll
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        # Rows being attempted, by id: their leases are extended while they run, and one
        # target may hold at most half the slots (a slow one with a concurrency cap held them
        # all, waiting for its own slots, and the others' retries waited behind it).
        self._running: dict[int, Delivery] = {}
        # Of those, the rows whose request is over (their outcome being recorded): a target's
        # room counts its requests, not its rows; a row held its slot while its outcome was
        # written (up to the audit's interval), and a target's retries drained at its
        # concurrency per audit flush however fast it answered.
        self._recording: set[int] = set()
        self._share = max(1, concurrency // 2)
        self._wake = asyncio.Event()
        self._next_due = float("inf")
        # Targets whose due rows the last claim left for lack of room: a slot of theirs freeing
        # wakes the loop (it slept until the next poll: 32 rows each half second, 1,200 retries
        # after an outage drained at 32 a second).
        self._held: set[str] = set()
        self._look = False  # asked to look now (wake), not for a due time
        # Since when, and why, every pass of the loop has failed (None: the last one worked).
        self._failing_since: float | None = None
        self._failure = ""
        # Told about each delivery this worker ran once its outcome is recorded (the live
        # feed updates its event's row with it); must neither wait nor raise.
        self.ran: Callable[[Delivery], None] = lambda job: None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="eventbus-retry-worker")
        self._heartbeat = asyncio.create_task(self._extend(), name="eventbus-retry-leases")

    def wake(self) -> None:
        """Look for due rows now (after a replay, say) instead of at the next poll."""
        self._look = True
        self._wake.set()

    def health(self, after: float = STALLED_AFTER) -> tuple[bool, str]:
        """Whether the worker is making passes over the schedule: not when every pass for
        ``after`` seconds has failed (the readiness check's ``retries``)."""
        if self._failing_since is None:
            return True, "ok"
        failing = time.monotonic() - self._failing_since
        if failing <= after:
            return True, "ok"
        return False, f"no pass over the schedule for {failing:.0f} s: {self._failure}"[:300]

    def due_in(self, delay: float) -> None:
        """A row will be due in ``delay`` seconds: look for it then, even mid-poll interval.
        (Rows other instances schedule are found by the regular poll.)"""
        due = time.monotonic() + delay
        if due < self._next_due:
            self._next_due = due
            self._wake.set()

    async def _loop(self) -> None:
        last_count = last_pruned = float("-inf")
        while True:
            try:
                if time.monotonic() - last_count > 5:
                    metrics.RETRY_BACKLOG.set(await self._store.backlog())
                    await self._dispatcher.refresh_disabled()
                    last_count = time.monotonic()
                if time.monotonic() - last_pruned > _PRUNE_ENDS_EVERY:
                    await self._store.prune_ends()
                    last_pruned = time.monotonic()
                # Claim only what can start now: a claimed row waiting here for a free slot
                # would spend its lease waiting.
                await self._sem.acquire()
                self._sem.release()
                free = self._concurrency - len(self._inflight)
                held = self._held_rows()
                full = [t for t in held.rows if not held.room_for(t)]
                limit = max(1, min(self._batch, free))
                # Held before the claim waits on the database: a full target's slots freeing
                # meanwhile must wake the loop too.
                self._held = set(full)
                claimed = await self._claim(limit, skip=full)
                # Rows of full targets may be due (not known without asking): a slot of
                # theirs freeing looks again. So does any slot when the claim took its limit.
                if len(claimed) >= limit:
                    self._held.update(job.target for job in claimed)
                claimed = await self._within_room(claimed, held)
                if not claimed and full:
                    # Nothing else is due: the full targets may take the idle slots too, up to
                    # their own concurrency (the share keeps room for others while theirs
                    # wait; one target's backlog after an outage drained on half the slots).
                    busy = [t for t in full if not held.room_for(t, alone=True)]
                    claimed = await self._claim(limit, skip=busy)
                    claimed = await self._within_room(claimed, held, alone=True)
            except Exception as exc:  # StoreError, or Postgres restarting
                log.warning("retry schedule unavailable: %s; retrying in 2 s", exc)
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                self._failure = str(exc)
                await asyncio.sleep(2.0)
                continue
            self._failing_since = None
            for pending in claimed:
                await self._sem.acquire()
                if pending.pending_id is not None:  # always, for a claimed row
                    # (a row rescheduled and claimed again while its last attempt's task ends
                    # is a new entry: that task leaves it alone)
                    self._running[pending.pending_id] = pending
                    self._recording.discard(pending.pending_id)
                    pending.sent = self._sent_callback(pending)
                task = asyncio.create_task(self._one(pending))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            if not claimed:
                # Due times are the database's: a local timer for a retry may fire a moment
                # before the row is due by its clock, so ask it when the next one is.
                with contextlib.suppress(StoreError):
                    due = await self._store.next_due_in()
                    if due is not None:
                        self.due_in(due + _CLOCK_MARGIN)
                await self._idle()

    async def _claim(self, limit: int, *, skip: list[str]) -> list[Delivery]:
        """Up to ``limit`` due rows of the targets this process has, but ``skip``'s. A claim
        whose answer took half its lease or more (the database frozen meanwhile, its commit
        late) is given back, not attempted: its lease may run out before the attempt ends,
        and another claimer attempt the rows too (six events were delivered twice so)."""
        asked = time.monotonic()
        claimed = await self._store.claim_due(
            limit=limit,
            lease=self._lease,
            instance=self._instance,
            skip=skip,
            known=self._dispatcher.target_names(),
        )
        took = time.monotonic() - asked
        if claimed and took >= self._lease / 2:
            log.warning(
                "a claim of %d retries took %.1f s of its %g s lease: given back",
                len(claimed),
                took,
                self._lease,
            )
            with contextlib.suppress(StoreError):  # if not, they wait for their lease
                await self._store.release(claimed)
            return []
        return claimed

    def _held_rows(self) -> _Held:
        """The rows each target holds, and of those the ones whose request is under way."""
        rows: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        for i, job in self._running.items():
            rows[job.target] += 1
            if i not in self._recording:
                requests[job.target] += 1
        return _Held(self, rows, requests)

    def _limits(self, target: str, *, alone: bool = False) -> tuple[int, int]:
        """The rows ``target`` may hold, half the worker's slots (all of them when no other
        target's rows are due, ``alone``), and of those the requests it may have under way: no
        more than it takes at once (two slow targets taking one at a time held every slot,
        31 of each one's 32 rows waiting for their own target, the others' retries behind).
        A row whose request is over still holds a slot while its outcome is recorded (and
        its follow-ups run): it counts against the first, not the second."""
        share = self._concurrency if alone else self._share
        concurrency = self._dispatcher.concurrency_of(target)
        return share, share if concurrency is None else max(1, min(share, concurrency))

    async def _within_room(
        self, claimed: list[Delivery], held: _Held, *, alone: bool = False
    ) -> list[Delivery]:
        """``claimed`` but the rows beyond their target's room, which are given back (one
        claim took rows in due order, as many of one target as the batch held)."""
        kept: list[Delivery] = []
        extra: list[Delivery] = []
        held = held.copy()
        for job in claimed:
            if held.room_for(job.target, alone=alone):
                held.rows[job.target] += 1
                held.requests[job.target] += 1
                kept.append(job)
            else:
                extra.append(job)
                self._held.add(job.target)
        if extra:
            try:
                await self._store.release(extra)
            except StoreError as exc:  # they wait out their lease; the kept ones still run
                log.warning("giving back %d claimed retries failed: %s", len(extra), exc)
        return kept

    async def _idle(self) -> None:
        """Sleep until the next poll, the earliest known due time, or a wake-up."""
        while True:
            if self._look:  # asked while the last claim ran
                self._look = False
                return
            self._wake.clear()
            now = time.monotonic()
            if self._next_due <= now:
                self._next_due = float("inf")
                return
            wait = min(self._idle_poll, self._next_due - now)
            if not await wait_event(self._wake, wait):
                if self._next_due <= time.monotonic():
                    self._next_due = float("inf")
                return
            if self._look or self._next_due == float("inf"):
                self._look = False
                return  # woken by wake(): a replay, or a target with room again

    async def _one(self, pending: Delivery) -> None:
        try:
            await self._dispatcher.retry(pending)
        except Exception as exc:
            # The row stays claimed until its lease runs out, then is tried again.
            log.warning("retry of %s/%s failed: %s", pending.event.get("id"), pending.target, exc)
        else:
            self.ran(pending)
        finally:
            self._sem.release()
            if pending.pending_id is not None:
                if self._running.get(pending.pending_id) is pending:
                    del self._running[pending.pending_id]
                    self._recording.discard(pending.pending_id)
                self._freed(pending.target)

    def _sent_callback(self, pending: Delivery) -> Callable[[], None]:
        def sent() -> None:
            row = pending.pending_id
            if row is not None and self._running.get(row) is pending and row not in self._recording:
                self._recording.add(row)
                self._freed(pending.target)

        return sent

    def _freed(self, target: str) -> None:
        """A request or a row of ``target``'s is over: wake the loop once a quarter of its
        room is free, if the last claim left its rows for lack of room (not at every slot:
        claims in batches)."""
        if target not in self._held:
            return
        held = self._held_rows()
        most_rows, most_requests = self._limits(target, alone=True)
        if (
            held.requests[target] <= most_requests * 3 // 4
            and held.rows[target] <= most_rows * 3 // 4
        ):
            self._held.discard(target)
            self.wake()

    async def _extend(self) -> None:
        """Every third of a lease, extend the leases of the rows being attempted: a row
        waiting for its target's slot (behind a concurrency cap or a rate limit) outlived its
        lease, was claimed again and delivered twice."""
        while True:
            await asyncio.sleep(self._lease / 3)
            claims = {i: job.claim for i, job in self._running.items() if job.claim is not None}
            if not claims:
                continue
            try:
                await self._store.extend(claims, lease=self._lease)
            except Exception as exc:  # StoreError, or Postgres restarting: tried again
                log.warning("extending the leases of running retries failed: %s", exc)

    async def stop(self, grace: float, hurry: asyncio.Event | None = None) -> int:
        """Stop claiming rows; attempts still running after ``grace`` seconds (or once
        ``hurry`` is set) are cancelled (their rows stay claimed until the lease ends, then
        are tried again); returns how many were."""
        try:
            return await stop_with_grace(self._task, self._inflight, grace, hurry)
        finally:
            if self._heartbeat is not None:
                await cancel_and_wait(self._heartbeat)


class _Held:
    """The rows each target holds in a worker, and of those the ones whose request is under
    way (see ``RetryWorker._limits``)."""

    __slots__ = ("requests", "rows", "worker")

    def __init__(self, worker: RetryWorker, rows: Counter[str], requests: Counter[str]) -> None:
        self.worker = worker
        self.rows = rows
        self.requests = requests

    def copy(self) -> _Held:
        return _Held(self.worker, Counter(self.rows), Counter(self.requests))

    def room_for(self, target: str, *, alone: bool = False) -> bool:
        most_rows, most_requests = self.worker._limits(target, alone=alone)
        return self.rows[target] < most_rows and self.requests[target] < most_requests
