"""The rabbitmq source with a user and vhost the test creates (``rabbitmqctl``) and its password
from a secret, against the RabbitMQ on this machine (127.0.0.1:5672); and over amqps with mutual
TLS against a RabbitMQ node of the test's own (``tests/fixtures/rabbitmq_tls.py``: the
machine's broker has no TLS listener). Each part is skipped, with the reason, when its broker
or tool is missing."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from eventbus._errors import ConfigError
from eventbus.sources import SourceStatus, build_source
from tests.fixtures.nats import unique_name
from tests.fixtures.rabbitmq_tls import TlsRabbit, requires_rabbitmq_server
from tests.sources._harness import Recorder, eventually, make_context, running, source_pool

PASSWORD = "rabb1t-Passw0rd-x"


def _reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return False
    return shutil.which("rabbitmqctl") is not None


requires_machine_rabbitmq = pytest.mark.skipif(
    not _reachable(), reason="no RabbitMQ on 127.0.0.1:5672 or no rabbitmqctl on this machine"
)


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def vhost_user() -> Iterator[tuple[str, str]]:
    """A vhost and a user allowed everything in it, removed afterwards."""
    vhost, user = unique_name("eb-vhost"), unique_name("eb-user")
    _ctl("add_vhost", vhost)
    _ctl("add_user", user, PASSWORD)
    _ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    try:
        yield vhost, user
    finally:
        _ctl("delete_user", user)
        _ctl("delete_vhost", vhost)


@pytest.fixture
async def queue(
    vhost_user: tuple[str, str],
) -> AsyncIterator[tuple[str, AbstractChannel]]:
    vhost, user = vhost_user
    connection = await aio_pika.connect(
        host="127.0.0.1", login=user, password=PASSWORD, virtualhost=vhost
    )
    async with connection:
        channel = await connection.channel()
        name = unique_name("q")
        await channel.declare_queue(name, durable=True)
        yield name, channel


async def _state(status: SourceStatus, state: str) -> bool:
    return status.state == state


def _spec(name: str, vhost: str, user: str, queue: str, password: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "rabbitmq",
        "url": f"amqp://127.0.0.1:5672/{vhost}",
        "queue": queue,
        "username": user,
        "password": password,
    }


@requires_machine_rabbitmq
async def test_a_user_of_a_vhost_with_a_password_from_the_environment(
    vhost_user: tuple[str, str],
    queue: tuple[str, AbstractChannel],
    database_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vhost, user = vhost_user
    name, channel = queue
    monkeypatch.setenv("EVENTBUS_TEST_RABBIT_PW", PASSWORD)
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "rq", recorder)
        spec = _spec("rq", vhost, user, name, {"env": "EVENTBUS_TEST_RABBIT_PW"})
        async with running(build_source(spec), ctx):
            await eventually(lambda: _state(ctx.status, "running"))
            event = {"specversion": "1.0", "id": "r1", "source": "/s", "type": "t"}
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(event)), routing_key=name
            )
            events = await recorder.wait_for(1)
    assert [e["id"] for e in events] == ["r1"]


@requires_machine_rabbitmq
async def test_a_wrong_password_backs_off_without_showing_it(
    vhost_user: tuple[str, str], queue: tuple[str, AbstractChannel], database_dsn: str
) -> None:
    vhost, user = vhost_user
    name, _ = queue
    wrong = "not-" + PASSWORD
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "rq-wrong", Recorder())
        async with running(build_source(_spec("rq-wrong", vhost, user, name, wrong)), ctx):
            await eventually(lambda: _state(ctx.status, "backoff"))
    error = ctx.status.last_error or ""
    assert "ACCESS_REFUSED" in error or "authentication" in error.lower(), error
    assert wrong not in error


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"tls": {"ca": "/ca.pem"}}, "tls needs an amqps:// url"),
        ({"username": None, "password": "p"}, "password needs a username"),
        ({"url": "amqps://h/", "tls": {"ca": "/nope.pem"}}, r"rabbitmq source 'r': tls\.ca"),
    ],
)
def test_bad_rabbitmq_security_names_the_source(extra: dict[str, Any], fragment: str) -> None:
    spec = {"name": "r", "type": "rabbitmq", "url": "amqp://h/", "queue": "q", **extra}
    with pytest.raises(ConfigError, match=fragment):
        build_source(spec)


@pytest.mark.parametrize(
    ("query", "warned"),
    [
        ("?no_verify_ssl=1", True),
        ("?no_verify_ssl=false", True),  # aiormq verifies only with exactly "0"
        ("?no_verify_ssl=", True),
        ("?no_verify_ssl=0", False),
        ("", False),
    ],
)
def test_verification_turned_off_in_the_url_is_warned_about(
    caplog: pytest.LogCaptureFixture, query: str, warned: bool
) -> None:
    # aiormq's own switch took every certificate without a word, unlike the tls block's
    # insecure_skip_verify
    spec = {"name": "r", "type": "rabbitmq", "url": f"amqps://h/{query}", "queue": "q"}
    with caplog.at_level(logging.WARNING, logger="eventbus.sources"):
        build_source(spec)
    assert ("TLS CERTIFICATE VERIFICATION IS OFF (no_verify_ssl" in caplog.text) is warned


def _amqps_spec(name: str, rabbit: TlsRabbit, queue: str, **tls: Any) -> dict[str, Any]:
    pki = rabbit.pki
    return {
        "name": name,
        "type": "rabbitmq",
        "url": f"amqps://127.0.0.1:{rabbit.port}/{rabbit.vhost}",
        "queue": queue,
        "username": rabbit.user,
        "password": rabbit.password,
        "tls": {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)} | tls,
    }


@pytest.fixture
async def tls_queue(tls_rabbitmq: TlsRabbit) -> AsyncIterator[tuple[str, AbstractChannel]]:
    """A durable queue on the test's amqps node, and a channel of a client with a certificate."""
    pki = tls_rabbitmq.pki
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    connection = await aio_pika.connect(
        host="127.0.0.1",
        port=tls_rabbitmq.port,
        login=tls_rabbitmq.user,
        password=tls_rabbitmq.password,
        virtualhost=tls_rabbitmq.vhost,
        ssl=True,
        ssl_context=context,
    )
    async with connection:
        channel = await connection.channel()
        name = unique_name("q")
        await channel.declare_queue(name, durable=True)
        yield name, channel


@requires_rabbitmq_server
async def test_amqps_with_a_client_certificate_and_a_password_from_a_file(
    tls_rabbitmq: TlsRabbit,
    tls_queue: tuple[str, AbstractChannel],
    database_dsn: str,
    tmp_path: Path,
) -> None:
    name, channel = tls_queue
    secret = tmp_path / "amqp-password"
    secret.write_text(tls_rabbitmq.password + "\n")
    spec = _amqps_spec("rq-tls", tls_rabbitmq, name) | {"password": {"file": str(secret)}}
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "rq-tls", recorder)
        async with running(build_source(spec), ctx):
            await eventually(lambda: _state(ctx.status, "running"))
            event = {"specversion": "1.0", "id": "tls-1", "source": "/s", "type": "t"}
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(event)), routing_key=name
            )
            events = await recorder.wait_for(1)
    assert [e["id"] for e in events] == ["tls-1"]


@requires_rabbitmq_server
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # The broker's certificate is checked against the configured CA, not the system's.
        ("other-ca", "certificate verify failed"),
        # The broker requires a client certificate: without one it ends the connection (under
        # TLS 1.3 its alert comes after the client's side of the handshake is done, so the
        # client sees a reset, or the alert when it reads first).
        ("no-client-cert", "reset|certificate required"),
        # The name checked is the configured server_name, which the certificate does not carry.
        ("wrong-server-name", "certificate verify failed"),
    ],
)
async def test_amqps_refusals_back_off_with_the_tls_error(
    tls_rabbitmq: TlsRabbit,
    tls_queue: tuple[str, AbstractChannel],
    database_dsn: str,
    case: str,
    expected: str,
) -> None:
    name, _ = tls_queue
    pki = tls_rabbitmq.pki
    tls: dict[str, Any] = {
        "other-ca": {"ca": str(pki.other_ca)},
        "no-client-cert": {"cert": None, "key": None},
        "wrong-server-name": {"server_name": "elsewhere.test"},
    }[case]
    spec = _amqps_spec(f"rq-{case}", tls_rabbitmq, name, **tls)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, f"rq-{case}", Recorder())
        async with running(build_source(spec), ctx):
            await eventually(lambda: _state(ctx.status, "backoff"))
    error = ctx.status.last_error or ""
    assert re.search(expected, error.lower()), error
    assert tls_rabbitmq.password not in error
