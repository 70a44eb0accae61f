"""PostgreSQL over TLS with a password: a server of the test's own from the system's PostgreSQL
(the embedded one is built without SSL), listening on 127.0.0.1 with ``ssl = on`` (a trustme
certificate) and a ``pg_hba.conf`` that takes only TLS connections with a password.
``verify-full`` passes with the right CA and fails with another; ``sslmode: disable`` and a
wrong password are refused without showing it."""

from __future__ import annotations

from typing import Any

import pytest

from eventbus._errors import StoreError
from eventbus.config import DatabaseSettings
from eventbus.store import Store
from tests.fixtures.certs import Pki
from tests.fixtures.postgres_tls import requires_system_postgres

pytestmark = requires_system_postgres


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
    with pytest.raises(StoreError, match="certificate verify failed") as refused:
        await _open(dsn, password, sslmode="verify-full", tls={"ca": str(pki.other_ca)})
    # named as what it is: it read "invalid Postgres DSN ..."
    assert str(refused.value).startswith("TLS with Postgres at "), refused.value


async def test_require_encrypts_without_checking_the_server_unless_a_ca_is_given(
    tls_postgres: tuple[str, str, Pki],
) -> None:
    dsn, password, pki = tls_postgres
    store = await _open(dsn, password, sslmode="require", tls={})
    try:
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await store.close()
    # with a root CA, libpq's require verifies the chain (verify-ca): the CA given was dropped
    # without a word, and every certificate taken
    with pytest.raises(StoreError, match="certificate verify failed"):
        await _open(dsn, password, sslmode="require", tls={"ca": str(pki.other_ca)})
    store = await _open(dsn, password, sslmode="require", tls={"ca": str(pki.ca)})
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
