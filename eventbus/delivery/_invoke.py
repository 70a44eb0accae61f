"""Invoking one target directly, without a rule: synchronously (one attempt, its answer handed
back to the caller) or asynchronously (through the bus, then delivered like a rule's route).

    sync:   Invoker.invoke ─> unknown/disabled? ─> circuit open? ─> rate limit
                ─> target.invoke (never waits for a concurrency slot) ─> Invocation + audit
    async:  the edge publishes the event with via ``invoke:async:<target>:<who>``; the router
                reads the target from the via (:func:`invoked_target`) and hands the dispatcher
                that one route, rule ``invoke:<target>``: retries, dead letters, destinations

A synchronous invocation is never retried or dead-lettered: the caller gets the error. It goes
through the same circuit breaker and rate limit as rule deliveries, so a sync caller cannot
hammer an endpoint the breaker protects, and its failures count towards opening the circuit.

Both kinds are recorded under the pseudo-rule ``invoke:<target>`` (rule names cannot contain
``:``, so no rule can be mistaken for one), and the ``via`` of the event's acceptance says how
and by whom: ``invoke:sync:<target>:<who>`` (``who`` is ``key=<API key name>`` or
``remote=<address>``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from eventbus import metrics
from eventbus._errors import StoreUnavailable
from eventbus.delivery._dispatcher import Dispatcher
from eventbus.rules import Route
from eventbus.store import Attempt, AttemptOutcome, AuditWriter
from eventbus.targets import Answer, Invocable, Outcome, Requester, Target

__all__ = [
    "Invocation",
    "Invoker",
    "Refusal",
    "invocation_via",
    "invoke_rule",
    "invoked_target",
    "sync_rule_via",
]

_PREFIX = "invoke:"

CUT_OFF = (
    "cut off before the target answered: the service stopped (router.shutdown_grace, or a "
    "second signal)"
)
"""The error of an invocation's attempt its caller's request ended before it did."""


def invoke_rule(target: str) -> str:
    """The pseudo-rule an invocation of ``target`` is recorded under: ``invoke:<target>``."""
    return _PREFIX + target


def invocation_via(mode: Literal["sync", "async"], target: str, who: str) -> str:
    """The ``via`` of an invoked event: ``invoke:<mode>:<target>:<who>``, printable ASCII
    (it travels in a bus header), ``who`` with anything else escaped."""
    return f"{_PREFIX}{mode}:{target}:{_printable(who)}"


def sync_rule_via(rule: str, who: str) -> str:
    """The ``via`` of an event a synchronous ``POST /events`` sent through the rule marked
    ``sync`` that it matched: ``http:sync:<rule>:<who>``."""
    return f"http:sync:{rule}:{_printable(who)}"


def _printable(who: str) -> str:
    clean = who.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in clean)


def invoked_target(via: str) -> str | None:
    """The target an asynchronous invocation's bus message is for, or None for any other
    message (which the rules route)."""
    if not via.startswith(_PREFIX + "async:"):
        return None
    target = via.split(":", 3)[2] if via.count(":") >= 3 else ""
    return target or None


class Refusal(StrEnum):
    """Why an invocation made no attempt."""

    UNKNOWN_TARGET = "unknown-target"
    TARGET_DISABLED = "target-disabled"
    CIRCUIT_OPEN = "circuit-open"
    BUSY = "busy"
    """The target's concurrency cap is full."""
    NO_REPLY = "no-reply"
    """A reply was asked of a target that cannot give one (request/reply is NATS's)."""
    NO_SYNC_RULE = "no-sync-rule"
    """A synchronous ``POST /events``: no rule marked ``sync`` matches the event."""
    SYNC_RULES = "several-sync-rules"
    """A synchronous ``POST /events``: several rules marked ``sync`` match the event."""
    SYNC_TRANSFORM = "sync-transform-failed"
    """A synchronous ``POST /events``: the transform of a rule marked ``sync`` that matches
    the event failed on it (too many values selected, say)."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """What became of one invocation: ``answer`` when an attempt was made, else ``refusal``
    with ``detail`` saying why and, for an open circuit or a full cap, ``retry_after``
    seconds. Neither: an asynchronous invocation is on the bus (``duplicate``: the bus held
    the same event for the same target already, within its duplicate window, and dropped it)."""

    target: str
    answer: Answer | None = None
    refusal: Refusal | None = None
    detail: str | None = None
    retry_after: float | None = None
    duplicate: bool = False


_BUSY_RETRY_AFTER = 1.0
_TOKEN_WAIT = 1.0
"""Seconds a synchronous invocation waits for its target's rate-limit token, then 429."""
_AUDIT_WAIT = 5.0
"""Seconds an invocation waits for room in a full audit buffer (PostgreSQL not taking rows)
before it is refused (503, nothing sent): the caller waited until the database came back."""

log = logging.getLogger("eventbus.delivery")


class Invoker:
    """Synchronous invocations of the ``targets`` behind ``dispatcher``'s guards."""

    def __init__(
        self, targets: Mapping[str, Target], dispatcher: Dispatcher, audit: AuditWriter
    ) -> None:
        self._targets = targets
        self._dispatcher = dispatcher
        self._audit = audit

    def refusal(self, target: str) -> Invocation | None:
        """Why ``target`` cannot be invoked at all (unknown, disabled), or None."""
        if target not in self._targets:
            return Invocation(
                target, refusal=Refusal.UNKNOWN_TARGET, detail=f"no target {target!r}"
            )
        why = self._dispatcher.disabled(target)
        if why is not None:
            detail = (
                f"target {target!r} is disabled ({why}); POST /targets/{target}/enable "
                f"(eventbus targets enable {target})"
            )
            return Invocation(target, refusal=Refusal.TARGET_DISABLED, detail=detail)
        return None

    async def invoke(
        self,
        event: dict[str, Any],
        target: str,
        *,
        via: str,
        reply: bool = False,
        route: Route | None = None,
    ) -> Invocation:
        """Send ``event`` to ``target`` once and return its answer, or why nothing was sent;
        with ``reply``, as a request whose reply is the answer (a ``Requester`` target only).
        With ``route`` (a rule marked ``sync`` matched the event; ``target`` is its target),
        the route's payload is sent and the rows name its rule instead of the pseudo-rule.

        Audits the event (accepted ``via``), the match and the attempt (or the refusal) unless
        the target is unknown; the rows are committed with the writer's next batch. Raises
        StoreError once the audit writer is closed, StoreUnavailable when its buffer stays
        full for :data:`_AUDIT_WAIT` s before the call (nothing sent); the attempt's row of a
        call made is left out, and logged, when the buffer stays full that long after it."""
        rule = invoke_rule(target) if route is None else route.rule
        payload: Any = event if route is None else route.payload
        is_cloudevent = route is None or route.is_cloudevent
        refused = self.refusal(target)
        if refused is not None and refused.refusal is Refusal.UNKNOWN_TARGET:
            return refused
        adapter = self._targets[target]
        if reply and not isinstance(adapter, Requester):
            detail = f"target {target!r} cannot be invoked for a reply: NATS targets only"
            return Invocation(target, refusal=Refusal.NO_REPLY, detail=detail)
        # one bound for the rows before the call: each waited its own 5 s
        loop = asyncio.get_running_loop()
        until = loop.time() + _AUDIT_WAIT
        await self._audit.event_accepted(event, via=via, within=_AUDIT_WAIT)
        await self._audit.rule_matched(event, rule, target, within=max(0.0, until - loop.time()))
        if refused is not None:
            await self._refused(event, rule, refused)
            return refused
        guard = self._dispatcher.guard(target)
        probe = False  # this call is the half-open circuit's probe
        if guard is not None:
            admission = guard.admit()
            probe = guard.state == "half-open"
            if not admission.allowed:
                refused = Invocation(
                    target,
                    refusal=Refusal.CIRCUIT_OPEN,
                    detail=f"the circuit of target {target!r} is open",
                    retry_after=admission.reopen_in,
                )
                await self._refused(event, rule, refused)
                return refused
            try:
                async with asyncio.timeout(_TOKEN_WAIT):
                    await guard.wait_turn()
            except TimeoutError:
                # An API gateway's throttle answers at once; the callers had queued without
                # bound (six at once on a 1/s target waited up to 5 s).
                detail = f"target {target!r} is at its rate_limit"
                return await self._busy(event, rule, target, detail)
        started = time.perf_counter()
        try:
            # the slots the dispatcher's deliveries take too: one of them that has its slot
            # never waits inside the target behind a call (unsent, it was audited as cut off
            # at a stop, and went out past a circuit opened meanwhile)
            async with self._dispatcher.slot_now(target) as free:
                with self._dispatcher.delivering(target):
                    if not free:
                        cap = self._dispatcher.concurrency_of(target)
                        full = f"concurrency cap of {cap} requests reached"
                        busy = Outcome(
                            delivered=False,
                            status=None,
                            duration_ms=0.0,
                            error=full,
                            retryable=True,
                            retry_after=None,
                        )
                        answer = Answer(busy, busy=True)
                    elif reply:
                        assert isinstance(adapter, Requester)
                        answer = await adapter.request(event, payload, is_cloudevent=is_cloudevent)
                    elif isinstance(adapter, Invocable):
                        answer = await adapter.invoke(event, payload, is_cloudevent=is_cloudevent)
                    else:
                        outcome = await adapter.deliver(
                            event, payload, is_cloudevent=is_cloudevent, attempt=1
                        )
                        answer = Answer(outcome)
        except BaseException as exc:
            if guard is not None:
                guard.record(False)  # never leave a half-open probe outstanding
            if isinstance(exc, asyncio.CancelledError):
                # The call was cut off (the server's shutdown outlasted router.shutdown_grace):
                # the request may have reached the function, so the trail says so.
                self._cut_off(event, rule, target, (time.perf_counter() - started) * 1000)
            raise
        if answer.busy:
            if guard is not None:
                guard.release()
            detail = f"target {target!r}: {answer.outcome.error}"
            return await self._busy(event, rule, target, detail)
        outcome = answer.outcome
        if guard is not None:
            if reply and not outcome.delivered:
                # No responder, or one slow or failing, says nothing of the server that
                # takes the target's publishes: counted, they opened the circuit of the rule
                # deliveries and invocations of a healthy subject. Neither way, then: a probe
                # lets the next one probe.
                if probe:
                    guard.release()
            else:
                guard.settle(outcome)  # as for rule deliveries
            if guard.reclosed():  # this call was the probe that closed the circuit
                await self._dispatcher.release_parked(target)
        result = AttemptOutcome.DELIVERED if outcome.delivered else AttemptOutcome.FAILED
        metrics.DELIVERIES.labels(target, result.value).inc()
        metrics.DELIVERY_SECONDS.labels(target).observe(outcome.duration_ms / 1000)
        made = Attempt(
            event=event,
            rule=rule,
            target=target,
            number=1,
            outcome=result,
            status=outcome.status,
            duration_ms=outcome.duration_ms,
            error=outcome.error,
        )
        try:
            await self._audit.attempt(made, within=_AUDIT_WAIT)
        except StoreUnavailable as exc:
            # The call was made: its answer is the caller's (a 503 now, and the caller's
            # retry called the function again), its row is not (the log has it).
            log.warning(
                "the attempt of %s (source %r, id %r) is not audited: %s",
                target,
                event.get("source"),
                event.get("id"),
                exc,
            )
        return Invocation(target, answer=answer)

    def _cut_off(self, event: dict[str, Any], rule: str, target: str, duration_ms: float) -> None:
        """Audit and count an attempt cancelled before the target answered. Nothing waits for
        its row in a full buffer: the task is ending; a closed writer is left as it is."""
        metrics.DELIVERIES.labels(target, AttemptOutcome.FAILED.value).inc()
        self._audit.attempt_nowait(
            Attempt(
                event=event,
                rule=rule,
                target=target,
                number=1,
                outcome=AttemptOutcome.FAILED,
                duration_ms=duration_ms,
                error=CUT_OFF,
            )
        )

    async def _busy(self, event: dict[str, Any], rule: str, target: str, detail: str) -> Invocation:
        """Refuse (429, ``Retry-After``) and audit an invocation ``target`` has no room for."""
        refused = Invocation(
            target, refusal=Refusal.BUSY, detail=detail, retry_after=_BUSY_RETRY_AFTER
        )
        await self._refused(event, rule, refused)
        return refused

    async def _refused(self, event: dict[str, Any], rule: str, refused: Invocation) -> None:
        metrics.DELIVERIES.labels(refused.target, AttemptOutcome.REFUSED.value).inc()
        await self._audit.attempt(
            Attempt(
                event=event,
                rule=rule,
                target=refused.target,
                number=0,
                outcome=AttemptOutcome.REFUSED,
                error=refused.detail,
            ),
            within=_AUDIT_WAIT,
        )
