"""Schedules for the timer source: when a tick is due (pure, no I/O).

Place in the pipeline: ``timer`` source → here (which instants are ticks) → the timer source
claims, publishes and checkpoints each tick. Three forms are accepted, all with an IANA zone:

* a cron expression: five fields (minute first), or six with seconds first, or one of
  ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``, ``@monthly``, ``@yearly``
  (``@annually``); evaluated by croniter in the schedule's zone: a wall-clock time skipped by
  the spring-forward jump fires at the first instant after the jump; a time the fall-back
  hour repeats fires once (its first occurrence) for a schedule at set hours, and at both
  for one whose hour field is ``*``;
* ``rate(N unit)`` (EventBridge syntax; unit minute(s), hour(s), day(s)): ticks every N units of
  elapsed time counted from the Unix epoch, so every instance agrees on the ticks without
  coordination (the zone does not matter to a rate);
* ``at(YYYY-MM-DDTHH:MM:SS)``: one tick at that wall-clock time in the schedule's zone.

Every tick is an aware ``datetime`` in UTC.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from eventbus._errors import ConfigError

__all__ = [
    "AtSchedule",
    "CronSchedule",
    "RateSchedule",
    "Schedule",
    "missed_ticks",
    "parse_schedule",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TINY = timedelta(microseconds=1)
_RATE = re.compile(r"rate\(\s*(\d{1,15})\s+([a-z]+)\s*\)")
_AT = re.compile(r"at\(\s*([^)]*?)\s*\)")
_UNITS = {"minute": 60, "hour": 3600, "day": 86400}


class Schedule(Protocol):
    """The ticks of one schedule, as aware UTC datetimes."""

    def next_after(self, t: datetime) -> datetime | None:
        """The first tick strictly after ``t``, or None when there is none."""

    def at_or_before(self, t: datetime) -> datetime | None:
        """The last tick at or before ``t``, or None when there is none."""


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression evaluated in ``zone`` (six fields mean seconds first).

    A schedule at set hours (its hour field not ``*``) fires once at a wall-clock time the
    fall-back hour repeats, at its first occurrence, as Vixie cron and EventBridge Scheduler
    do (a daily 01:30 job in New York ran twice that night); one every hour fires in both."""

    expression: str
    zone: ZoneInfo

    def _iter(self, t: datetime) -> croniter:
        return croniter(
            self.expression,
            t.astimezone(self.zone),
            second_at_beginning=len(self.expression.split()) == 6,
        )

    @property
    def _set_hours(self) -> bool:
        fields = self.expression.split()
        hour = fields[2] if len(fields) == 6 else fields[1]
        return not hour.startswith("*")

    def _repeated(self, tick: datetime) -> bool:
        """Whether ``tick`` is the second occurrence of a wall-clock time (fall-back) that a
        schedule at set hours skips."""
        local = tick.astimezone(self.zone)
        return (
            local.fold == 1
            and local.replace(fold=0).utcoffset() != local.utcoffset()
            and self._set_hours
        )

    def _first(self, step: Callable[[type[datetime]], datetime]) -> datetime:
        """The first tick ``step`` (an iterator's get_next or get_prev) gives that is not a
        repeated one, in UTC."""
        tick = step(datetime)
        for _ in range(_MOST_REPEATED):  # the repeated hour's ticks (3,600 at most, a year)
            if not self._repeated(tick):
                break
            tick = step(datetime)
        return tick.astimezone(UTC)

    def next_after(self, t: datetime) -> datetime | None:
        return self._first(self._iter(t).get_next)

    def at_or_before(self, t: datetime) -> datetime | None:
        # croniter's get_prev is strictly before its start; ticks are whole seconds, so starting
        # a microsecond later makes a tick exactly at ``t`` count.
        return self._first(self._iter(t + _TINY).get_prev)


_MOST_REPEATED = 3700
"""Ticks skipped at most in one repeated hour (one a second, with margin)."""


@dataclass(frozen=True)
class RateSchedule:
    """A tick every ``period`` of elapsed time, anchored at the Unix epoch."""

    period: timedelta

    def next_after(self, t: datetime) -> datetime | None:
        return _EPOCH + ((t - _EPOCH) // self.period + 1) * self.period

    def at_or_before(self, t: datetime) -> datetime | None:
        return _EPOCH + ((t - _EPOCH) // self.period) * self.period


@dataclass(frozen=True)
class AtSchedule:
    """A single tick."""

    when: datetime

    def next_after(self, t: datetime) -> datetime | None:
        return self.when if self.when > t else None

    def at_or_before(self, t: datetime) -> datetime | None:
        return self.when if self.when <= t else None


def parse_schedule(expression: str, zone: str = "UTC") -> Schedule:
    """Parse a cron, ``rate(...)`` or ``at(...)`` expression evaluated in IANA zone ``zone``.

    Raises ConfigError saying what is wrong (unknown zone, bad cron field count or field, bad
    rate number or unit, malformed at() time). Whether an at() lies in the past depends on the
    clock, so the caller checks that.
    """
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"unknown time zone {zone!r}") from exc
    text = expression.strip()
    if match := _RATE.fullmatch(text):
        return _parse_rate(int(match.group(1)), match.group(2))
    if match := _AT.fullmatch(text):
        return AtSchedule(_parse_at(match.group(1), tz))
    if text.startswith(("rate(", "at(")):
        raise ConfigError(f"malformed schedule {expression!r}: expected rate(N unit) or at(time)")
    return _parse_cron(text, tz)


_MOST_RATE_SECONDS = 100 * 366 * 86400


def _parse_rate(value: int, unit: str) -> RateSchedule:
    base = unit[:-1] if unit.endswith("s") else unit
    if base not in _UNITS:
        raise ConfigError(f"rate unit {unit!r} is not one of minute(s), hour(s), day(s)")
    if value < 1:
        raise ConfigError("rate value must be a positive whole number")
    if value * _UNITS[base] > _MOST_RATE_SECONDS:
        # a datetime ends at year 9999: rate(3000000 days) loaded, then its first tick failed
        # at every restart (and rate(1000000000 days) was a traceback at load)
        raise ConfigError(f"rate({value} {unit}) is longer than 100 years")
    # EventBridge insists on the singular for 1 and the plural otherwise; accepting either costs
    # nothing and the meaning is unambiguous.
    return RateSchedule(timedelta(seconds=value * _UNITS[base]))


def _parse_at(text: str, tz: ZoneInfo) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"at() time {text!r} is not YYYY-MM-DDTHH:MM:SS") from exc
    if when.tzinfo is not None:
        raise ConfigError(f"at() time {text!r} must not carry an offset: the zone is set apart")
    return when.replace(tzinfo=tz).astimezone(UTC)


_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _parse_cron(text: str, tz: ZoneInfo) -> CronSchedule:
    if text.startswith("@"):
        if text.lower() not in _ALIASES:
            raise ConfigError(
                f"unknown schedule {text!r}: the @ forms are {', '.join(_ALIASES)}"
                " (for a period, rate(N minutes | hours | days))"
            )
        text = _ALIASES[text.lower()]
    if text.lower().startswith("cron(") and text.endswith(")"):
        raise ConfigError(
            f"{text!r} is EventBridge's form: write the five cron fields without cron( ), "
            "its year field and ? (cron's day of week counts from SUN=0, EventBridge's "
            "from SUN=1)"
        )
    fields = text.split()
    if len(fields) not in (5, 6):
        raise ConfigError(
            f"cron expression {text!r} has {len(fields)} fields;"
            " expected 5, or 6 with seconds first"
        )
    normalized = " ".join(fields)
    try:
        # get_next also rejects expressions that parse but never match (30 February).
        croniter(normalized, datetime.now(UTC), second_at_beginning=len(fields) == 6).get_next()
    except (CroniterError, ValueError) as exc:
        raise ConfigError(f"invalid cron expression {text!r}: {exc}") from exc
    return CronSchedule(normalized, tz)


def missed_ticks(
    schedule: Schedule, after: datetime, until: datetime, limit: int
) -> list[datetime]:
    """The latest ``limit`` ticks in ``(after, until]``, oldest first.

    Walks backwards from ``until`` so the cost is bounded by ``limit``, not by how long the
    downtime was.
    """
    ticks: list[datetime] = []
    tick = schedule.at_or_before(until)
    while tick is not None and tick > after and len(ticks) < limit:
        ticks.append(tick)
        tick = schedule.at_or_before(tick - _TINY)
    ticks.reverse()
    return ticks
