"""What every delivery target shares: the ``Target`` protocol and the ``Outcome`` of one attempt.

Place in the pipeline: the router matches an event, transforms it, and hands the result to a
target's ``deliver``; the delivery layer turns the returned ``Outcome`` into an audit row, a
scheduled retry (``retryable``, ``retry_after``), a dead letter (``gone`` or not retryable), and
publishes ``reply`` back onto the bus. Delivery failures are values, never exceptions, so one
failing endpoint cannot unwind the router.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from eventbus._errors import MAX_ERROR_CHARS, truncate_error

__all__ = [
    "MAX_ERROR_CHARS",
    "Answer",
    "Capped",
    "Invocable",
    "Outcome",
    "Requester",
    "Target",
    "failure",
    "retryable_status",
    "send_once",
    "trace_attempt",
    "truncate_error",
]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt.

    ``delivered`` is True only for a 2xx answer. ``retryable`` says whether the same attempt may
    succeed later (timeouts, connection errors, 408, 429, 5xx); ``gone`` marks an endpoint that
    answered 410 and must not be tried again. ``retry_after`` is the delay in seconds the endpoint
    asked for (429/503 only). ``reply`` is a validated CloudEvent the function answered with.
    ``error`` is a short description (at most ``MAX_ERROR_CHARS``); None when delivered.
    ``timed_out`` marks an attempt that got no answer within the target's ``timeout``.
    ``unsent`` marks one that never left eventbus: its ``timeout`` passed while it waited for a
    connection of the HTTP client's shared pool (every one of them carrying a request, to this
    target or others). It says nothing of the target's health: a circuit breaker skips it.
    """

    delivered: bool
    status: int | None
    duration_ms: float
    error: str | None
    retryable: bool
    retry_after: float | None
    gone: bool = False
    reply: dict[str, Any] | None = None
    timed_out: bool = False
    unsent: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """What a synchronous invocation (``Target.invoke``) gives back to its caller.

    ``outcome`` is the attempt's ``Outcome``; ``content_type`` and ``body`` are the endpoint's
    answer as received (an HTTP function's response, at most 1 MiB) or, for a broker, its
    acknowledgement as JSON. ``headers`` are those of the answer its caller needs to act on
    it, passed on to a synchronous caller (an HTTP function's ``Location``,
    ``WWW-Authenticate``, ...).
    ``busy`` says that no attempt was made because the target's
    concurrency cap was full (``outcome`` then says so, retryable).
    """

    outcome: Outcome
    content_type: str | None = None
    body: bytes = b""
    busy: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


def retryable_status(status: int) -> bool:
    """Whether a function's error status may pass if the attempt is made again: a timeout or
    throttle (408, 429) or a server error (5xx); any other 4xx is the request's fault."""
    return status in (408, 429) or status >= 500


def failure(
    error: str,
    duration_ms: float,
    *,
    retryable: bool,
    timed_out: bool = False,
    unsent: bool = False,
) -> Outcome:
    """The ``Outcome`` of an attempt that got no status from the endpoint, ``error`` truncated."""
    return Outcome(
        delivered=False,
        status=None,
        duration_ms=duration_ms,
        error=truncate_error(error),
        retryable=retryable,
        retry_after=None,
        timed_out=timed_out,
        unsent=unsent,
    )


def trace_attempt(
    log: logging.Logger, target: str, event_id: Any, attempt: int, outcome: Outcome
) -> None:
    """Log a failed attempt at debug level; a delivered one is not logged (audit records both)."""
    if not outcome.delivered:
        log.debug(
            "target %s: event %s attempt %d failed: %s", target, event_id, attempt, outcome.error
        )


async def send_once(
    send: Callable[[], Awaitable[None]],
    *,
    errors: tuple[type[Exception], ...],
    outcome_from_error: Callable[[Exception, float], Outcome],
) -> Outcome:
    """Run ``send`` once, timed, and report it as an ``Outcome``.

    For transports without a status (Kafka, NATS): delivered when ``send`` returns; when it
    raises one of ``errors``, whatever ``outcome_from_error(exc, duration_ms)`` makes of it.
    Other exceptions propagate. ``send`` bounds itself (``asyncio.timeout``).
    """
    start = time.perf_counter()
    try:
        await send()
    except errors as exc:
        return outcome_from_error(exc, (time.perf_counter() - start) * 1000)
    return Outcome(
        delivered=True,
        status=None,
        duration_ms=(time.perf_counter() - start) * 1000,
        error=None,
        retryable=False,
        retry_after=None,
    )


class Target(Protocol):
    """A function endpoint (HTTP, Kafka topic, NATS subject) that events are delivered to.

    A target is opened with ``async with`` before the first ``deliver`` and closed after the last.
    """

    name: str

    async def deliver(
        self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool, attempt: int
    ) -> Outcome:
        """Deliver ``payload`` (a CloudEvent dict when ``is_cloudevent``, else any JSON value or
        str) on behalf of the original ``event``; ``attempt`` counts from 1.

        Never raises for a delivery failure: that is an ``Outcome`` with ``delivered=False``.
        """
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class Invocable(Protocol):
    """A target that returns the endpoint's answer to a synchronous invocation. Optional: a
    target without ``invoke`` is invoked through ``deliver``, and its answer has no body."""

    async def invoke(self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool) -> Answer:
        """One synchronous attempt, as ``deliver`` makes it, that also returns the endpoint's
        answer. Never waits for a concurrency slot: with the cap full it returns at once with
        ``busy`` set. Never raises for a delivery failure."""
        ...


@runtime_checkable
class Capped(Protocol):
    """A target that runs at most ``concurrency`` deliveries at once; more wait for a slot.
    The dispatcher sends what would wait on the router's path to the retry schedule instead."""

    @property
    def concurrency(self) -> int: ...


@runtime_checkable
class Requester(Protocol):
    """A target that can also be invoked for a reply (request/reply, as NATS offers it)."""

    async def request(self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool) -> Answer:
        """Send ``payload`` as a request and return the first reply as the answer's body.
        Never raises for a failure (no responder, timeout): those are the answer's outcome."""
        ...
