"""The tables the commands print for people: aligned columns, one line per row whatever the
cell holds, times in UTC to the second, ``-`` for nothing."""

from __future__ import annotations

import io
from typing import Any

from eventbus.cli._output import MAX_CELL, SHOW, printable, table


def test_a_table_aligns_columns_and_keeps_every_row_on_one_line() -> None:
    rows = [
        {"id": 1, "error": "connection refused\nretrying", "at": "2026-01-31T13:00:00.5+01:00"},
        {"id": 22, "error": "x" * 200, "lag": 0.1234567, "ok": True},
    ]
    columns = (("ID", "id"), ("AT", "at"), ("LAG", "lag"), ("OK", "ok"), ("ERROR", "error"))
    lines = table(rows, columns).splitlines()
    assert lines[0].split() == ["ID", "AT", "LAG", "OK", "ERROR"]
    assert lines[1].split() == [
        *("1", "2026-01-31T12:00:00Z", "-", "-", "connection", "refused", "retrying")
    ]
    assert lines[2].split()[:4] == ["22", "-", "0.123", "yes"]
    assert lines[2].endswith("x" * (MAX_CELL - 1) + "…")
    # every column starts where its heading does
    assert lines[1].index("2026") == lines[0].index("AT") == lines[2].index("-")


def test_empty_listings_say_so() -> None:
    for kind, body, said in (
        ("dead-letters", {"items": [], "next_after": None}, "no dead letters\n"),
        ("retries", {"items": [], "total": 0}, "no pending retries\n"),
        ("sources", {"sources": []}, "no sources running\n"),
        ("source-dead-letters", {"items": []}, "no source dead letters\n"),
        (
            "replayed",
            {"replayed": [], "count": 0, "truncated": False},
            "replayed 0 dead letters\n",
        ),
        ("purged", {"purged": 1}, "purged 1 dead letter\n"),
        ("reloaded", {"rules": 3}, "3 rules loaded\n"),
        ("reloaded", {"rules": 1, "fingerprint": "0a1b"}, "1 rule loaded (fingerprint 0a1b)\n"),
        (
            "reloaded",
            {"rules": 1, "notes": ["targets x are new"]},
            "1 rule loaded\nnote: targets x are new\n",
        ),
    ):
        out = io.StringIO()
        SHOW[kind](body, out)
        assert out.getvalue() == said, kind


def test_what_a_function_answered_cannot_drive_the_terminal() -> None:
    # An error text quotes the function's answer: an OSC hyperlink, a screen clear and a bidi
    # override in it reached the operator's terminal as they were.
    hostile = "refused \x1b]8;;http://evil\x07click\x1b]8;;\x07 \x1b[2J \u202eevil\u202c"
    dead_letter = {
        "id": 7,
        "event_source": "s",
        "event_id": "e\x1b[31m",
        "rule": "r",
        "target": "fn",
        "reason": "max-attempts",
        "attempts": 1,
        "final_error": hostile,
        "first_attempt_at": "2026-01-31T12:00:00Z",
        "created_at": "2026-01-31T12:00:01Z",
        "history": [{"at": "2026-01-31T12:00:00Z", "attempt": 1, "error": hostile}],
    }
    out = io.StringIO()
    SHOW["dead-letter"](dead_letter, out)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]8;;http://evil\\x07click" in text and "\\u202eevil" in text
    assert "e\\x1b[31m" in text
    assert printable("two\nlines\tand a tab") == "two\nlines\\tand a tab"


def test_a_replayed_dead_letters_attempts_name_their_round() -> None:
    # Attempts count from 1 again after each replay: the table showed 1, 2, 1, 2 with
    # nothing between the rounds (the JSON has "replay").
    dead_letter = {
        "id": 7,
        "event_source": "s",
        "event_id": "e",
        "rule": "r",
        "target": "fn",
        "reason": "max-attempts",
        "attempts": 2,
        "first_attempt_at": "2026-01-31T12:00:00Z",
        "created_at": "2026-01-31T12:00:01Z",
        "replay_count": 1,
        "history": [
            {"at": "2026-01-31T12:00:00Z", "attempt": 1, "status": 503},
            {"at": "2026-01-31T12:01:00Z", "attempt": 1, "status": 503, "replay": 1},
        ],
    }
    out = io.StringIO()
    SHOW["dead-letter"](dead_letter, out)
    lines = out.getvalue().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("AT"))
    assert lines[head].split() == ["AT", "ATTEMPT", "REPLAY", "STATUS", "MS", "ERROR"]
    assert lines[head + 1].split()[:4] == ["2026-01-31T12:00:00Z", "1", "-", "503"]
    assert lines[head + 2].split()[:4] == ["2026-01-31T12:01:00Z", "1", "1", "503"]


def test_a_trail_counts_the_attempts_made() -> None:
    # The replay asked for and the dead letter written without a request (its target
    # disabled) were counted as attempts: "5 attempts" for 2 made.
    def row(outcome: str, attempt: int, ms: float, status: int | None = None) -> dict[str, Any]:
        where = {"at": "2026-01-31T12:00:00Z", "rule": "r", "target": "fn", "attempt": attempt}
        return where | {"outcome": outcome, "status": status, "duration_ms": ms, "error": None}

    trail = {
        "event": {"id": "e", "source": "s", "type": "t"},
        "received_at": "2026-01-31T12:00:00Z",
        "via": "http",
        "matches": [],
        "attempts": [
            row("failed", 1, 12.5, 503),
            row("dead-lettered", 2, 8.0, 503),
            row("replay-requested", 0, 0),
            row("dead-lettered", 2, 0),
            row("replay-requested", 0, 0),
        ],
    }
    out = io.StringIO()
    SHOW["event-trail"](trail, out)
    assert "\n2 attempts, 3 other rows\n" in out.getvalue()
