"""The embedded PostgreSQL launcher and the per-test database fixture."""

from __future__ import annotations

import shutil

import asyncpg
import psutil
import pytest

from eventbus._errors import StoreError
from eventbus._supervisor import Supervisor
from eventbus.store import EmbeddedPostgres
from tests.fixtures.postgres import private_data_root
from tests.fixtures.wait import eventually


async def test_fresh_database_per_test(
    postgres_server: EmbeddedPostgres, database_dsn: str
) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("CREATE TABLE t (x int)")
        name = await conn.fetchval("SELECT current_database()")
        assert name.startswith("test_") and database_dsn == postgres_server.dsn_for(name)
    finally:
        await conn.close()


async def test_data_survives_restart(postgres_server: EmbeddedPostgres, database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    await conn.close()
    await postgres_server.stop()
    assert not postgres_server.running
    with pytest.raises(StoreError, match="not running"):
        _ = postgres_server.dsn
    await postgres_server.start()
    conn = await asyncpg.connect(database_dsn)
    try:
        assert await conn.fetchval("SELECT x FROM kept") == 7
    finally:
        await conn.close()


async def test_stop_start_idempotent_and_robust_to_a_parent_turning_private() -> None:
    root = private_data_root()
    try:
        pg = EmbeddedPostgres(root / "parent" / "pg")
        await pg.stop()
        async with pg:
            await pg.start()
            # What a new pytest session does to its temp root: the server's user (when run as
            # root) loses the path to its data directory; stop and start must restore it.
            root.chmod(0o700)
            await pg.stop()
            root.chmod(0o700)
            await pg.start()
            conn = await asyncpg.connect(pg.dsn)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        await pg.stop()
        assert not pg.running
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_unusable_data_dir_is_a_clear_error() -> None:
    root = private_data_root()
    try:
        (root / "a-file").write_text("not a directory")
        pg = EmbeddedPostgres(root / "a-file" / "pg")
        with pytest.raises(StoreError, match="failed to start"):
            await pg.start()
        assert not pg.running
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_a_killed_server_is_brought_back_by_the_supervisor() -> None:
    root = private_data_root()
    server = EmbeddedPostgres(root / "data")
    supervisor = Supervisor([server], check_every=0.1, backoff_first=0.2)
    try:
        await server.start()
        supervisor.start()
        conn = await asyncpg.connect(server.dsn)
        await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        await conn.close()
        pid = server.pid
        assert pid is not None and server.alive()
        psutil.Process(pid).kill()
        # The supervisor sees it die and starts it again (its children may hold the shared
        # memory a moment longer: the first restarts can fail, it backs off and retries).
        await eventually(lambda: not psutil.pid_exists(pid) or not server.alive())
        await eventually(server.alive, within=60, what="postgres restarted")
        conn = await _connect_when_up(server.dsn)
        try:
            assert await conn.fetchval("SELECT x FROM kept") == 7
        finally:
            await conn.close()
        assert supervisor.failed is None
    finally:
        await supervisor.stop()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _connect_when_up(dsn: str) -> asyncpg.Connection:
    found: list[asyncpg.Connection] = []

    async def connects() -> bool:
        try:
            found.append(await asyncpg.connect(dsn))
        except (OSError, asyncpg.PostgresError):
            return False
        return True

    await eventually(connects, within=60)
    return found[0]
