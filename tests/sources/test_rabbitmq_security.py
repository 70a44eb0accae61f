"""The rabbitmq source with a user and vhost the test creates (``rabbitmqctl``) and its password
from a secret, against the RabbitMQ on this machine (127.0.0.1:5672). amqps is not exercised
against a broker: the machine's RabbitMQ has no TLS listener, and giving it one means changing
and restarting a broker other tests share. Skipped, with the reason, when the broker or
``rabbitmqctl`` is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from eventbus._errors import ConfigError
from eventbus.sources import SourceStatus, build_source
from tests.fixtures.nats import unique_name
from tests.sources._harness import Recorder, eventually, make_context, running, source_pool

PASSWORD = "rabb1t-Passw0rd-x"


def _reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return False
    return shutil.which("rabbitmqctl") is not None


pytestmark = pytest.mark.skipif(
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
