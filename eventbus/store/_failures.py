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
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg

from eventbus._errors import StoreDataError, StoreError, StoreUnavailable

__all__ = ["READ_TIMEOUT", "run_db"]

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
)
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


def _forget(task: asyncio.Future[Any]) -> None:
    # The abandoned read's outcome no longer matters; retrieving it keeps asyncio quiet.
    if not task.cancelled():
        task.exception()
