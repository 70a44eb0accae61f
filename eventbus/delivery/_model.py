"""The delivery model: what one delivery is, from the route that asked for it to the row that
records how it ended.

    Route (rules) ─> Delivery(kind=ROUTE) ─> dispatcher ─> delivered | retry row | dead letter
                        delivered ─────────> Delivery(kind=ON_SUCCESS) to the on_success target
                        dead letter ───────> Delivery(kind=DEAD_LETTER) to the dead_letter_target
                                         └─> Delivery(kind=ON_FAILURE) to the on_failure target

A follow-up (any kind but ``ROUTE``) has its own retries and dead letters but never starts
follow-ups of its own, so a failing destination cannot set off a chain.

Rows name a follow-up's rule ``<rule>#<kind>`` (``orders#dead-letter``) in the ``rule`` columns
of ``delivery_retries``, ``dead_letters`` and ``attempts``: the spelling rows have had from the
start. Keeping it (rather than adding a ``kind`` column) leaves existing rows valid without a
migration that rewrites the audit tables, keeps the dead-letter ``rule`` filter and SQL over
the trail meaning what they meant, and still reads plainly. Rule names cannot contain ``#``, so
the stored form is unambiguous; it is made by :attr:`Delivery.stored_rule` and read back by
:func:`split_stored_rule`, and nothing else looks at it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from eventbus.store import AttemptOutcome, cause_of

__all__ = ["DeadLetterReason", "Delivery", "DeliveryKind", "split_stored_rule"]


class DeliveryKind(StrEnum):
    """Why a delivery is made: a rule's route, or a follow-up of one (values as stored)."""

    ROUTE = "route"
    DEAD_LETTER = "dead-letter"
    """A copy of a dead-lettered event, with ``deadletter*`` attributes, to the policy's
    ``dead_letter_target``."""
    ON_SUCCESS = "on-success"
    """An ``eventbus.delivery.succeeded`` outcome event to the policy's ``on_success``."""
    ON_FAILURE = "on-failure"
    """An ``eventbus.delivery.failed`` outcome event to the policy's ``on_failure``."""


class DeadLetterReason(StrEnum):
    """Why a delivery was dead-lettered: the ``reason`` column of ``dead_letters`` (and the dead
    letters' ``reason`` filter), the ``deadletterreason`` attribute of a dead-letter copy and
    the ``reason`` of an ``on_failure`` outcome event, spelled alike."""

    ATTEMPTS_EXHAUSTED = "attempts-exhausted"
    TOO_OLD = "too-old"
    """The next attempt would come later than the policy's ``max_age`` allows."""
    NON_RETRYABLE = "non-retryable"
    GONE = "gone"
    """The endpoint answered 410 Gone."""
    TARGET_DISABLED = "target-disabled"
    UNKNOWN_TARGET = "unknown-target"


@dataclass(slots=True, kw_only=True)
class Delivery:
    """One delivery of one event to one target, as the dispatcher advances it and as the
    retry schedule and the dead letters store it. ``pending_id`` is its row in the schedule.

    ``rule`` is the name of the rule that routed the event, for a follow-up too; ``override``
    is the route's ``delivery:`` override of the target's policy, if any. ``payload`` is what
    the target receives: a CloudEvent dict when ``is_cloudevent``, else any JSON value or str.
    """

    event: dict[str, Any]
    rule: str
    target: str
    payload: Any
    is_cloudevent: bool
    kind: DeliveryKind = DeliveryKind.ROUTE
    override: dict[str, Any] | None = None
    attempts: int = 0
    first_attempt_at: datetime | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    pending_id: int | None = None
    replay_count: int = 0
    """How many times it was replayed from the dead letters (its history spans them all)."""
    claim: str | None = None
    """The token of the claim that handed this row out; writes to the row check it, so an
    attempt whose lease ran out cannot overwrite what the row's new owner decided."""
    acceptance: str | None = None
    """The bus message a rule's delivery came from (its ``ref``, the same at a redelivery of
    it): an event accepted twice is two bus messages, each with a delivery of its own."""
    write_key: uuid.UUID | None = None
    """Set by the store's first write of this delivery's row (its retry row, or the dead letter
    of one never scheduled): a write made again after a broken connection finds that row."""
    last_outcome: AttemptOutcome | None = None
    """What became of the latest attempt (None while none was recorded, e.g. parked behind
    an open circuit): what ``Dispatcher.dispatch`` reports to the router's live feed."""
    sent: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    """Called by the dispatcher once the attempt's request is over, before its outcome is
    recorded (the retry worker counts a target's rows by the requests they have under way)."""

    @property
    def trail_event(self) -> dict[str, Any]:
        """The event whose trail records this delivery (its attempts, its waiting retry, its
        dead letter): its own, but for a destination's outcome event, which is never on the
        bus and has no trail: the event it reports on (its ``eventbuscause*`` attributes), so
        the original's trail holds its follow-up deliveries (rule ``orders#on-success``)."""
        cause = cause_of(self.event)
        if self.kind in (DeliveryKind.ON_SUCCESS, DeliveryKind.ON_FAILURE) and cause is not None:
            return cause
        return self.event

    @property
    def stored_rule(self) -> str:
        """The rule as rows name it: ``orders``, or ``orders#dead-letter`` for a follow-up."""
        if self.kind is DeliveryKind.ROUTE:
            return self.rule
        return f"{self.rule}#{self.kind.value}"


def split_stored_rule(stored: str) -> tuple[str, DeliveryKind]:
    """The rule name and the kind of a delivery from the ``rule`` column of its row."""
    rule, hash_sign, suffix = stored.rpartition("#")
    if hash_sign and suffix in _FOLLOW_UPS:
        return rule, DeliveryKind(suffix)
    return stored, DeliveryKind.ROUTE


_FOLLOW_UPS = frozenset(kind.value for kind in DeliveryKind if kind is not DeliveryKind.ROUTE)
