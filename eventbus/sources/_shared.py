"""Source statuses shared by the worker processes of ``eventbus serve --workers N``.

Each worker runs its own sources (the first one runs the configured ones, every one its Kafka
ingest) but any worker may answer ``GET /sources``. So each keeps its statuses in a file of a
directory the workers share (``<pid>.json``, replaced at once, rewritten when it changes) and
answers with its own live statuses merged with the others' files. The parent that runs the
workers makes the directory afresh at start and, when it reaps a worker, folds its file into
``retired.json`` (:meth:`SharedStatuses.retire`): the counts of a worker that died stay
counted, as the metrics keep them, instead of the sums going back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from eventbus._files import replace_file
from eventbus.sources._base import SourceStatus

__all__ = ["SharedStatuses", "merge_statuses"]

# A source that runs in several workers shows the state of its worst copy.
_WORST_FIRST = ("failed", "backoff", "starting", "running", "standby", "stopped")
_RETIRED = "retired.json"  # the statuses of the workers reaped


class SharedStatuses:
    """This process's source statuses in ``directory``, and every other worker's."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._own = directory / f"{os.getpid()}.json"
        self._written = b""

    def write(self, statuses: Sequence[SourceStatus]) -> None:
        """Replace this process's file by ``statuses`` (at once: a reader never sees half),
        unless it already says so."""
        raw = orjson.dumps([s.to_dict() for s in statuses])
        if raw == self._written:
            return
        replace_file(self._own, raw)
        self._written = raw

    def read(self, own: Sequence[SourceStatus]) -> list[SourceStatus]:
        """``own`` (live) merged with what the other workers' files say."""
        others: list[SourceStatus] = []
        for path in sorted(self.directory.glob("*.json")):
            if path != self._own:
                others.extend(_read(path))
        return merge_statuses([*own, *others])

    @staticmethod
    def retire(directory: Path, pid: int) -> None:
        """Fold the statuses of the worker ``pid``, reaped, into ``retired.json`` of
        ``directory`` and remove its file: its counts and latest event stay in the sums (the
        copies kept are ``stopped``, without lag or error, so they never make a live source
        look worse)."""
        own = directory / f"{pid}.json"
        kept = [*_read(directory / _RETIRED), *_read(own)]
        retired = [
            SourceStatus(**{**vars(s), "state": "stopped", "lag": None, "last_error": None})
            for s in merge_statuses(kept)
        ]
        if retired:
            replace_file(directory / _RETIRED, orjson.dumps([s.to_dict() for s in retired]))
        own.unlink(missing_ok=True)


def _read(path: Path) -> list[SourceStatus]:
    # a file that is gone, or that says something unexpected: nothing
    with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
        return [_status(item) for item in orjson.loads(path.read_bytes())]
    return []


def _status(item: Any) -> SourceStatus:
    at = item["last_event_at"]
    return SourceStatus(
        name=item["name"],
        type=item["type"],
        state=item["state"],
        events=item["events"],
        errors=item["errors"],
        last_event_at=None if at is None else datetime.fromisoformat(at),
        last_error=item["last_error"],
        lag=item["lag"],
    )


def merge_statuses(statuses: Iterable[SourceStatus]) -> list[SourceStatus]:
    """One status per source name, in first-seen order: counts summed, the latest event, the
    largest lag, the worst state and an error of a copy that has one."""
    merged: dict[str, SourceStatus] = {}
    for s in statuses:
        m = merged.get(s.name)
        if m is None:
            merged[s.name] = SourceStatus(**vars(s))
            continue
        m.events += s.events
        m.errors += s.errors
        if s.last_event_at is not None and (
            m.last_event_at is None or s.last_event_at > m.last_event_at
        ):
            m.last_event_at = s.last_event_at
        m.last_error = m.last_error or s.last_error
        if s.lag is not None and (m.lag is None or s.lag > m.lag):
            m.lag = s.lag
        if _rank(s.state) < _rank(m.state):
            m.state = s.state
    return list(merged.values())


def _rank(state: str) -> int:
    return _WORST_FIRST.index(state) if state in _WORST_FIRST else len(_WORST_FIRST)
