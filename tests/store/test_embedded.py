"""The embedded PostgreSQL launcher and the per-test database fixture."""

from __future__ import annotations

import shutil

import asyncpg
import pytest

from eventbus._errors import StoreError
from eventbus.store import EmbeddedPostgres
from tests.fixtures.postgres import private_data_root


async def test_fresh_database_per_test(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("CREATE TABLE t (x int)")
        name = await conn.fetchval("SELECT current_database()")
        assert database_dsn.startswith(f"postgresql://postgres:@/{name}?")
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
