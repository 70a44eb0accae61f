"""The router: consumes the durable bus, matches each event against the compiled rules and hands
every matched route to the dispatcher; acknowledges a bus message only once every one of its
deliveries is done or durably recorded (guarantee 2) and its audit rows are committed
(guarantee 7).

    bus.messages() ─> Router.handle ─> accepted row ─> RuleSet.route (pure)
        ─> Dispatcher.dispatch x routes ─> audit flush ─> ack
                  └─ an asynchronous invocation (via ``invoke:async:<target>:...``): its one
                     target instead of the rules (``eventbus.delivery.invoked_target``)
                  └─ not a CloudEvent ─> set aside (source_dead_letters, source "bus") ─> ack

The accepted row is written here, on the consuming side, rather than where the event came in:
a crash between the bus and the audit then only means a redelivery, which records the event
again under the same bus message (``ref``), a no-op. The router never routes a message that is
not a valid CloudEvent, whoever managed to write it to the bus.

Watchers (the console's live stream) see what the router did through the
:class:`~eventbus.router._feed.LiveFeed`, which never waits: with no watcher the cost is one
attribute test per event. A delivery that ends later, from the retry schedule, reaches them
too (``Router.retried``): otherwise its event's row would say ``retrying`` for good.

Memory is bounded by the bus: it never yields more than ``max_in_flight`` un-acknowledged
messages, and the router runs at most that many handlers. A handler that fails (Postgres down
while recording an outcome) naks its message so the bus redelivers it later; nothing is acked
that is not done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eventbus import metrics
from eventbus._errors import EventBusError, FailureRun
from eventbus._tasks import cancel_and_wait, stop_if_cancelled, stop_with_grace
from eventbus.bus import Bus, BusMessage
from eventbus.delivery import Delivery, DeliveryKind, Dispatcher, invoke_rule, invoked_target
from eventbus.router._feed import LiveFeed, Routed
from eventbus.rules import Route, RuleSetHolder, routing
from eventbus.store import AttemptOutcome, AuditWriter

__all__ = ["Router"]

log = logging.getLogger("eventbus.router")


def _state(outcome: AttemptOutcome | None) -> str:
    """A delivery's state on the live feed, from what became of its latest attempt."""
    if outcome is AttemptOutcome.DEAD_LETTERED:
        return "dead-lettered"
    if outcome is AttemptOutcome.DELIVERED:
        return "delivered"
    return "retrying"  # a retry scheduled, or parked behind an open circuit


def _settled(states: list[str]) -> str:
    """One state for all the deliveries of an event: the worst of them."""
    if "dead-lettered" in states:
        return "dead-lettered"
    if all(state == "delivered" for state in states):
        return "delivered"
    return "retrying"


_HEALTHY_AFTER = 10.0
"""Seconds the bus consumer must run without failing to end a run of failures."""


def _past(moment: float, seconds: float) -> bool:
    return time.monotonic() - moment > seconds


class Router:
    """Pulls bus messages and routes them until ``stop()``; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        rules: RuleSetHolder,
        dispatcher: Dispatcher,
        audit: AuditWriter,
        set_aside: Callable[[bytes, str, dict[str, Any]], Awaitable[None]],
        *,
        nak_delay: float = 2.0,
        progress_every: float = 10.0,
        feed: LiveFeed | None = None,
    ) -> None:
        self._bus = bus
        self._rules = rules
        self._dispatcher = dispatcher
        self._audit = audit
        self._set_aside_input = set_aside
        self._nak_delay = nak_delay
        self._progress_every = progress_every
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._handling: dict[BusMessage, float] = {}
        self._feed = feed or LiveFeed()
        self._failures = FailureRun()  # the bus consumer's, in a row
        self._attempt_started = 0.0

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run(), name="eventbus-router")
        self._keeper = asyncio.create_task(self._keep_alive(), name="eventbus-router-keepalive")

    def health(self, stall_after: float = 5.0) -> tuple[bool, str]:
        """``(True, "ok")`` while the bus consumer runs; ``(False, why)`` once it has failed
        again and again for ``stall_after`` seconds (readiness reads this: events are taken
        and answered 202, and none is routed). An attempt that has run ``_HEALTHY_AFTER``
        seconds without failing, or received a message, ends such a run of failures."""
        since = self._failures.since
        if since is None:
            return True, "ok"
        if self._attempt_started > since and _past(self._attempt_started, _HEALTHY_AFTER):
            return True, "ok"
        failing = self._failures.longer_than(stall_after)
        if failing is None:
            return True, "ok"
        return False, f"the bus consumer failing for {failing:.0f} s: {self._failures.last}"

    async def _run(self) -> None:
        while True:
            self._attempt_started = time.monotonic()
            try:
                async for msg in self._bus.messages():
                    if self._failures.since is not None:  # (per message: a load, no call)
                        self._failures.ended()
                    task = asyncio.create_task(self.handle(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The consumer broke (broker restarted, connection lost): back off and resume;
                # everything not acked is redelivered by the bus. (Unless the failure was a
                # cancellation a client library turned into an error.)
                stop_if_cancelled()
                log.exception("bus consumer failed; resuming in 1 s")
                # after a long enough attempt, the first of a new run
                self._failures.failed(exc, new=_past(self._attempt_started, _HEALTHY_AFTER))
                await asyncio.sleep(1.0)

    async def handle(self, msg: BusMessage) -> None:
        """Route one message; ack when all its deliveries are done or durably recorded and
        its audit rows are committed (waiting out a database outage meanwhile).

        Never raises: a failure naks the message so that the bus redelivers it later."""
        event = msg.event
        metrics.EVENTS_ROUTED.inc()
        self._handling[msg] = time.monotonic()
        try:
            if msg.rejected is not None:
                await self._set_aside(msg, msg.rejected)
            else:
                await self._route(msg)
        except asyncio.CancelledError:
            # Shutdown past the grace period: leave it un-acked, the bus redelivers it.
            raise
        except Exception as exc:
            if isinstance(exc, EventBusError | OSError):
                log.warning(
                    "routing %s/%s failed, redelivering later: %s",
                    event.get("source"),
                    event.get("id"),
                    exc,
                )
            else:
                log.exception(
                    "routing %s/%s failed unexpectedly, redelivering later",
                    event.get("source"),
                    event.get("id"),
                )
            # back off per redelivery, so a long outage is not a hot loop
            delay = min(self._nak_delay * 2 ** min(msg.deliveries - 1, 5), 60.0)
            await self._settle(msg.nak(delay))
            return
        finally:
            self._handling.pop(msg, None)
        await self._settle(msg.ack())

    async def _route(self, msg: BusMessage) -> None:
        event = msg.event
        await self._audit.event_accepted(
            event, via=msg.via, received_at=msg.published_at, ref=msg.ref, size=len(msg.payload)
        )
        target = invoked_target(msg.via)
        if target is None:
            routes = await routing(self._rules.current, len(msg.payload), lambda r: r.route(event))
        else:
            # An asynchronous invocation: that target alone, whatever the rules say.
            routes = [Route(invoke_rule(target), target, event, True, None)]
        for route in routes:
            await self._audit.rule_matched(event, route.rule, route.target)
        feed = self._feed if self._feed.watched else None
        if feed is not None:
            received = msg.published_at.isoformat()
            rules = tuple(dict.fromkeys(route.rule for route in routes))
            started = tuple((route.rule, route.target, "routing") for route in routes)
            state = "routing" if routes else "unmatched"
            feed.publish(Routed(event, received, rules, state, started))
        if routes:
            metrics.EVENTS_MATCHED.inc()
            if len(routes) == 1:  # the common case, without gather's task and loop turn
                outcomes = [await self._dispatcher.dispatch(event, routes[0], msg.ref)]
            else:
                # Every route runs to its end before one's failure naks the message: a plain
                # gather returned at the first exception, the others running on untracked (the
                # shutdown's grace neither waited for them nor stopped them).
                results = await asyncio.gather(
                    *(self._dispatcher.dispatch(event, route, msg.ref) for route in routes),
                    return_exceptions=True,
                )
                outcomes = []
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                    outcomes.append(result)
            if feed is not None:
                states = [_state(outcome) for outcome in outcomes]
                ended = tuple(
                    (route.rule, route.target, state)
                    for route, state in zip(routes, states, strict=True)
                )
                feed.publish(Routed(event, received, rules, _settled(states), ended))
        # Not urgent: the ack can wait for the writer's next batch (the delivery is done), and
        # a thousand messages in flight then share a few large COPYs instead of many small ones.
        await self._audit.flush(urgent=False)

    def retried(self, job: Delivery) -> None:
        """A delivery from the retry schedule ran (``RetryWorker.ran``): when it ended
        (delivered or dead-lettered), tell watchers, as an update of its event's row. A
        follow-up (a dead-letter copy, a destination) is not a delivery of that event."""
        if not self._feed.watched or job.kind is not DeliveryKind.ROUTE:
            return
        state = _state(job.last_outcome)
        if state != "retrying":
            delivery = (job.rule, job.target, state)
            self._feed.publish(Routed(job.event, None, (job.rule,), state, (delivery,)))

    async def _set_aside(self, msg: BusMessage, why: str) -> None:
        metrics.BUS_REJECTED.inc()
        log.error("bus message %s set aside: %s", msg.ref, why)
        meta = {"ref": msg.ref, "via": msg.via, "published_at": msg.published_at.isoformat()}
        await self._set_aside_input(msg.payload, why, meta)

    async def _keep_alive(self) -> None:
        """Tell the bus about messages still being handled after ``progress_every`` seconds: a
        delivery slower than the bus's ack wait must not be redelivered to another consumer
        meanwhile. One loop for all messages, not a timer per message."""
        while True:
            await asyncio.sleep(self._progress_every / 2)
            old = time.monotonic() - self._progress_every
            for msg in [m for m, since in self._handling.items() if since <= old]:
                await msg.in_progress()

    async def _settle(self, op: Awaitable[None]) -> None:
        try:
            await op
        except Exception as exc:
            # The bus connection dropped: the message stays un-acked and is redelivered.
            log.warning("could not settle a bus message: %s", exc)

    async def stop(self, grace: float, hurry: asyncio.Event | None = None) -> int:
        """Stop pulling, let in-flight handlers finish for up to ``grace`` seconds (or until
        ``hurry`` is set), then cancel the rest (their messages stay un-acked and are
        redelivered); returns how many were."""
        late = await stop_with_grace(self._pump, self._tasks, grace, hurry)
        # Last: messages still being handled during the grace period need their progress reports.
        await cancel_and_wait(self._keeper)
        return late
