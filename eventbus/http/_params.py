"""The parameters of the admin API: typed, so the OpenAPI document shows each one, and checked
here, so a bad value is a 400 problem naming the parameter.

Where it sits: ``_api`` declares its handlers' parameters with these types. Each carries a
check that runs before the type's own validation and raises ``ValueError`` with the answer's
``detail``; ``_api`` turns the first such error of a request into the 400. Values are checked
against what their PostgreSQL columns can hold, so a value the database would refuse is a 400
naming the parameter, not a failed query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from pydantic import BeforeValidator

from eventbus.config import parse_duration
from eventbus.delivery import DeadLetterFilter, DeadLetterReason
from eventbus.http._problem import Problem
from eventbus.store import EventCursor

__all__ = [
    "FILTERING",
    "All",
    "DeadLetterId",
    "EventSearch",
    "Expect",
    "Filter",
    "Limit",
    "Page",
    "Paging",
    "PayloadBytes",
    "RetryEventId",
    "RetrySource",
    "RetryTarget",
    "Search",
    "Selection",
    "SourceName",
    "TargetName",
    "TrailId",
    "TrailSource",
    "only_parameters",
]

_BIGINT = 64
_INTEGER = 32
_MAX_LIMIT = 1000
_DECIMAL = re.compile(r"-?[0-9]{1,40}")


def _clip(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."


def _text(name: str) -> BeforeValidator:
    """Text for a PostgreSQL ``text`` column, which cannot hold U+0000."""

    def check(value: str) -> str:
        if "\x00" in value:
            raise ValueError(f"{name} must not contain the character U+0000")
        return value

    return BeforeValidator(check)


def _one_of(name: str, values: tuple[str, ...]) -> BeforeValidator:
    """One of ``values``: a misspelt filter selected nothing, and a purge or a replay by it
    answered "0" as done."""

    def check(value: str) -> str:
        if value not in values:
            raise ValueError(f"{name} must be one of {', '.join(values)}, got {_clip(value)}")
        return value

    return BeforeValidator(check)


REASONS = tuple(reason.value for reason in DeadLetterReason)


def _parse_integer(name: str, raw: str, bits: int) -> int:
    # ASCII digits only: int() also takes a fullwidth 7, "1_000" and "+7", so an odd
    # spelling named, replayed or deleted a real dead letter
    if not _DECIMAL.fullmatch(raw):
        raise ValueError(f"{name} must be an integer, got {_clip(raw)}")
    value = int(raw)
    bound = 2 ** (bits - 1)
    if not -bound <= value < bound:
        raise ValueError(f"{name} must be a {bits}-bit integer, got {_clip(raw)}")
    return value


def _integer(name: str, bits: int = _BIGINT) -> BeforeValidator:
    return BeforeValidator(lambda raw: _parse_integer(name, raw, bits))


def _integers(name: str) -> BeforeValidator:
    return BeforeValidator(lambda raws: [_parse_integer(name, raw, _BIGINT) for raw in raws])


_AGO = re.compile(r"\d+(?:\.\d+)?(?:ms|s|m|h|d)", re.ASCII)  # ASCII digits only
"""A duration with its unit (``15m``, ``6h``, ``7d``): that long before now, as ``docker logs
--since`` and ``kubectl logs --since`` take it. The unit is required: ``20261201`` is a date."""


def _parse_moment(name: str, raw: str) -> datetime:
    """An ISO 8601 time (one without a zone is UTC, not the server's local time), or a
    duration ago by the server's clock (``_AGO``)."""
    if _AGO.fullmatch(raw):
        try:
            return datetime.now(UTC) - timedelta(seconds=parse_duration(raw))
        except (ValueError, OverflowError):
            raise ValueError(f"{name} must be at most 3650d ago, got {_clip(raw)}") from None
    try:
        moment = datetime.fromisoformat(raw)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        # The instant must exist in UTC, where PostgreSQL receives it.
        moment.astimezone(UTC)
    except ValueError:
        raise ValueError(
            f"{name} must be an ISO 8601 time or a duration ago (30m, 6h, 7d), got {_clip(raw)}"
        ) from None
    except OverflowError:
        raise ValueError(f"{name} must fall within years 0001-9999 in UTC") from None
    return moment


def _moment(name: str) -> BeforeValidator:
    return BeforeValidator(lambda raw: _parse_moment(name, raw))


def _check_cursor(raw: str) -> str:
    """A cursor token (``EventCursor``), kept as text: the document shows it as a string."""
    try:
        EventCursor.parse(raw)
    except ValueError:
        raise ValueError(
            f"after must be the next_after of a previous page, got {_clip(raw)}"
        ) from None
    return raw


def _from_one_to(name: str, most: int) -> BeforeValidator:
    """A query parameter that is an integer from 1 to ``most``."""

    def parse(raw: str) -> int:
        # ASCII only: str.isdigit() takes "²", which int() refuses
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
            raise ValueError(f"{name} must be an integer from 1 to {most}, got {_clip(raw)}")
        return int(raw)

    return BeforeValidator(parse)


DeadLetterId = Annotated[int, Path(description="The dead letter's id."), _integer("dl_id")]
TargetName = Annotated[str, Path(description="A target's name."), _text("target name")]
TrailSource = Annotated[
    str | None, Query(description="Required: the event's source."), _text("source")
]
TrailId = Annotated[
    str | None, Query(alias="id", description="Required: the event's id."), _text("id")
]
RetrySource = Annotated[
    str | None,
    Query(description="Only the retries of the event from this source (with id)."),
    _text("source"),
]
RetryEventId = Annotated[
    str | None,
    Query(alias="id", description="Only the retries of the event with this id (with source)."),
    _text("id"),
]
RetryTarget = Annotated[
    str | None, Query(description="Only the retries of this target."), _text("target")
]
SourceName = Annotated[
    str | None, Query(description="Only this source's dead letters."), _text("source")
]
Limit = Annotated[
    int,
    Query(ge=1, le=_MAX_LIMIT, description="How many items at most."),
    _from_one_to("limit", _MAX_LIMIT),
]
PayloadBytes = Annotated[
    int | None,
    Query(
        description=(
            "At most this many bytes of each payload (``payload_size`` says how many it has): "
            "a set-aside message may be megabytes, and a listing needs its start."
        ),
    ),
    _from_one_to("payload_bytes", 64 * 1024 * 1024),
]
After = Annotated[
    int | None,
    Query(description="The next page: the last id of the previous one (``next_after``)."),
    _integer("after"),
]
Expect = Annotated[
    int | None,
    Query(
        description="The count the operator confirmed: unless exactly this many match, nothing "
        "is done and the answer is 409."
    ),
    _integer("expect"),
]
All = Annotated[
    str | None,
    Query(alias="all", description="``true`` to select every dead letter (no other filter)."),
]


@dataclass(frozen=True)
class Page:
    """Where a page of dead letters starts and how long it is."""

    limit: int
    after: int | None


def _page(limit: Limit = 100, after: After = None) -> Page:
    return Page(limit, after)


def _dead_letter_filter(
    ids: Annotated[
        list[int] | None,
        Query(alias="id", description="Dead letter ids (repeat the parameter for several)."),
        _integers("id"),
    ] = None,
    rule: Annotated[str | None, Query(description="The rule's name."), _text("rule")] = None,
    target: Annotated[str | None, Query(description="The target's name."), _text("target")] = None,
    status: Annotated[
        int | None,
        Query(description="The last HTTP status the target answered."),
        _integer("status", _INTEGER),
    ] = None,
    reason: Annotated[
        str | None,
        Query(description=f"Why it was dead-lettered: {', '.join(REASONS)}."),
        _one_of("reason", REASONS),
    ] = None,
    since: Annotated[
        datetime | None,
        Query(description="Dead-lettered at or after (ISO 8601; without a zone: UTC)."),
        _moment("since"),
    ] = None,
    until: Annotated[
        datetime | None,
        Query(description="Dead-lettered before (ISO 8601; without a zone: UTC)."),
        _moment("until"),
    ] = None,
    source: Annotated[str | None, Query(description="The event's source."), _text("source")] = None,
    through: Annotated[
        int | None,
        Query(
            description="Ids up to this one: a count's ``last_id``, leaving out those "
            "dead-lettered since."
        ),
        _integer("through"),
    ] = None,
) -> DeadLetterFilter:
    _in_order(since, until)
    return DeadLetterFilter(
        ids=tuple(ids or ()),
        rule=rule,
        target=target,
        status=status,
        reason=reason,
        since=since,
        until=until,
        source=source,
        through=through,
    )


def _in_order(since: datetime | None, until: datetime | None) -> None:
    """Refuse (400) a window that ends before it begins: it selects nothing, and a replay or
    purge by it did nothing, answered as done."""
    if since is not None and until is not None and since > until:
        raise Problem(400, f"since ({since.isoformat()}) is later than until ({until.isoformat()})")


@dataclass(frozen=True)
class EventSearch:
    """Which accepted events ``GET /events`` lists, and which page of them."""

    source: str | None
    type: str | None
    since: datetime | None
    until: datetime | None
    limit: int
    after: EventCursor | None


def _event_search(
    source: Annotated[
        str | None, Query(description="Only events from this source."), _text("source")
    ] = None,
    type_: Annotated[
        str | None, Query(alias="type", description="Only events of this type."), _text("type")
    ] = None,
    since: Annotated[
        datetime | None,
        Query(description="Stored on the bus at or after (ISO 8601; without a zone: UTC)."),
        _moment("since"),
    ] = None,
    until: Annotated[
        datetime | None,
        Query(description="Stored on the bus before (ISO 8601; without a zone: UTC)."),
        _moment("until"),
    ] = None,
    limit: Limit = 100,
    after: Annotated[
        str | None,
        Query(description="The next page: ``next_after`` of the previous one."),
        BeforeValidator(_check_cursor),
    ] = None,
) -> EventSearch:
    if since is not None and until is not None and since > until:
        raise Problem(400, f"since ({since.isoformat()}) is later than until ({until.isoformat()})")
    cursor = None if after is None else EventCursor.parse(after)
    return EventSearch(source, type_, since, until, limit, cursor)


# As dependencies, a handler's parameter groups are checked in the order of its signature (the
# page before the filter), so the first bad parameter a request has is the one its 400 names.
Paging = Annotated[Page, Depends(_page)]
Filter = Annotated[DeadLetterFilter, Depends(_dead_letter_filter)]

FILTERING = ("id", "rule", "target", "status", "reason", "since", "until", "source", "through")
"""The query parameters of a dead-letter filter (``Filter``)."""

_SELECTING = (*FILTERING, "all", "expect")


def _refuse_unknown(request: Request, known: tuple[str, ...], of: str) -> None:
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        names = " and ".join(n if n.isidentifier() else _clip(n) for n in unknown)
        raise Problem(
            400,
            f"{names} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of "
            f"{of}; its parameters are {', '.join(known)}",
        )


def _selection(request: Request, flt: Filter) -> DeadLetterFilter:
    """The filter of a replay or purge, refusing (400) a parameter it does not know: a
    misspelt one (``reson=``) was dropped, and the call replayed or deleted more than asked."""
    _refuse_unknown(request, _SELECTING, "a replay or purge")
    return flt


def only_parameters(*known: str, of: str) -> Any:
    """A route's dependency refusing (400) a query parameter not among ``known``: a misspelt
    filter (``GET /events?sorce=``) was dropped, and the answer listed everything unfiltered."""

    def check(request: Request) -> None:
        _refuse_unknown(request, known, of)

    return Depends(check)


Selection = Annotated[DeadLetterFilter, Depends(_selection)]
Search = Annotated[EventSearch, Depends(_event_search)]
