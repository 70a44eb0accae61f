"""The three ledgers of a chaos run, and their reconciliation.

A chaos test publishes a stream of events into a real ``eventbus serve`` while it injects one
fault, lets the system settle, then compares what three independent witnesses saw:

    (a) the publisher   :class:`Publisher`    ids answered 202 (and the ones never accepted)
    (b) the function    :func:`receipts`      every CloudEvent id the endpoint received, when
    (c) PostgreSQL      :class:`AuditLedger`  ``events`` rows, ``attempts`` delivered rows,
                                              ``dead_letters``, pending ``delivery_retries``

:func:`reconcile` turns them into a :class:`Report` that fails on: an accepted event neither
delivered nor dead-lettered, an accepted event without its ``events`` row, a received event
without its delivered attempt row (or the other way round), an event never accepted although
the service was meant to recover, and duplicates the at-least-once contract does not explain.

A duplicate receipt is explained when it straddles the fault: the id was first received before
the system was whole again and once more after the fault began (redelivery of a message that
was un-acknowledged, or of a request cut off, when the fault struck). Their number is bounded by
what can be in flight at once: each message a process holds un-acknowledged
(``bus.max_in_flight``) can be sent once more after the fault. On Kafka (``republishes``) the
bound also takes the messages acknowledged since the last commit of offsets, and an event whose
publish was ambiguous (the connection cut before the answer, sent again) may be stored twice,
for Kafka keeps no duplicate window: its second receipt is explained too, and counted apart.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import standardwebhooks

from tests.fixtures.receiver import Receiver
from tests.fixtures.wait import eventually

__all__ = [
    "SOURCE",
    "AuditLedger",
    "Fault",
    "Publisher",
    "Report",
    "receipts",
    "reconcile",
    "settle",
]

SOURCE = "tests/chaos"
_RETRY_AFTER_CAP = 0.5  # seconds: a 503's Retry-After is honoured up to this, to keep runs short
_REFUSED_PAUSE = 0.1  # seconds between tries while nothing listens (the service restarts)
_REQUEST_TIMEOUT = 15.0


def _event(event_id: str, i: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": "chaos.tick",
        "datacontenttype": "application/json",
        "data": {"i": i},
    }


class Publisher:
    """Ledger (a): publishes ``count`` events to ``url/events`` at ``rate`` per second from
    ``senders`` concurrent senders, one structured CloudEvent per request.

    An event is sent until it is answered 202: a 503 is retried after its ``Retry-After``
    (capped), a refused connection (the service is restarting) after a short pause. An event not
    accepted within ``give_up_after`` seconds, or answered anything else, is given up; after
    the first one the remaining events are not sent at all, so a service that does not recover
    fails the test quickly rather than at the test's timeout.
    """

    def __init__(
        self,
        url: str,
        count: int,
        *,
        rate: float,
        senders: int = 8,
        give_up_after: float = 30.0,
        hook: tuple[str, str] | None = None,
    ) -> None:
        """``hook``: (name, Standard Webhooks secret) to send each event as a signed webhook
        to ``url/hooks/<name>`` (its ``webhook-id`` the event's id) instead of a CloudEvent."""
        self.url = url + "/events" if hook is None else f"{url}/hooks/{hook[0]}"
        self.hook = None if hook is None else standardwebhooks.Webhook(hook[1])
        self.ids = [f"chaos-{i}" for i in range(count)]
        self.rate = rate
        self.senders = senders
        self.give_up_after = give_up_after
        self.accepted: set[str] = set()
        self.given_up: dict[str, str] = {}
        """Ids never accepted, with the last answer or error."""
        self.ambiguous: set[str] = set()
        """Ids with a request that broke after it was sent: it may be on the bus (harmless: the
        bus drops a republished id inside its duplicate window)."""
        self.unavailable = 0
        """503 answers seen (each retried)."""
        self.unsent = 0
        self._progress = asyncio.Event()
        self._stop = False

    async def run(self) -> None:
        """Publish the whole stream; returns when every event was accepted or given up."""
        start = time.monotonic()
        todo = iter(enumerate(self.ids))
        timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await asyncio.gather(
                    *(self._sender(session, todo, start) for _ in range(self.senders))
                )
        finally:
            self._stop = True
            self._progress.set()

    async def _sender(
        self,
        session: aiohttp.ClientSession,
        todo: Iterator[tuple[int, str]],
        start: float,
    ) -> None:
        for i, event_id in todo:
            if self._stop:
                self.unsent += 1
                continue
            # a steady rate: event i is due i/rate seconds into the run, whoever sends it
            await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            await self._send(session, event_id, i)

    def _request(self, event_id: str, i: int) -> tuple[bytes, dict[str, str]]:
        if self.hook is None:
            return orjson.dumps(_event(event_id, i)), {
                "Content-Type": "application/cloudevents+json"
            }
        body = orjson.dumps({"i": i})
        moment = datetime.now(UTC)  # signed afresh for each try: the window is 5 minutes
        return body, {
            "Content-Type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": self.hook.sign(event_id, moment, body.decode()),
        }

    async def _send(self, session: aiohttp.ClientSession, event_id: str, i: int) -> None:
        deadline = time.monotonic() + self.give_up_after
        while True:
            body, headers = self._request(event_id, i)
            try:
                async with session.post(self.url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    if resp.status == 202:
                        self.accepted.add(event_id)
                        self._progress.set()
                        return
                    last = f"{resp.status} {answer[:300].decode(errors='replace')}"
                    if resp.status != 503:
                        break  # not an outage: retrying will not help
                    self.unavailable += 1
                    pause = min(float(resp.headers.get("Retry-After", "1")), _RETRY_AFTER_CAP)
            except aiohttp.ClientConnectorError as exc:
                last, pause = f"cannot connect: {exc}", _REFUSED_PAUSE
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.ambiguous.add(event_id)
                last, pause = f"request broke: {exc!r}", _REFUSED_PAUSE
            if time.monotonic() + pause > deadline:
                break
            await asyncio.sleep(pause)
        self.given_up[event_id] = last
        self._stop = True

    async def wait_accepted(self, n: int, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Wait until ``n`` events were accepted. Raises AssertionError if the run ends first,
        TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while len(self.accepted) < n:
                if self._stop:
                    raise AssertionError(
                        f"the publisher stopped after {len(self.accepted)} of {n} accepted "
                        f"events: {self.given_up}"
                    )
                self._progress.clear()
                await self._progress.wait()


def receipts(receiver: Receiver) -> tuple[dict[str, list[float]], int]:
    """Ledger (b): when each CloudEvent id reached the endpoint, and how many requests were
    not a single CloudEvent."""
    seen: dict[str, list[float]] = {}
    garbled = 0
    for request in receiver.requests:
        if request.cloudevent is None:
            garbled += 1
            continue
        seen.setdefault(str(request.cloudevent["id"]), []).append(request.at)
    return seen, garbled


@dataclass(frozen=True)
class AuditLedger:
    """Ledger (c): what the service recorded in PostgreSQL about the chaos events."""

    accepted: Counter[str]
    """``events`` rows per id."""
    delivered: Counter[str]
    """``attempts`` rows with outcome ``delivered`` per id."""
    undelivered_attempts: int
    """``attempts`` rows with any other outcome (failed, retry-scheduled, ...)."""
    dead_lettered: frozenset[str]
    pending_retries: int

    @classmethod
    async def read(cls, dsn: str) -> AuditLedger:
        conn = await asyncpg.connect(dsn)
        try:
            events = await conn.fetch(
                "SELECT id, count(*) AS n FROM events WHERE source = $1 GROUP BY id", SOURCE
            )
            delivered = await conn.fetch(
                "SELECT id, count(*) AS n FROM attempts"
                " WHERE source = $1 AND outcome = 'delivered' GROUP BY id",
                SOURCE,
            )
            undelivered = await conn.fetchval(
                "SELECT count(*) FROM attempts WHERE source = $1 AND outcome <> 'delivered'",
                SOURCE,
            )
            dead = await conn.fetch(
                "SELECT DISTINCT event_id FROM dead_letters WHERE event_source = $1", SOURCE
            )
            pending = await conn.fetchval(
                "SELECT count(*) FROM delivery_retries WHERE event_source = $1", SOURCE
            )
        finally:
            await conn.close()
        return cls(
            Counter({r["id"]: r["n"] for r in events}),
            Counter({r["id"]: r["n"] for r in delivered}),
            int(undelivered),
            frozenset(r["event_id"] for r in dead),
            int(pending),
        )


@dataclass(frozen=True)
class Fault:
    """What was done, from when the fault began until the system was whole again
    (``time.monotonic()`` of the test process, like the receipts)."""

    name: str
    began: float
    ended: float


def _sample(ids: set[str] | frozenset[str]) -> str:
    return ", ".join(sorted(ids, key=lambda s: (len(s), s))[:5])


@dataclass
class Report:
    """The reconciliation: counts for the assertion message, and every broken promise."""

    fault: Fault
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        numbers = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{self.fault.name}: {numbers}"

    def check(self) -> None:
        """Raise AssertionError with the summary and every problem, if there is one."""
        if self.problems:
            raise AssertionError("\n  ".join([self.summary(), *self.problems]))


def reconcile(
    publisher: Publisher,
    receiver: Receiver,
    audit: AuditLedger,
    fault: Fault,
    *,
    max_in_flight: int,
    republishes: bool = False,
) -> Report:
    """Compare the three ledgers (see the module docstring). ``max_in_flight``: how many
    messages the fault may have caused to be delivered again; ``republishes``: the bus stores
    an event sent twice twice (Kafka)."""
    report = Report(fault)
    problem = report.problems.append
    seen, garbled = receipts(receiver)
    accepted = publisher.accepted
    received = set(seen)
    published = set(publisher.ids)
    if publisher.given_up:
        some = dict(itertools.islice(publisher.given_up.items(), 3))
        problem(
            f"{len(publisher.given_up)} events never accepted (the service did not recover), "
            f"{publisher.unsent} not sent after that; e.g. {some}"
        )
    lost = accepted - received - audit.dead_lettered
    if lost:
        problem(f"{len(lost)} accepted events neither delivered nor dead-lettered: {_sample(lost)}")
    no_row = accepted - set(audit.accepted)
    if no_row:
        problem(f"{len(no_row)} accepted events without their `events` row: {_sample(no_row)}")
    unaudited = received - set(audit.delivered)
    if unaudited:
        problem(
            f"{len(unaudited)} received events without an attempt row `delivered`: "
            f"{_sample(unaudited)}"
        )
    phantom = set(audit.delivered) - received
    if phantom:
        problem(f"{len(phantom)} events audited as delivered never reached the endpoint")
    strangers = received - published
    if strangers or garbled:
        problem(f"the endpoint got {garbled} garbled requests and unknown ids {_sample(strangers)}")
    if audit.pending_retries:
        problem(f"{audit.pending_retries} deliveries still wait in the retry schedule")
    explained = unexplained = republished = 0
    odd: set[str] = set()
    for event_id, times in seen.items():
        if len(times) < 2:
            continue
        if republishes and event_id in publisher.ambiguous and len(times) == 2:
            republished += 1
        elif min(times) <= fault.ended and max(times) >= fault.began:
            explained += len(times) - 1
        else:
            unexplained += len(times) - 1
            odd.add(event_id)
    if unexplained:
        problem(f"{unexplained} duplicate receipts outside the fault window: {_sample(odd)}")
    if explained > max_in_flight:
        problem(
            f"{explained} duplicate receipts across the fault, more than the {max_in_flight} "
            "messages a process may hold un-acknowledged"
        )
    report.counts = {
        "published": len(published),
        "accepted": len(accepted),
        "503s": publisher.unavailable,
        "ambiguous sends": len(publisher.ambiguous),
        "stored twice": republished,
        "received": len(received),
        "receipts": sum(len(t) for t in seen.values()),
        "receipts after the fault began": sum(t >= fault.began for ts in seen.values() for t in ts),
        "explained duplicates": explained,
        "unexplained duplicates": unexplained,
        "dead-lettered": len(audit.dead_lettered),
        "events rows": sum(audit.accepted.values()),
        "delivered attempt rows": sum(audit.delivered.values()),
        "other attempt rows": audit.undelivered_attempts,
        "lost": len(lost),
        "missing events rows": len(no_row),
        "missing attempt rows": len(unaudited),
    }
    return report


async def settle(
    publisher: Publisher,
    receiver: Receiver,
    dsn: Callable[[], str],
    *,
    deliver_within: float,
    audit_within: float,
) -> None:
    """Wait for the run to settle, on definite signals, polling the live database.

    First (up to ``deliver_within`` seconds) until every accepted event was received or
    dead-lettered and no retry is pending; then (up to ``audit_within`` more) until every
    accepted event has its ``events`` row and every received one its delivered attempt row:
    a message still un-acknowledged is redelivered within the bus's ack wait, and its rows come
    with it. Returns either way: :func:`reconcile` names whatever is still missing.
    """
    if publisher.given_up:
        return  # already failed: the service did not recover, and waiting will not change it

    def delivered(audit: AuditLedger, seen: dict[str, list[float]]) -> bool:
        ended = publisher.accepted <= set(seen) | audit.dead_lettered
        return ended and audit.pending_retries == 0

    def audited(audit: AuditLedger, seen: dict[str, list[float]]) -> bool:
        return publisher.accepted <= set(audit.accepted) and set(seen) <= set(audit.delivered)

    async def holds(done: Callable[[AuditLedger, dict[str, list[float]]], bool]) -> bool:
        return done(await AuditLedger.read(dsn()), receipts(receiver)[0])

    for done, within in ((delivered, deliver_within), (audited, audit_within)):
        try:
            await eventually(functools.partial(holds, done), within=within, every=0.25)
        except AssertionError:
            return  # reconcile() names whatever is still missing
