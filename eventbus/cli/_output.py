"""What the commands that talk to a running service print: aligned tables and short summaries
for people by default, the API's JSON answer unchanged with ``--json`` for scripts.

Each ``show_*`` function takes the decoded JSON answer of one admin API route and writes it
to ``out``; it never changes what ``--json`` prints, so scripts written against the JSON keep
working whatever the tables become. Long cells (error texts) are cut to one line of
``MAX_CELL`` characters: the whole text is in ``--json`` and in ``eventbus dlq show``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

__all__ = ["MAX_CELL", "SHOW", "print_json", "printable", "table"]

MAX_CELL = 60


def print_json(value: Any, out: TextIO) -> None:
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (ESC and the other controls, bidi
    overrides), newlines apart, written as its escape (``\x1b``). Error texts quote what a
    function answered: an OSC or CSI sequence in one reached the operator's terminal."""
    if text.isprintable():
        return text
    return "\n".join(
        "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line) for line in text.split("\n")
    )


def _when(text: str) -> str:
    """An ISO 8601 time as UTC to the second, ``2026-01-31T12:00:00Z``; as given otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, str) and (key == "at" or key.endswith("_at")):
        return _when(value)
    # one line: newlines in error texts would break rows
    text = printable(" ".join(str(value).split()))
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``rows`` as a table with a header line; ``columns`` are (heading, key) pairs. Every
    cell is one line of at most ``MAX_CELL`` characters, times (keys ``at`` and ``*_at``) in
    UTC to the second; a missing or null value shows as -."""
    cells = [[heading for heading, _ in columns]]
    cells += [[_cell(key, row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in cells
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


_DEAD_LETTER_COLUMNS = (
    ("ID", "id"),
    ("CREATED", "created_at"),
    ("RULE", "rule"),
    ("TARGET", "target"),
    ("ATTEMPTS", "attempts"),
    ("STATUS", "last_status"),
    ("REASON", "reason"),
    ("EVENT", "event"),
    ("ERROR", "final_error"),
)


def _dead_letters(body: Any, out: TextIO) -> None:
    items = [
        {**item, "event": f"{item['event_source']} {item['event_id']}"} for item in body["items"]
    ]
    _page(items, body.get("next_after"), _DEAD_LETTER_COLUMNS, "dead letters", out)


_EVENT_COLUMNS = (
    ("RECEIVED", "received_at"),
    ("SOURCE", "source"),
    ("ID", "id"),
    ("TYPE", "type"),
    ("SUBJECT", "subject"),
    ("VIA", "via"),
    ("BYTES", "size"),
)


def _events(body: Any, out: TextIO) -> None:
    _page(body["items"], body.get("next_after"), _EVENT_COLUMNS, "events", out)


def _page(
    items: Sequence[Mapping[str, Any]],
    next_after: Any,
    columns: Sequence[tuple[str, str]],
    noun: str,
    out: TextIO,
) -> None:
    """One page of a listing: its table (or "no <noun>"), and how to ask for the next."""
    if not items:
        out.write(f"no {noun}\n")
        return
    out.write(table(items, columns))
    if next_after is not None:
        out.write(f"more: --after {next_after}\n")


_ATTEMPT_COLUMNS = (
    ("AT", "at"),
    ("RULE", "rule"),
    ("TARGET", "target"),
    ("ATTEMPT", "attempt"),
    ("OUTCOME", "outcome"),
    ("STATUS", "status"),
    ("MS", "duration_ms"),
    ("ERROR", "error"),
)


def _fields(pairs: Sequence[tuple[str, Any]], out: TextIO) -> None:
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        out.write(f"{name.ljust(width)}  {'-' if value is None else printable(str(value))}\n")


def _event_trail(body: Any, out: TextIO) -> None:
    event = body["event"]
    _fields(
        [
            ("id", event.get("id")),
            ("source", event.get("source")),
            ("type", event.get("type")),
            ("subject", event.get("subject")),
            ("received", body["received_at"]),
            ("via", body["via"]),
        ],
        out,
    )
    out.write(f"\nmatched {_plural(len(body['matches']), 'route')}\n")
    if body["matches"]:
        out.write(table(body["matches"], (("AT", "at"), ("RULE", "rule"), ("TARGET", "target"))))
    rows = body["attempts"]
    made = sum(1 for row in rows if _is_attempt(row))
    others = f", {_plural(len(rows) - made, 'other row')}" if len(rows) > made else ""
    out.write(f"\n{_plural(made, 'attempt')}{others}\n")
    if body["attempts"]:
        out.write(table(body["attempts"], _ATTEMPT_COLUMNS))
    if body.get("truncated"):
        out.write("\n(only the latest 1,000 matches and 1,000 attempts are listed)\n")


def _is_attempt(row: Any) -> bool:
    """Whether a row of the trail's attempts is a request made to the target: not a replay
    asked for, a refusal, or a dead letter written without one (its target unknown or
    disabled: no time spent). "5 attempts" were shown for 2 made."""
    outcome = row.get("outcome")
    if outcome in ("replay-requested", "refused"):
        return False
    return outcome != "dead-lettered" or bool(row.get("duration_ms"))


def _dead_letter(body: Any, out: TextIO) -> None:
    _fields(
        [
            ("id", body["id"]),
            ("event", f"{body['event_source']} {body['event_id']}"),
            ("type", body.get("event_type")),
            ("rule", body["rule"]),
            ("target", body["target"]),
            ("reason", body["reason"]),
            ("attempts", body["attempts"]),
            ("last status", body.get("last_status")),
            ("final error", body.get("final_error")),
            # after a replay, when its fresh attempt budget began (max_age counts from it)
            (
                "first attempt" if not body.get("replay_count") else "replayed at",
                body["first_attempt_at"],
            ),
            ("dead-lettered", body["created_at"]),
            ("replayed", _plural(body.get("replay_count", 0), "time")),
        ],
        out,
    )
    history = body.get("history") or []
    if history:
        out.write("\n")
        columns = [("AT", "at"), ("ATTEMPT", "attempt")]
        if any(isinstance(row, dict) and row.get("replay") for row in history):
            # attempts count from 1 again after each replay: the round tells them apart
            columns.append(("REPLAY", "replay"))
        columns += [("STATUS", "status"), ("MS", "duration_ms"), ("ERROR", "error")]
        out.write(table(history, tuple(columns)))


def _replayed(body: Any, out: TextIO) -> None:
    items = body["replayed"]
    # a service older than "count" lists every dead letter it replayed
    out.write(f"replayed {_plural(body.get('count', len(items)), 'dead letter')}\n")
    if body.get("truncated"):
        out.write(f"the first {len(items)}:\n")
    if items:
        columns = (("ID", "id"), ("RULE", "rule"), ("TARGET", "target"), ("EVENT", "event"))
        rows = [{**i, "event": f"{i['event_source']} {i['event_id']}"} for i in items]
        out.write(table(rows, columns))
    for note in body.get("notes") or ():
        out.write(f"note: {printable(str(note))}\n")


def _dead_letter_count(body: Any, out: TextIO) -> None:
    count = body["count"]
    if not count:
        out.write("no dead letters match\n")
        return
    out.write(
        f"{_plural(count, 'dead letter')}, the newest written {printable(str(body['newest']))}\n"
    )
    # a duration ago moves with the clock: the time the service made of it stays put
    since = f"--since {printable(body['since'])} " if body.get("since") else ""
    out.write(
        "to replay or purge exactly these, give the same filters and "
        f"{since}--through {body['last_id']} --expect {count}\n"
    )


def _purged(body: Any, out: TextIO) -> None:
    out.write(f"purged {_plural(body['purged'], 'dead letter')}\n")


_SOURCE_COLUMNS = (
    ("NAME", "name"),
    ("TYPE", "type"),
    ("STATE", "state"),
    ("EVENTS", "events"),
    ("ERRORS", "errors"),
    ("LAST EVENT", "last_event_at"),
    ("LAG", "lag"),
    ("LAST ERROR", "last_error"),
)


def _targets(body: Any, out: TextIO) -> None:
    if not body["targets"]:
        out.write("no targets\n")
        return
    rows = [
        {
            **target,
            "circuit": target.get("circuit") or "-",
            "disabled": (target.get("disabled") or {}).get("reason"),
            "disabled_at": (target.get("disabled") or {}).get("at"),
        }
        for target in body["targets"]
    ]
    columns = (
        ("NAME", "name"),
        ("TYPE", "type"),
        ("CIRCUIT", "circuit"),
        ("RETRIES", "retries"),
        ("DISABLED", "disabled"),
        ("SINCE", "disabled_at"),
    )
    out.write(table(rows, columns))


def _enabled(body: Any, out: TextIO) -> None:
    if body.get("was_disabled") is False:
        out.write(f"{body['enabled']} was not disabled: nothing changed\n")
        return
    out.write(f"{body['enabled']} enabled: deliveries to it go out again\n")


def _sources(body: Any, out: TextIO) -> None:
    if not body["sources"]:
        out.write("no sources running\n")
        return
    out.write(table(body["sources"], _SOURCE_COLUMNS))


def _source_dead_letters(body: Any, out: TextIO) -> None:
    if not body["items"]:
        out.write("no source dead letters\n")
        return
    columns = (("ID", "id"), ("SOURCE", "source"), ("RECEIVED", "received_at"), ("ERROR", "error"))
    out.write(table(body["items"], columns))


_RETRY_COLUMNS = (
    ("ID", "id"),
    ("RULE", "rule"),
    ("TARGET", "target"),
    ("ATTEMPT", "attempts"),
    ("NEXT", "due_at"),
    ("WAITING", "waiting_for"),
    ("STATUS", "last_status"),
    ("LAST ERROR", "last_error"),
)


def _retries(body: Any, out: TextIO) -> None:
    items = body["items"]
    if not items:
        out.write("no pending retries\n")
        return
    out.write(table(items, _RETRY_COLUMNS))
    if body["total"] > len(items):
        out.write(f"{len(items)} of {body['total']} pending retries shown (--limit)\n")


def _accepted(body: Any, out: TextIO) -> None:
    name = printable(f"{body['source']} {body['id']}")
    if body.get("duplicate"):
        # Answered 202 all the same: the event is on the bus, from an earlier publish.
        out.write(f"duplicate {name}: already on the bus, not delivered again\n")
        return
    out.write(f"accepted {name}\n")


def _reloaded(body: Any, out: TextIO) -> None:
    shown = f" (fingerprint {body['fingerprint']})" if body.get("fingerprint") else ""
    out.write(f"{_plural(body['rules'], 'rule')} loaded{shown}\n")
    for note in body.get("notes") or ():
        out.write(f"note: {printable(str(note))}\n")


SHOW: Mapping[str, Callable[[Any, TextIO], None]] = {
    "accepted": _accepted,
    "dead-letter": _dead_letter,
    "dead-letter-count": _dead_letter_count,
    "dead-letters": _dead_letters,
    "event-trail": _event_trail,
    "events": _events,
    "purged": _purged,
    "reloaded": _reloaded,
    "targets": _targets,
    "enabled": _enabled,
    "replayed": _replayed,
    "retries": _retries,
    "source-dead-letters": _source_dead_letters,
    "sources": _sources,
}
"""The human form of each answer, by the name the commands give it."""
