"""The dispatcher: runs one delivery attempt and decides what happens next.

    Router ─ dispatch(event, route) ─┐
    RetryWorker ─ due rows ──────────┴─> guard (breaker, rate) ─> target.deliver ─> Outcome
        delivered      -> done; reply published to the bus; on_success destination
        retryable      -> durable retry row (policy: backoff, Retry-After, max attempts/age)
        otherwise      -> durable dead letter (+ optional dead-letter target, on_failure)

``dispatch`` returns only when the delivery is delivered or durably recorded (a retry row or
a dead letter in Postgres), so the router may then acknowledge the bus message (guarantee 2).
While Postgres is unreachable it waits (no attempt beyond the policy goes unrecorded); it
raises StoreError only when Postgres refuses a write, and the router then naks the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from eventbus import metrics
from eventbus._errors import (
    ConfigError,
    EventTooLargeForBus,
    StoreError,
    StoreUnavailable,
    truncate_error,
)
from eventbus.cloudevents import attribute_text, new_event
from eventbus.delivery._guard import Guard
from eventbus.delivery._model import DeadLetterReason, Delivery, DeliveryKind
from eventbus.delivery._policy import DeliveryPolicy, parse_delivery
from eventbus.delivery._store import DeliveryStore
from eventbus.rules import Route
from eventbus.store import CAUSE_ID, CAUSE_SOURCE, Attempt, AttemptOutcome, AuditWriter
from eventbus.targets import Capped, Outcome, Target

__all__ = ["Dispatcher"]

log = logging.getLogger("eventbus.delivery")

HOPS = "eventbushops"
# CAUSE_SOURCE and CAUSE_ID (the store's, whose trail follows them): the event a reply answers,
# or a destination's outcome event reports on, set on both.
_OUTAGE_BACKOFF_MAX = 5.0
# Seconds a retry may be taken up past its max_age and still be attempted: one due at the
# edge is claimed a little after it.
_LATE_GRACE = 1.0
_T = TypeVar("_T")

CUT_OFF_DELIVERY = (
    "cut off before the target answered: the service stopped (router.shutdown_grace, or a "
    "second signal); "
    "the event is delivered again"
)
"""The error of a delivery's attempt cancelled by the service's stop."""

# The labelled metrics of each target, looked up once: ``labels()`` takes a lock and checks
# its arguments each time, a visible share of a delivery's bookkeeping.
_delivery_seconds = functools.cache(metrics.DELIVERY_SECONDS.labels)
_deliveries = functools.cache(metrics.DELIVERIES.labels)
_in_flight = functools.cache(metrics.DELIVERIES_IN_FLIGHT.labels)
_parked = functools.cache(metrics.DELIVERIES_PARKED.labels)


def _ended_already(job: Delivery) -> None:
    log.info(
        "%s/%s rule=%s target=%s: its retries ended already (this bus message was delivered "
        "again after the chain its first delivery began was over); none begun again",
        job.event.get("source"),
        job.event.get("id"),
        job.stored_rule,
        job.target,
    )


class Dispatcher:
    """See the module docstring. One per process; shared by the router and the retry worker."""

    def __init__(
        self,
        targets: Mapping[str, Target],
        policies: Mapping[str, DeliveryPolicy],
        store: DeliveryStore,
        audit: AuditWriter,
        publish: Callable[[dict[str, Any]], Awaitable[object]],
        *,
        hop_limit: int = 8,
        disabled: Mapping[str, str] | None = None,
        route_share: int = 900,
    ) -> None:
        self._targets = targets
        self._route_share = route_share
        self._policies = policies
        self._store = store
        self._audit = audit
        self._publish = publish
        self._hop_limit = hop_limit
        self._disabled = dict(disabled or {})
        self._disabled_changes = 0  # enable and disable here: see refresh_disabled
        self._guards = {name: Guard(name, p.breaker, p.rate_limit) for name, p in policies.items()}
        self._override_cache: dict[tuple[str, bytes], DeliveryPolicy] = {}
        self._waiting: Counter[str] = Counter()
        # A capped target's slots, taken here before its own: a delivery that waited for one
        # is checked against the circuit once it has it (a circuit opened meanwhile let every
        # queued delivery through, two a second to a dead function for 18 s in a review), and
        # one stopped while waiting is known never to have been sent.
        self._slots = {
            name: asyncio.Semaphore(target.concurrency)
            for name, target in targets.items()
            if isinstance(target, Capped)
        }
        # Told about every retry this process schedules (RetryWorker.due_in), so a retry due
        # sooner than the worker's next poll is not late by up to a poll interval.
        self.scheduled: Callable[[float], None] = lambda delay: None
        self.in_flight = 0
        """Deliveries under way now (what a shutdown waits for)."""

    @contextlib.contextmanager
    def delivering(self, target: str) -> Iterator[None]:
        """Count a delivery to ``target`` as under way while the block runs: those this
        dispatcher runs (waiting for the target's rate limit, a connection, its answer or the
        record of the outcome) and synchronous invocations, in ``eventbus_deliveries_in_flight``
        (summed over the workers of ``serve --workers N``)."""
        gauge = _in_flight(target)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def guard(self, target: str) -> Guard | None:
        return self._guards.get(target)

    def disabled(self, target: str) -> str | None:
        """Why ``target`` is switched off (it answered 410 Gone), or None while it is on."""
        return self._disabled.get(target)

    def enable(self, target: str) -> None:
        self._disabled.pop(target, None)
        self._disabled_changes += 1

    async def refresh_disabled(self) -> None:
        """Re-read which targets are switched off: another instance may have seen a 410, or an
        operator enabled one through another instance. Gives up after ``READ_TIMEOUT``
        seconds (a lock on the table held the retry worker for as long as it lasted). A read
        that a change made here overtook is not taken (the next one is): a target enabled
        while it ran was disabled again by it until the next read, its deliveries meanwhile
        dead-lettered."""
        changes = self._disabled_changes
        since = await self._store.disabled_since()
        if changes == self._disabled_changes:
            self._disabled = {target: about["reason"] for target, about in since.items()}

    async def dispatch(
        self, event: dict[str, Any], route: Route, acceptance: str | None = None
    ) -> AttemptOutcome | None:
        """Deliver ``route`` for ``event`` once; on failure record a retry or a dead letter.
        ``acceptance`` is the bus message the event came in (see ``Delivery.acceptance``).
        Returns what became of the attempt (None: parked behind an open circuit).

        Raises StoreError if that record cannot be written (the caller must not ack)."""
        job = Delivery(
            event=event,
            rule=route.rule,
            target=route.target,
            payload=route.payload,
            is_cloudevent=route.is_cloudevent,
            override=dict(route.delivery) if route.delivery else None,
            acceptance=acceptance,
        )
        await self.run(job)
        return job.last_outcome

    async def retry(self, pending: Delivery) -> None:
        """Run the next attempt of a row claimed from the retry schedule."""
        await self.run(pending)

    def _policy(self, job: Delivery) -> DeliveryPolicy:
        base = self._policies.get(job.target, DeliveryPolicy())
        if not job.override:
            return base
        key = (job.target, orjson.dumps(job.override, option=orjson.OPT_SORT_KEYS))
        policy = self._override_cache.get(key)
        if policy is None:
            try:
                policy = parse_delivery(job.override, base, where=f"rule {job.rule!r}")
            except ConfigError as exc:
                # Checked at load, but against the settings of its time: a retry stored before
                # a restart with other connector settings. It raised at every attempt.
                log.warning("%s; target %r delivers it with its own settings", exc, job.target)
                policy = base
            self._override_cache[key] = policy
        return policy

    def target_names(self) -> list[str]:
        """The targets this process can send to (its retry worker claims rows for these)."""
        return list(self._targets)

    async def run(self, job: Delivery) -> None:
        self.in_flight += 1
        try:
            with self.delivering(job.target):
                await self._run(job)
        finally:
            self.in_flight -= 1

    async def _run(self, job: Delivery) -> None:
        target = self._targets.get(job.target)
        if target is None:
            await self._dead_letter(
                job, None, DeadLetterReason.UNKNOWN_TARGET, f"no target {job.target!r}"
            )
            return
        if job.target in self._disabled:
            why = f"target disabled: {self._disabled[job.target]}"
            await self._dead_letter(job, None, DeadLetterReason.TARGET_DISABLED, why)
            return
        policy = self._policy(job)
        # The router waits on a delivery from the bus (a retry's row waits in the schedule).
        routed, name = job.pending_id is None, job.target
        if routed and self._saturated(name, target):
            # It already holds its share of the bus's in-flight window waiting for its slots:
            # this one waits in the durable schedule instead (one slow function with a cap held
            # the whole window, and routing to every other target stopped behind it).
            await self._park(job, 0.0, "capacity")
            return
        self._waiting[name] += routed
        try:
            outcome = await self._attempt(job, target, policy)
        finally:
            self._waiting[name] -= routed
        if outcome is None:  # parked behind an open circuit, or too old to wait any more
            return
        job.attempts += 1
        job.history.append(_history_entry(job.attempts, outcome, job.replay_count))
        _delivery_seconds(name).observe(outcome.duration_ms / 1000)
        if outcome.delivered:
            await self._delivered(job, outcome, policy)
        else:
            await self._failed(job, outcome, policy)

    @contextlib.asynccontextmanager
    async def slot_now(self, name: str) -> AsyncIterator[bool]:
        """A slot of capped target ``name`` for a synchronous invocation, taken at once: the
        block gets False when all are taken (nothing may be sent), True otherwise (a target
        without a cap too). These slots are the ones this dispatcher's deliveries take before
        the target's own."""
        slots = self._slots.get(name)
        if slots is None:
            yield True
            return
        if slots.locked():
            yield False
            return
        await slots.acquire()  # free (checked above, nothing awaited since): taken at once
        try:
            yield True
        finally:
            slots.release()

    def concurrency_of(self, name: str) -> int | None:
        """How many requests target ``name`` takes at once, None when it sets no cap (or this
        process has no such target)."""
        target = self._targets.get(name)
        return target.concurrency if isinstance(target, Capped) else None

    def _saturated(self, name: str, target: Target) -> bool:
        """Whether the router's deliveries to ``target`` fill its slots and more than its
        share of the window wait behind them (a burst of a few hundred waits in memory)."""
        waiting = self._waiting[name]
        # the count first: a runtime protocol check costs microseconds, on every delivery
        return (
            waiting >= self._route_share
            and isinstance(target, Capped)
            and waiting >= target.concurrency
        )

    async def _attempt(
        self, job: Delivery, target: Target, policy: DeliveryPolicy
    ) -> Outcome | None:
        """One attempt through the target's guard; None when its circuit parked the job, or
        dead-lettered it for waiting past ``max_age``."""
        if job.attempts and job.first_attempt_at is not None:
            age = (datetime.now(UTC) - job.first_attempt_at).total_seconds()
            if age > policy.retry.max_age + _LATE_GRACE:
                # Due within max_age but taken up past it (behind a backlog of due retries,
                # a crashed worker's lease): 1,409 of 1,500 such retries were still sent, up
                # to 2.5 x max_age after the first attempt. Checked before the circuit's
                # probe or a rate-limit token is taken: neither is used for it.
                late = _too_late(job, age, policy)
                await self._dead_letter(job, late, DeadLetterReason.TOO_OLD, late.error, policy)
                return None
        guard = self._guards.get(job.target)
        slots = self._slots.get(job.target)
        probe = False  # this one is the half-open circuit's probe
        if guard is not None:
            admission = guard.admit()
            if not admission.allowed:
                await self._behind_circuit(job, admission.reopen_in, policy)
                return None
            probe = guard.state != "closed"
            await guard.wait_turn()
        if slots is not None:
            try:
                await slots.acquire()
            except BaseException:
                if guard is not None and probe:
                    guard.release()  # never leave the half-open probe outstanding
                raise
        if guard is not None and not probe and guard.state != "closed":
            # The circuit opened while this one waited for its token or its slot: it goes as
            # the others do now (parked; or the probe, if its period is over already).
            admission = guard.admit()
            if not admission.allowed:
                if slots is not None:
                    slots.release()
                guard.give_back_turn()
                await self._behind_circuit(job, admission.reopen_in, policy)
                return None
        try:
            return await self._send(job, target, guard)
        finally:
            if slots is not None:
                slots.release()

    async def _send(self, job: Delivery, target: Target, guard: Guard | None) -> Outcome:
        if job.first_attempt_at is None:
            job.first_attempt_at = datetime.now(UTC)
        started = time.perf_counter()
        try:
            outcome = await target.deliver(
                job.event, job.payload, is_cloudevent=job.is_cloudevent, attempt=job.attempts + 1
            )
        except BaseException as exc:
            if guard is not None:
                guard.record(False)  # never leave a half-open probe outstanding
            if isinstance(exc, asyncio.CancelledError):
                self._cut_off(job, (time.perf_counter() - started) * 1000)
            raise
        finally:
            if job.sent is not None:
                job.sent()
        if guard is not None:
            guard.settle(outcome)
            if guard.reclosed():
                await self.release_parked(job.target)
        return outcome

    async def _delivered(self, job: Delivery, outcome: Outcome, policy: DeliveryPolicy) -> None:
        await self._record(job, AttemptOutcome.DELIVERED, outcome)
        # Reply and destination first, the row last: if either fails, the row is still there
        # (claimed until its lease ends) and the delivery is tried again: at-least-once.
        if outcome.reply is not None:
            await self._reply(job, outcome.reply)
        if policy.on_success and job.kind is DeliveryKind.ROUTE:
            kind = DeliveryKind.ON_SUCCESS
            await self._follow_up(job, kind, policy.on_success, _destination(job, kind, outcome))
        if job.pending_id is not None and not await self._settle_row(job, self._store.complete):
            log.warning("retry row %s was taken over while its attempt ran", job.pending_id)

    async def _failed(self, job: Delivery, outcome: Outcome, policy: DeliveryPolicy) -> None:
        assert job.first_attempt_at is not None
        error = outcome.error
        if outcome.gone:
            reason = DeadLetterReason.GONE
            if policy.disable_on_gone:
                why = f"410 Gone at attempt {job.attempts}"
                await _durably(lambda: self._store.disable_target(job.target, why))
                self._disabled[job.target] = why  # as the database has it, for every instance
                self._disabled_changes += 1
                log.warning("target %s answered 410 Gone: disabled", job.target)
        elif not outcome.retryable:
            reason = DeadLetterReason.NON_RETRYABLE
        else:
            age = (datetime.now(UTC) - job.first_attempt_at).total_seconds()
            delay = policy.retry.next_delay(job.attempts, age, outcome.retry_after)
            if delay is not None:
                await self._record(job, AttemptOutcome.RETRY_SCHEDULED, outcome)
                await self._park(job, delay, "retry")
                return
            if job.attempts >= policy.retry.max_attempts:
                reason = DeadLetterReason.ATTEMPTS_EXHAUSTED
            else:
                reason = DeadLetterReason.TOO_OLD
                if outcome.retry_after is not None:
                    # say why an early attempt was too old: the function's own wait
                    error = (
                        f"{outcome.error}; its Retry-After ({outcome.retry_after:g} s) falls "
                        f"past max_age ({policy.retry.max_age:g} s)"
                    )
        await self._dead_letter(job, outcome, reason, error, policy)

    async def _behind_circuit(
        self, job: Delivery, reopen_in: float, policy: DeliveryPolicy
    ) -> None:
        """Park ``job`` until its target's circuit lets a request through, or dead-letter it
        (too old) once it has waited past ``max_age``: its age counts from its first attempt,
        or from the circuit's first refusal. Parked again and again, a delivery waited as long
        as the target was down (5 x max_age in a review's run), where retrying stops at
        max_age."""
        now = datetime.now(UTC)
        if job.first_attempt_at is None:
            job.first_attempt_at = now
        left = policy.retry.max_age - (now - job.first_attempt_at).total_seconds()
        if left <= 0:
            why = f"waited past max_age ({policy.retry.max_age:g} s) for {job.target}'s circuit"
            await self._dead_letter(job, None, DeadLetterReason.TOO_OLD, why, policy)
            return
        guard = self._guards.get(job.target)
        if guard is not None and guard.state == "closed":
            # the probe closed the circuit meanwhile, and its release of the parked rows may
            # have run before this one is written: parked for open_for, it waited behind it
            reopen_in = 0.0
        await self._park(job, min(reopen_in, left), "circuit")
        if reopen_in > 0 and guard is not None and guard.state == "closed":
            # closed while this row was being written: the probe's release passed it by (a
            # claimed row is left to its worker), and it waited a whole open_for (1 run in 5)
            await self.release_parked(job.target, late=True)

    async def release_parked(self, target: str, *, late: bool = False) -> None:
        """The circuit of ``target`` closed again: the deliveries parked behind it are due now.
        They waited on for the rest of their ``open_for`` (a minute by default) while new
        events went through, and arrived after them. ``late``: a row parked as the circuit
        closed, released on its own (logged at debug: many such races follow one closing, and
        each logged the closing again)."""
        try:
            released = await self._store.circuit_closed(target)
        except StoreError as exc:  # they go when they come due, as before
            log.warning("target %s: circuit closed; parked deliveries wait: %s", target, exc)
            return
        if released:
            log.log(
                logging.DEBUG if late else logging.INFO,
                "target %s: circuit closed; %d parked deliveries due now",
                target,
                released,
            )
            self.scheduled(0.0)

    async def _park(self, job: Delivery, delay: float, waiting_for: str) -> None:
        if job.pending_id is None:
            job.pending_id = await _durably(
                lambda: self._store.schedule(job, due_in=delay, waiting_for=waiting_for)
            )
            if job.pending_id is None:
                _ended_already(job)
                return
        else:
            row = functools.partial(self._store.reschedule, due_in=delay, waiting_for=waiting_for)
            if not await self._settle_row(job, row):
                log.warning("retry row %s was taken over while its attempt ran", job.pending_id)
                return
        if waiting_for != "retry":  # a retry after an attempt counts as retry-scheduled
            _parked(job.target, waiting_for).inc()
        # Told once the row is written: the timer then cannot run out before the row is due.
        self.scheduled(delay)

    async def _dead_letter(
        self,
        job: Delivery,
        outcome: Outcome | None,
        reason: DeadLetterReason,
        error: str | None,
        policy: DeliveryPolicy | None = None,
    ) -> None:
        await self._record(job, AttemptOutcome.DEAD_LETTERED, outcome, error)
        # Follow-ups first, the row last (as for a delivered one): killed in between, the row
        # is still there and its last attempt made again, follow-ups and all. The other way
        # round, a retry's dead letter was written and its copy, in memory only, lost.
        if policy is not None and job.kind is DeliveryKind.ROUTE:
            await self._dead_letter_follow_ups(job, outcome, reason, error, policy)
        row = functools.partial(
            self._store.dead_letter,
            last_status=None if outcome is None else outcome.status,
            final_error=truncate_error(error) if error else None,
            reason=reason,
        )
        stored = await self._settle_row(job, row)
        if stored is None:
            if job.pending_id is None:
                _ended_already(job)
            else:
                log.warning("retry row %s was taken over while its attempt ran", job.pending_id)
            return
        log.info(
            "dead-lettered %s/%s rule=%s target=%s reason=%s",
            job.event.get("source"),
            job.event.get("id"),
            job.stored_rule,
            job.target,
            reason.value,
        )

    async def _dead_letter_follow_ups(
        self,
        job: Delivery,
        outcome: Outcome | None,
        reason: DeadLetterReason,
        error: str | None,
        policy: DeliveryPolicy,
    ) -> None:
        if policy.dead_letter_target:
            copy = dict(job.event)
            copy.update(
                deadletterreason=reason.value,
                deadlettertarget=job.target,
                deadletterrule=job.rule,
                deadletterattempts=job.attempts,
                deadlettererror=attribute_text(truncate_error(error or "")),
            )
            await self._follow_up(job, DeliveryKind.DEAD_LETTER, policy.dead_letter_target, copy)
        if policy.on_failure:
            kind = DeliveryKind.ON_FAILURE
            destination = _destination(job, kind, outcome, reason)
            await self._follow_up(job, kind, policy.on_failure, destination)

    async def _follow_up(
        self, job: Delivery, kind: DeliveryKind, target: str, event: dict[str, Any]
    ) -> None:
        """Deliver ``event`` to ``target`` as a follow-up of ``job`` (which starts none)."""
        await self.run(
            Delivery(
                event=event,
                rule=job.rule,
                kind=kind,
                target=target,
                payload=event,
                is_cloudevent=True,
            )
        )

    async def _reply(self, job: Delivery, reply: dict[str, Any]) -> None:
        """Knative-style reply: publish the function's answer back onto the bus, with a hop
        count so two functions answering each other cannot loop forever."""
        hops = _hops(job.event) + 1
        if hops > self._hop_limit:
            log.warning(
                "reply from target %s to %s dropped: hop limit %d reached",
                job.target,
                job.event.get("id"),
                self._hop_limit,
            )
            metrics.EVENTS_REJECTED.labels("reply", "hop-limit").inc()
            return
        reply = dict(reply)
        reply[HOPS] = hops
        reply.update(_cause(job))
        # Audited as accepted (via "reply") when the router takes it off the bus; counted
        # (received or duplicate) by ``publish``.
        try:
            await self._publish(reply)
        except EventTooLargeForBus as exc:
            # Never taken: raised, the delivery was tried again, the function called again.
            log.warning("reply from target %s dropped: %s", job.target, exc)
            metrics.EVENTS_REJECTED.labels("reply", "too-large").inc()

    async def _settle_row(self, job: Delivery, write: Callable[[Delivery], Awaitable[_T]]) -> _T:
        """Write the outcome of ``job`` where it is kept (its retry row, or a dead letter),
        waiting out a database outage. A job from the retry schedule has its attempt rows
        committed first: once its row says done, nothing else brings the attempt back."""
        if job.pending_id is not None:
            await self._audit.flush(urgent=False)
        return await _durably(lambda: write(job))

    def _cut_off(self, job: Delivery, duration_ms: float) -> None:
        """Audit and count ``job``'s attempt cancelled before its target answered (the service
        stopping past ``router.shutdown_grace``: its event is delivered again, by the bus or
        the retry schedule). The request may have reached the function: with no row, a
        function slower than the grace saw the event at every restart, and the trail showed
        none of it. Nothing waits for the row in a full buffer: the task is ending."""
        _deliveries(job.target, AttemptOutcome.FAILED.value).inc()
        self._audit.attempt_nowait(
            Attempt(
                event=job.trail_event,
                rule=job.stored_rule,
                target=job.target,
                number=job.attempts + 1,
                outcome=AttemptOutcome.FAILED,
                duration_ms=duration_ms,
                error=CUT_OFF_DELIVERY,
            )
        )

    async def _record(
        self,
        job: Delivery,
        result: AttemptOutcome,
        outcome: Outcome | None,
        error: str | None = None,
    ) -> None:
        """Count what became of ``job``'s latest attempt and write its audit row, both under
        one spelling; ``outcome`` None (with ``error`` saying why) when none was made."""
        _deliveries(job.target, result.value).inc()
        job.last_outcome = result
        await self._audit.attempt(
            Attempt(
                event=job.trail_event,
                rule=job.stored_rule,
                target=job.target,
                number=job.attempts,
                outcome=result,
                status=None if outcome is None else outcome.status,
                duration_ms=0.0 if outcome is None else outcome.duration_ms,
                error=error if outcome is None else outcome.error,
            )
        )


async def _durably(write: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``write`` until Postgres takes it, waiting out an outage (backing off up to 5 s).

    An outcome that cannot be recorded must not be forgotten either: raising would let the
    bus redeliver the event, or the retry row's lease run out, and the target would see an
    attempt beyond the policy's budget that no record counts. So the delivery waits, holding
    its place in the bound on work in flight. Raises StoreError when Postgres refuses the
    statement itself (that will not change by waiting)."""
    delay = 0.2
    while True:
        try:
            return await write()
        except StoreUnavailable as exc:
            log.warning("recording a delivery outcome: %s; retrying in %.1f s", exc, delay)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, _OUTAGE_BACKOFF_MAX)


def _too_late(job: Delivery, age: float, policy: DeliveryPolicy) -> Outcome:
    """The outcome of a retry not made for coming past ``max_age``: the last attempt's status
    and error stay the delivery's, as for one dead-lettered after its attempt."""
    last = job.history[-1] if job.history else {}
    why = (
        f"its next attempt came {age:.0f} s after the first, past max_age "
        f"({policy.retry.max_age:g} s): not made"
    )
    return Outcome(
        delivered=False,
        status=last.get("status"),
        duration_ms=0.0,
        error=f"{last['error']}; {why}" if last.get("error") else why,
        retryable=True,
        retry_after=None,
    )


def _destination(
    job: Delivery,
    kind: DeliveryKind,
    outcome: Outcome | None,
    reason: DeadLetterReason | None = None,
) -> dict[str, Any]:
    """A destination's outcome CloudEvent (Function Compute style) for ``job``."""
    data = {
        "rule": job.rule,
        "target": job.target,
        "attempts": job.attempts,
        "status": None if outcome is None else outcome.status,
        "error": None if outcome is None else outcome.error,
        "reason": None if reason is None else reason.value,
        "event": job.event,
    }
    ok = kind is DeliveryKind.ON_SUCCESS
    cause: dict[str, Any] = _cause(job)  # as new_event's **ext
    if _hops(job.event):
        # the count goes on: a destination's reply routed back to the first target looped
        # for ever, each outcome event starting again at hop 0
        cause[HOPS] = _hops(job.event)
    return new_event(
        type="eventbus.delivery." + ("succeeded" if ok else "failed"),
        source=f"eventbus/targets/{job.target}",
        subject=str(job.event.get("id", "")),
        data=data,
        **cause,
    )


def _cause(job: Delivery) -> dict[str, str]:
    """The attributes naming the event ``job`` answers or reports on, for a reply to it or its
    destination's outcome event: the event whose trail ``job`` is in (a destination's outcome
    event has none of its own: the event it reports on)."""
    key = job.trail_event
    cause = {CAUSE_SOURCE: key.get("source"), CAUSE_ID: key.get("id")}
    return {name: value for name, value in cause.items() if isinstance(value, str)}


def _hops(event: dict[str, Any]) -> int:
    try:
        return max(0, int(event.get(HOPS, 0)))
    except (TypeError, ValueError):
        return 0


def from_outside(event: dict[str, Any], via: str) -> dict[str, Any]:
    """``event`` as published by ``via``: the hop count is eventbus's own, carried only by
    replies (a producer's -1000000 let two functions answer each other for ever, its 8 had
    every reply to its event dropped)."""
    if HOPS in event and via != "reply":
        return {key: value for key, value in event.items() if key != HOPS}
    return event


def _history_entry(attempt: int, outcome: Outcome, replay: int) -> dict[str, Any]:
    entry = {
        "attempt": attempt,
        "at": datetime.now(UTC).isoformat(),
        "status": outcome.status,
        "duration_ms": round(outcome.duration_ms, 2),
        "error": truncate_error(outcome.error) if outcome.error else None,
        "retryable": outcome.retryable,
    }
    if replay:  # attempts count from 1 again after each replay (a fresh budget)
        entry["replay"] = replay
    return entry
