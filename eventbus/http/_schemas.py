"""The bodies the HTTP edge answers with, as the OpenAPI document (``GET /openapi.json``) shows
them.

Where it sits: documentation only. The handlers of ``_api`` and ``_ingest`` build their bodies
as plain JSON (orjson, no validation on the way out); these models describe those bodies, and
``tests/http/test_openapi.py`` checks real answers against them (``extra="forbid"``) so the
document cannot drift from what the service says.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "Accepted",
    "BatchAccepted",
    "BrokerAck",
    "CloudEvent",
    "DeadLetter",
    "DeadLetterPage",
    "DeadLetterSummary",
    "Enabled",
    "EventPage",
    "EventSummary",
    "EventTrail",
    "InvocationAccepted",
    "Liveness",
    "ProblemDetails",
    "Purged",
    "Readiness",
    "Reloaded",
    "Replayed",
    "Retries",
    "Rules",
    "SourceDeadLetters",
    "Sources",
    "Targets",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProblemDetails(_Body):
    """An error answer (RFC 9457, ``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


class Accepted(_Body):
    """One event is on the durable bus. ``duplicate``: the bus already held its source+id
    (stored within the duplicate window), so this copy is not delivered again."""

    id: str
    source: str
    duplicate: bool


class BatchEntry(_Body):
    """One entry of a batch: ``status`` 202 (on the bus; ``duplicate`` as in
    :class:`Accepted`), 4xx (invalid), 500 or 503 (``error`` says why)."""

    status: int
    id: str | None = None
    source: str | None = None
    duplicate: bool | None = None
    error: str | None = None


class BatchAccepted(_Body):
    """The outcome of every entry of a batch, in order (207 when any failed); ``duplicates``
    counts the entries answered as duplicates."""

    failed: int
    duplicates: int
    entries: list[BatchEntry]


class Match(_Body):
    rule: str
    target: str
    at: str


class Attempt(_Body):
    rule: str
    target: str
    attempt: int
    outcome: str
    status: int | None
    duration_ms: float
    error: str | None
    at: str


class EventKey(_Body):
    source: str
    id: str


class CausedEvent(_Body):
    """An event a function answered with (a reply), as accepted on the bus."""

    source: str | None
    id: str | None
    type: str | None
    received_at: str
    via: str


class EventTrail(_Body):
    """An event as first accepted, every rule it matched and every delivery attempt (a
    destination's delivery among them, its rule ``<rule>#on-success`` or ``#on-failure``);
    ``cause``: the event it answers, when it is a function's reply (null otherwise);
    ``caused``: the replies that answer it (the first 100); ``truncated``: the matches or the
    attempts are only their latest 1,000."""

    event: dict[str, Any]
    received_at: str
    via: str
    matches: list[Match]
    attempts: list[Attempt]
    cause: EventKey | None
    caused: list[CausedEvent]
    truncated: bool


class EventSummary(_Body):
    """An accepted event as a search lists it: its attributes (null where it had none),
    ``time`` its own ``time`` attribute, ``received_at`` when the bus stored it, ``via`` how it
    came in, ``size`` its bytes; ``GET /events/trail`` gives the whole event."""

    source: str | None
    id: str | None
    type: str | None
    subject: str | None
    time: str | None
    received_at: str
    via: str
    size: int | None


class EventPage(_Body):
    """One page of accepted events, newest first; ``next_after`` gives the next page (null:
    the last one)."""

    items: list[EventSummary]
    next_after: str | None


class Rule(_Body):
    name: str
    description: str
    enabled: bool
    targets: list[str]
    file: str
    line: int | None
    definition: dict[str, Any]


class Rules(_Body):
    """The rules routing now, in load order."""

    fingerprint: str
    """A short hash of the rules as written: instances showing the same one route alike"""
    rules: list[Rule]


class Reloaded(_Body):
    """How many rules the new rule set holds."""

    rules: int
    fingerprint: str
    """A short hash of the rules now routing (see ``Rules``)"""
    notes: list[str] = []
    """What changed in the connector files and waits for the next start (a reload reads
    them but changes no target): new or removed targets, changed delivery settings"""


class DeadLetterSummary(_Body):
    """A delivery that will not be retried, as the list of dead letters shows it."""

    id: int
    created_at: str
    event_source: str
    event_id: str
    event_type: str | None
    rule: str
    target: str
    attempts: int
    last_status: int | None
    final_error: str | None
    reason: str
    first_attempt_at: str
    replay_count: int


class DeadLetter(DeadLetterSummary):
    """A delivery that will not be retried, whole: the event, the payload, every attempt."""

    event: dict[str, Any]
    payload: Any
    is_cloudevent: bool
    delivery: dict[str, Any] | None
    history: list[dict[str, Any]]


class DeadLetterPage(_Body):
    """One page of dead letters, newest first; ``next_after`` gives the next page (null: the
    last one)."""

    items: list[DeadLetterSummary]
    next_after: int | None


class DeadLetterCount(_Body):
    """How many dead letters the filter selects now, and when the newest of them was written
    (null: none), and the highest id among them; ``since`` is the filter's as the server took
    it (a duration ago made a time by its clock, null without one). A replay or purge given the
    same filter with ``since`` as answered, ``through=last_id`` and ``expect=count`` acts on
    exactly those counted, or on none (409) when that is no longer the count."""

    count: int
    newest: str | None
    last_id: int | None
    since: str | None


class ReplayedItem(_Body):
    id: int
    event_source: str
    event_id: str
    rule: str
    target: str


class Replayed(_Body):
    """The dead letters moved back into the retry schedule, due now: ``count`` of them, the
    first 1,000 (oldest first) listed in ``replayed``; ``truncated`` when there were more."""

    replayed: list[ReplayedItem]
    count: int
    truncated: bool
    notes: list[str] = []
    """Targets among them this instance does not have (removed from the connector files): their
    retries wait in the schedule for an instance that has them"""
    missing: list[int] = []
    """Of the ids the request named (``id=``), those that had no dead letter"""


class PendingRetry(_Body):
    """A delivery waiting for its next attempt; ``claimed`` while an attempt is under way.
    ``waiting_for``: ``retry`` (backoff), ``circuit`` (the target's breaker is open), or
    ``replay`` (a dead letter replayed)."""

    id: int
    event_source: str
    event_id: str
    rule: str
    target: str
    attempts: int
    due_at: str
    waiting_for: str
    first_attempt_at: str
    claimed: bool
    last_status: int | None
    last_error: str | None


class Retries(_Body):
    """The pending retries, the next due first; ``total`` counts all of them, beyond
    ``limit`` too."""

    items: list[PendingRetry]
    total: int


class InvocationAccepted(_Body):
    """An asynchronous invocation is on the durable bus; it will be delivered to ``target``
    alone, with the target's retry policy and dead letters."""

    id: str
    source: str
    target: str


class BrokerAck(_Body):
    """A Kafka or NATS target's acknowledgement of a synchronous invocation: ``topic``,
    ``partition``, ``offset`` (Kafka); ``subject`` and, with JetStream, ``stream``, ``seq``,
    ``duplicate`` (NATS)."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    subject: str | None = None
    stream: str | None = None
    seq: int | None = None
    duplicate: bool | None = None


class Purged(_Body):
    purged: int


class Enabled(_Body):
    enabled: str
    was_disabled: bool
    """false: it was not disabled, and nothing changed"""


class TargetDisabled(_Body):
    reason: str
    """why, e.g. ``410 Gone at attempt 3``"""
    at: str | None
    """when it was disabled (ISO 8601; null while the database cannot be asked)"""


class Target(_Body):
    name: str
    type: str
    circuit: Literal["closed", "half-open", "open"] | None
    """the target's circuit breaker, the most open of the workers' (each keeps its own; null:
    none configured)"""
    disabled: TargetDisabled | None
    """set while the target is switched off after answering 410 Gone: deliveries to it are
    dead-lettered until ``POST /targets/{name}/enable``; null while it is on"""
    retries: int | None
    """its deliveries waiting in the retry schedule, every instance's (null while the
    database cannot be asked)"""


class Targets(_Body):
    targets: list[Target]


class SourceState(_Body):
    name: str
    type: str
    state: str
    events: int
    errors: int
    last_event_at: str | None
    last_error: str | None
    lag: float | int | None


class Sources(_Body):
    sources: list[SourceState]


class SourceDeadLetter(_Body):
    """Input a source could not turn into an event; the payload as text or base64."""

    id: int
    source: str
    received_at: str
    error: str
    meta: dict[str, Any]
    payload: str | None = None
    payload_base64: str | None = None
    payload_size: int
    """The payload's bytes, all of them (with ``payload_bytes``, fewer may be shown)."""


class SourceDeadLetters(_Body):
    items: list[SourceDeadLetter]


class Liveness(_Body):
    status: Literal["ok", "failed"]
    detail: str | None = None


class Readiness(_Body):
    bus: Literal["ok", "unreachable"]
    database: str
    """ok, unreachable, or which write has gone unanswered and for how long"""
    audit: str
    router: str
    """ok, or how long the bus consumer has been failing, and why"""
    retries: str
    """ok, or how long every pass of the retry worker has been failing, and why"""


class CloudEvent(BaseModel):
    """A CloudEvent in its JSON form (structured content mode); extension attributes are
    further top-level members."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    id: str
    source: str
    type: str
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Any = None
    data_base64: str | None = None
