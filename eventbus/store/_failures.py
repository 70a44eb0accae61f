"""How the store reports PostgreSQL's failures: one translation of asyncpg's errors into the
eventbus tree, and the deadline of the reads the HTTP API serves.

Every component that queries PostgreSQL (the store, the delivery store, the sources' tables)
runs its statements through :func:`run_db`, so a refused value becomes
:class:`~eventbus._errors.StoreDataError` (answered 400: the request is at fault), a server
that cannot be reached :class:`~eventbus._errors.StoreUnavailable` (the same statement may
succeed later) and any other refusal :class:`~eventbus._errors.StoreError` (answered 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import asyncpg

from eventbus._errors import StoreDataError, StoreError, StoreUnavailable

__all__ = ["DB_FAILURES", "READ_TIMEOUT", "STALLED_AFTER", "Outstanding", "run_db"]

READ_TIMEOUT = 5.0
"""Seconds an API read (event trail, dead letters) may take, waiting for a connection included:
a frozen or overloaded PostgreSQL then answers 503 promptly instead of holding the request."""

# What asyncpg raises when PostgreSQL refuses a statement or the connection fails; a timeout is
# an OSError too.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# Of those, the ones that say PostgreSQL is away (down, restarting, the connection lost), not
# that it refused the statement.
_UNREACHABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # SQLSTATE 53300: the server is full now, and may not be in a moment (start-up waits on
    # it too); as a refusal, an attempt made but not recorded was made again
    asyncpg.TooManyConnectionsError,
    # asyncpg's own state gone wrong as the connection broke ("cannot switch to state 15",
    # seen when PostgreSQL was killed during a commit): escaped untranslated, the router
    # took it for a failed delivery and had the bus deliver the event again
    asyncpg.InternalClientError,
)
DB_FAILURES = (*_DB_ERRORS, asyncpg.InternalClientError)
"""Everything a statement may raise for the database's sake (refused, unreachable, timed out,
the driver's state broken with the connection): what a background task catches to go on."""
_DATA_EXCEPTION = "22"  # SQLSTATE class: a value the statement cannot take

_T = TypeVar("_T")


async def run_db(what: str, operation: Awaitable[_T], *, deadline: float | None = None) -> _T:
    """Await ``operation``, translating asyncpg's errors (``what`` leads the message); with
    ``deadline``, give up after that many seconds.

    Raises :class:`StoreDataError` for a value PostgreSQL (or asyncpg, encoding it) refuses,
    :class:`StoreUnavailable` when it cannot be reached or does not answer (the deadline
    included), and :class:`StoreError` for every other failure.
    """
    if deadline is None:
        return await _translated(what, operation)
    # A task of its own, abandoned at the deadline: cancelling a query makes asyncpg send a
    # cancel request and return the connection only once the server acknowledges it, which a
    # frozen server never does; the caller must not wait for that.
    task = asyncio.ensure_future(_translated(what, operation))
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline)
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(_forget)
    if not done:
        raise StoreUnavailable(f"{what}: PostgreSQL did not answer within {deadline:g} s")
    return task.result()


async def _translated(what: str, operation: Awaitable[_T]) -> _T:
    try:
        return await operation
    except TimeoutError as exc:
        raise StoreUnavailable(f"{what}: PostgreSQL did not answer in time") from exc
    except _UNREACHABLE as exc:
        raise StoreUnavailable(f"{what}: {exc!r}") from exc
    except asyncpg.PostgresError as exc:
        if str(exc.sqlstate).startswith(_DATA_EXCEPTION):
            raise StoreDataError(f"{what}: {exc}") from exc
        raise StoreError(f"{what}: {exc}") from exc
    except _DB_ERRORS as exc:
        raise StoreError(f"{what}: {exc}") from exc


STALLED_AFTER = 45.0
"""Seconds a write may go unanswered before readiness reports the database stalled: more than
any write takes (a batch's COPY gives up at 30 s), and a write has no deadline of its own."""


class Outstanding:
    """The writes of one component still awaited, and since when.

    A write that never returns raises nothing: a COMMIT waiting for a synchronous standby that
    is down, a server frozen with the connection open. Its caller waits, and so does what waits
    on it (the router, for the audit; a delivery, for its retry row), while a ``SELECT true``
    still answers. Readiness asks ``stalled`` (one of these writes cannot be given a deadline
    and abandoned: it may have committed).
    """

    def __init__(self) -> None:
        self._started: dict[int, tuple[str, float]] = {}
        self._count = 0

    @contextlib.contextmanager
    def write(self, what: str) -> Iterator[None]:
        """Count the block as one write, named ``what``, while it runs."""
        self._count += 1
        token = self._count
        self._started[token] = (what, time.monotonic())
        try:
            yield
        finally:
            del self._started[token]

    def stalled(self, after: float = STALLED_AFTER) -> str | None:
        """Which write has gone unanswered for longer than ``after`` seconds, and for how
        long; None when none has."""
        if not self._started:
            return None
        what, since = min(self._started.values(), key=lambda started: started[1])
        waited = time.monotonic() - since
        return f"{what} unanswered for {waited:.0f} s" if waited > after else None


def _forget(task: asyncio.Future[Any]) -> None:
    # The abandoned read's outcome no longer matters; retrieving it keeps asyncio quiet.
    if not task.cancelled():
        task.exception()
