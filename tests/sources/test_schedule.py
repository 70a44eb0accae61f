"""Schedule parsing and tick arithmetic (pure: no servers)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from eventbus._errors import ConfigError
from eventbus.sources._schedule import missed_ticks, parse_schedule


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "zone", "after", "expected"),
    [
        ("*/15 * * * *", "UTC", utc(2026, 1, 1, 10, 7), utc(2026, 1, 1, 10, 15)),
        ("*/15 * * * *", "UTC", utc(2026, 1, 1, 10, 15), utc(2026, 1, 1, 10, 30)),
        ("30 * * * * *", "UTC", utc(2026, 1, 1, 10, 0, 0), utc(2026, 1, 1, 10, 0, 30)),
        ("0 9 * * *", "Europe/Berlin", utc(2026, 1, 1), utc(2026, 1, 1, 8)),
        ("0 9 * * *", "Europe/Berlin", utc(2026, 7, 1), utc(2026, 7, 1, 7)),
        # 02:30 does not exist on the spring-forward day: croniter fires right after the jump.
        ("30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 23), utc(2026, 3, 29, 1)),
        ("rate(5 minutes)", "UTC", utc(2026, 1, 1, 10, 2), utc(2026, 1, 1, 10, 5)),
        ("rate(1 hour)", "Asia/Tokyo", utc(2026, 1, 1, 10), utc(2026, 1, 1, 11)),
        ("rate(2 days)", "UTC", utc(2026, 1, 1, 12), utc(2026, 1, 3)),  # epoch-aligned
        ("at(2030-06-01T09:00:00)", "Europe/Paris", utc(2026, 1, 1), utc(2030, 6, 1, 7)),
        ("at(2030-06-01T09:00:00)", "UTC", utc(2030, 6, 1, 9), None),
    ],
)
def test_next_after(expression: str, zone: str, after: datetime, expected: datetime | None) -> None:
    assert parse_schedule(expression, zone).next_after(after) == expected


def test_at_or_before_includes_an_exact_tick() -> None:
    for expression in ("0 * * * *", "rate(1 hour)", "0 0 * * * *"):
        schedule = parse_schedule(expression)
        assert schedule.at_or_before(utc(2026, 1, 1, 10)) == utc(2026, 1, 1, 10)
        assert schedule.at_or_before(utc(2026, 1, 1, 10, 59)) == utc(2026, 1, 1, 10)
    at = parse_schedule("at(2030-01-01T00:00:00)")
    assert at.at_or_before(utc(2029, 12, 31)) is None
    assert at.at_or_before(utc(2030, 1, 1)) == utc(2030, 1, 1)


def test_fall_back_hour_fires_every_real_hour() -> None:
    schedule = parse_schedule("0 * * * *", "Europe/Berlin")
    ticks = missed_ticks(schedule, utc(2026, 10, 24, 23), utc(2026, 10, 25, 3), 100)
    assert ticks == [utc(2026, 10, 25, h) for h in (0, 1, 2, 3)]


@pytest.mark.parametrize(
    ("expression", "zone", "night", "once"),
    [
        # 02:30 Berlin comes at 00:30 and 01:30 UTC that night; 01:30 New York at 05:30, 06:30
        ("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 22), utc(2026, 10, 25, 0, 30)),
        ("30 1 * * *", "America/New_York", utc(2026, 11, 1, 3), utc(2026, 11, 1, 5, 30)),
        ("0 30 1 * * *", "America/New_York", utc(2026, 11, 1, 3), utc(2026, 11, 1, 5, 30)),
        # Lord Howe goes back half an hour
        ("45 1 * * *", "Australia/Lord_Howe", utc(2026, 4, 4, 13), utc(2026, 4, 4, 14, 45)),
    ],
)
def test_a_schedule_at_set_hours_fires_once_on_the_fall_back_night(
    expression: str, zone: str, night: datetime, once: datetime
) -> None:
    # It fired at both instants the wall-clock time came (a daily report went out twice);
    # Vixie cron and EventBridge Scheduler fire it once.
    schedule = parse_schedule(expression, zone)
    day_later = night.replace(day=night.day + 1)
    assert missed_ticks(schedule, night, day_later, 100) == [once]
    assert schedule.next_after(night) == once
    assert schedule.next_after(once).date() > once.date()  # tomorrow's, not the repeat
    assert schedule.at_or_before(day_later) == once


def test_aliases_and_eventbridges_cron_form() -> None:
    daily = parse_schedule("@daily", "Europe/Berlin")
    assert daily.next_after(utc(2026, 1, 1, 12)) == utc(2026, 1, 1, 23)
    assert parse_schedule("@HOURLY").next_after(utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 11)
    assert parse_schedule("@weekly").next_after(utc(2026, 1, 1)) == utc(2026, 1, 4)  # a Sunday
    with pytest.raises(ConfigError, match="the @ forms are @yearly"):
        parse_schedule("@every 5m")
    for eventbridge in ("cron(0 12 * * ? *)", "CRON(0 12 * * ? *)"):
        with pytest.raises(ConfigError, match="EventBridge's form: write the five cron fields"):
            parse_schedule(eventbridge)


def test_missed_ticks_keeps_the_latest_within_the_limit() -> None:
    schedule = parse_schedule("rate(1 minute)")
    after, until = utc(2026, 1, 1, 0, 0), utc(2026, 1, 8)  # a week: 10,080 ticks
    assert missed_ticks(schedule, after, until, 3) == [
        utc(2026, 1, 7, 23, 58),
        utc(2026, 1, 7, 23, 59),
        utc(2026, 1, 8),
    ]
    assert missed_ticks(schedule, after, utc(2026, 1, 1, 0, 2), 100) == [
        utc(2026, 1, 1, 0, 1),
        utc(2026, 1, 1, 0, 2),
    ]
    assert missed_ticks(schedule, after, after, 100) == []
    assert missed_ticks(schedule, after, until, 0) == []


@pytest.mark.parametrize(
    ("expression", "zone", "message"),
    [
        ("61 * * * *", "UTC", "invalid cron expression"),
        ("* * * *", "UTC", "has 4 fields"),
        ("* * * * * * *", "UTC", "has 7 fields"),
        ("0 0 30 2 *", "UTC", "invalid cron expression"),
        ("rate(5 fortnights)", "UTC", "rate unit 'fortnights'"),
        ("rate(0 minutes)", "UTC", "positive"),
        # loaded, then its first tick failed at every restart; a traceback at load
        ("rate(3000000 days)", "UTC", "longer than 100 years"),
        ("rate(1000000000 days)", "UTC", "longer than 100 years"),
        ("rate(99999999999999999999 days)", "UTC", "malformed schedule"),
        ("rate(five minutes)", "UTC", "malformed schedule"),
        ("at(tomorrow)", "UTC", "is not YYYY-MM-DDTHH:MM:SS"),
        ("at(2030-01-01T00:00:00+02:00)", "UTC", "must not carry an offset"),
        ("*/5 * * * *", "Mars/Olympus_Mons", "unknown time zone"),
        ("*/5 * * * *", "../etc/passwd", "unknown time zone"),
    ],
)
def test_bad_schedules_raise_config_error(expression: str, zone: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_schedule(expression, zone)
