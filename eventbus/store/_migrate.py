"""Versioned schema migrations: the first thing :meth:`Store.open` does with a connection.

Every file ``eventbus/store/migrations/NNNN_name.sql`` is one migration; version ``NNNN`` orders
them. Each is applied in its own transaction and recorded in
``schema_migrations(version, name, applied_at)``. Several eventbus processes starting at once
against a fresh database are serialized with a session-level ``pg_advisory_lock``, so each
migration runs exactly once. A database recording a version newer than any file this code ships
is refused: an older eventbus must not write into a schema it does not understand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import asyncpg

from eventbus._errors import StoreError

__all__ = ["Migration", "discover", "migrate"]

_log = logging.getLogger(__name__)

# Arbitrary but fixed: every eventbus process must contend for the same advisory lock key.
_LOCK_KEY = 0x6576_656E_7462_7573  # "eventbus" in ASCII
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One schema migration file."""

    version: int
    name: str
    sql: str


def discover(directory: Traversable | None = None) -> list[Migration]:
    """Read the migration files in ``directory`` (default: the package's own), by version.

    Raises StoreError for a ``.sql`` file not named ``NNNN_name.sql`` or for two files
    claiming the same version; other files are ignored.
    """
    root = directory if directory is not None else files("eventbus.store") / "migrations"
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.match(entry.name)
        if match is None:
            raise StoreError(
                f"migration file {entry.name!r} is not named NNNN_name.sql "
                "(four digits, underscore, lowercase name)"
            )
        version = int(match.group(1))
        if version in found:
            raise StoreError(
                f"migration files {found[version].name!r} and {match.group(2)!r} "
                f"both claim version {version:04d}"
            )
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(
    conn: asyncpg.Connection, migrations: list[Migration] | None = None
) -> list[Migration]:
    """Bring the database behind ``conn`` up to date; return the migrations applied now.

    ``migrations`` defaults to :func:`discover`. Safe to call concurrently from several
    processes (an advisory lock serializes them) and idempotent. Raises StoreError if the
    database records a version newer than the newest known one, or if a migration's SQL fails
    (that migration is rolled back; earlier ones stay applied) or the connection is lost.
    Migrations run inside a transaction, so they cannot use ``CREATE INDEX CONCURRENTLY``.
    """
    known = discover() if migrations is None else migrations
    try:
        await _take_lock(conn)
        try:
            return await _apply_locked(conn, known)
        finally:
            # A lost connection has released its session lock already; keep the first error.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"cannot migrate the schema: {exc}") from exc


async def _take_lock(conn: asyncpg.Connection, say_every: float = 10.0) -> None:
    """Take the migration lock, saying every ``say_every`` seconds who holds it: a start that
    waited on it (another instance frozen or cut off while migrating) said nothing, its health
    check "starting", for as long as it lasted."""
    began = time.monotonic()
    said = began
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        await asyncio.sleep(0.2)
        if time.monotonic() - said < say_every:
            continue
        said = time.monotonic()
        holder = await conn.fetchrow(
            "SELECT pid, coalesce(application_name, '') AS app, coalesce(host(client_addr), "
            "'local') AS addr, state FROM pg_stat_activity WHERE pid = (SELECT pid FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted"
            " AND ((classid::bigint << 32) | objid::bigint) = $1 LIMIT 1)",
            _LOCK_KEY,
        )
        who = (
            "another session"
            if holder is None
            else f"PostgreSQL backend {holder['pid']} ({holder['addr']}"
            + (f", {holder['app']}" if holder["app"] else "")
            + f", {holder['state']})"
        )
        _log.warning(
            "waiting %.0f s for the schema migration lock, held by %s: another eventbus "
            "instance migrating, or one stopped while it held the lock",
            said - began,
            who,
        )


async def _apply_locked(conn: asyncpg.Connection, known: list[Migration]) -> list[Migration]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer     PRIMARY KEY,
               name       text        NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now()
           )"""
    )
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    applied = {row["version"]: row["name"] for row in rows}
    newest_known = max((m.version for m in known), default=0)
    if applied and max(applied) > newest_known:
        version = max(applied)
        raise StoreError(
            f"the database schema is at version {version:04d} ({applied[version]}), newer than "
            f"this eventbus knows (up to {newest_known:04d}); upgrade eventbus before starting it"
        )
    done: list[Migration] = []
    for migration in known:
        if migration.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
        except asyncpg.PostgresError as exc:
            raise StoreError(
                f"migration {migration.version:04d}_{migration.name}.sql failed: {exc}"
            ) from exc
        _log.info("applied migration %04d_%s", migration.version, migration.name)
        done.append(migration)
    return done
