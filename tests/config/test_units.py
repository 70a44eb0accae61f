"""Durations as users write them in connector files, delivery policies and rules."""

from __future__ import annotations

import pytest

from eventbus.config import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("6h", 21600.0),
        ("1d", 86400.0),
        (" 2 s ", 2.0),
        ("3650d", 3650 * 86400.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad",
    # NaN and the unbounded passed: a retry that far could not be scheduled, and the event was
    # redelivered again and again
    [-1, "-1s", "1 week", "", True, None, [1], float("nan"), float("inf"), "99999999999d", "3651d"],
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)
