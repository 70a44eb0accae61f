"""The exception tree of eventbus: every error the package raises on purpose.

    EventBusError
     ├── ConfigError              settings or connector YAML is invalid
     ├── RuleError                one problem in a rule file (file, line, rule name)
     │    └── PatternError        an event pattern is malformed (raised by ``matches``)
     ├── RuleSetError             a rule set failed to load: carries every RuleError at once
     ├── CloudEventError          an incoming event or request is invalid (HTTP status + detail)
     ├── BusError                 the durable bus refused or could not be reached
     │    ├── BusUnavailable      not reachable right now: retry later (HTTP 503)
     │    └── EventTooLargeForBus this event is over the broker's message limit (HTTP 413)
     ├── SelectionChanged         a replay or purge's confirmed count no longer matches (409)
     ├── StoreError               Postgres could not be reached or rejected a write
     │    ├── StoreUnavailable    not reachable right now: retry later (HTTP 503)
     │    └── StoreDataError      Postgres refused a value of the statement (HTTP 400)
     └── DeliveryError            a target invocation failed (carries retryable / status)

Third-party errors are translated at the boundary with ``raise ... from exc``. An error's text,
wherever eventbus records or forwards it (an attempt's outcome, the audit trail, a dead letter
and its ``deadlettererror`` attribute, a health reason), is cut by ``truncate_error``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

__all__ = [
    "MAX_ERROR_CHARS",
    "BusError",
    "BusUnavailable",
    "CloudEventError",
    "ConfigError",
    "DeliveryError",
    "EventBusError",
    "EventTooLargeForBus",
    "FailureRun",
    "PatternError",
    "RuleError",
    "RuleSetError",
    "SelectionChanged",
    "StoreDataError",
    "StoreError",
    "StoreUnavailable",
    "error_text",
    "masked",
    "truncate_error",
]

MAX_ERROR_CHARS = 1024
"""The one limit for error texts: long enough for a status line and the start of a response
body or a traceback's last line, short enough that an attempt row, a dead letter's history of
185 attempts and a header carrying the text (``deadlettererror``) stay small."""


class EventBusError(Exception):
    """Root of every error eventbus raises on purpose."""


class ConfigError(EventBusError):
    """Settings or connector definitions are invalid; the message names file and line."""


class RuleError(EventBusError):
    """One problem in one rule: where it is and what is wrong."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        rule: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.rule = rule
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.rule is not None:
            where = f"{where} rule {self.rule!r}" if where else f"rule {self.rule!r}"
        return f"{where}: {self.message}" if where else self.message


class PatternError(RuleError):
    """An event pattern is malformed; ``path`` is the dotted field path inside the pattern,
    ``keys`` the same place as the pattern's keys and ``$or`` indexes (a key may hold a dot or
    brackets: the text alone did not tell where, and the error named the wrong line)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        self.keys: tuple[str | int, ...] = ()
        super().__init__(f"{path}: {message}" if path else message)

    def within(self, key: str | int) -> None:
        """Place this error under ``key`` of the object or array it came from."""
        self.keys = (key, *self.keys)


class RuleSetError(EventBusError):
    """Loading a rule set failed; ``errors`` lists every problem found, not just the first."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class CloudEventError(EventBusError):
    """An incoming CloudEvent or request is invalid; ``status`` is the HTTP status to answer."""

    def __init__(
        self, detail: str, *, status: int = 400, title: str = "Invalid CloudEvent"
    ) -> None:
        self.detail = detail
        self.status = status
        self.title = title
        super().__init__(detail)


class BusError(EventBusError):
    """The durable bus rejected an operation."""


class BusUnavailable(BusError):
    """The bus cannot be reached now; the caller should retry later (HTTP 503)."""


class EventTooLargeForBus(BusError):
    """The broker's message limit is below this event on the bus (HTTP 413): the bus itself is
    fine, other events pass, and this one never will as configured."""


class SelectionChanged(EventBusError):
    """A replay or purge given the count the operator confirmed (``expect``) found another
    number of dead letters selected: nothing was done; ``count`` is how many match now."""

    def __init__(self, expected: int, count: int) -> None:
        self.expected = expected
        self.count = count
        super().__init__(
            f"{count} dead letter{'' if count == 1 else 's'} match{'es' if count == 1 else ''} "
            f"now, not the {expected} confirmed: nothing was done "
            "(count them again, and confirm that number)"
        )


class StoreError(EventBusError):
    """Postgres could not be reached or rejected a statement."""


class StoreUnavailable(StoreError):
    """Postgres cannot be reached right now (down, restarting, the connection lost): the same
    statement may succeed later."""


class StoreDataError(StoreError):
    """Postgres refused a value of the statement (SQLSTATE class 22, a number out of range, a
    character text cannot hold): the caller's input is at fault, and retrying cannot help."""


class DeliveryError(EventBusError):
    """A target invocation failed.

    ``retryable`` says whether trying again may succeed; ``status`` is the HTTP status (or None),
    ``retry_after`` a server-requested delay in seconds (or None).
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


def truncate_error(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS`` (ending in "..." when cut), each NUL replaced by
    U+FFFD: error texts quote what a function or broker answered, and PostgreSQL's text
    columns refuse NUL (a dead letter that cannot be written is never settled)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def masked(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` in it replaced by ``***`` (the longest first, so
    that one containing another goes whole). Error texts quote what a function or an identity
    provider answered, and some echo the request back, credentials included; a secret shorter
    than 4 characters is left (it would mask ordinary words)."""
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def error_text(exc: BaseException) -> str:
    """``exc`` for a status or a health answer: its type and its text, or what the type
    means where it has none (a bare TimeoutError read "TimeoutError: ")."""
    text = str(exc)
    if not text and isinstance(exc, TimeoutError):
        text = "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FailureRun:
    """Failures in a row of one repeated operation (a component's health reads it): since
    when, and the last one's text; ``ended`` once the operation succeeds."""

    __slots__ = ("at", "last", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        """``time.monotonic()`` of the run's first failure; None while not failing."""
        self.at = 0.0
        """``time.monotonic()`` of the run's last failure."""
        self.last = ""

    def failed(self, exc: BaseException, *, new: bool = False) -> None:
        """Count ``exc``: the first of a run unless one is under way (or ``new``)."""
        self.at = time.monotonic()
        if self.since is None or new:
            self.since = self.at
        self.last = truncate_error(error_text(exc))

    def ended(self) -> None:
        self.since = None
        self.last = ""

    def longer_than(self, seconds: float) -> float | None:
        """How long the run has lasted, once that is at least ``seconds``; else None."""
        if self.since is None:
            return None
        lasted = time.monotonic() - self.since
        return lasted if lasted >= seconds else None

    def still_longer_than(self, seconds: float) -> float | None:
        """:meth:`longer_than`, while the last failure is within ``seconds`` too (an operation
        not tried since is not news); else None."""
        if time.monotonic() - self.at > seconds:
            return None
        return self.longer_than(seconds)
