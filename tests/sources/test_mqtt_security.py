"""The mqtt source over TLS with a username and password, MQTT 3.1.1 and 5, against a Mosquitto
of the test's own (a password file and a certificate from trustme, on a free port). Skipped,
with the reason, when the ``mosquitto`` binary is not on this machine."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from eventbus._errors import ConfigError
from eventbus.bus._nats_server import free_port
from eventbus.sources import SourceStatus, build_source
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.nats import unique_name
from tests.sources._harness import Recorder, eventually, make_context, running, source_pool

PASSWORD = "mqtt-Passw0rd-9"

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None,
    reason="no mosquitto / mosquitto_passwd binary on this machine",
)


def _configure(directory: Path, pki: Pki, port: int) -> Path:
    passwd = directory / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "eventbus", PASSWORD], check=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"allow_anonymous false\npassword_file {passwd}\n"
        "persistence false\nuser root\n"
    )
    return conf


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[tuple[int, Pki]]:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    conf = _configure(tmp_path, pki, port)
    with (tmp_path / "mosquitto.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            "mosquitto", "-c", str(conf), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        yield port, pki
    finally:
        proc.terminate()
        await proc.wait()


def _spec(name: str, port: int, pki: Pki, topic: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "mqtt",
        "port": port,
        "topics": [topic],
        "username": "eventbus",
        "password": PASSWORD,
        "tls": {"ca": str(pki.ca)},
        **extra,
    }


async def _state(status: SourceStatus, state: str) -> bool:
    return status.state == state


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_tls_and_a_password_bring_messages_in(
    broker: tuple[int, Pki], database_dsn: str, protocol: str
) -> None:
    port, pki = broker
    topic = unique_name("dev")
    recorder = Recorder()
    name = unique_name("mq")
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, name, recorder)
        source = build_source(_spec(name, port, pki, topic, protocol=protocol))
        async with running(source, ctx):
            await eventually(lambda: _state(ctx.status, "running"))
            async with aiomqtt.Client(
                "127.0.0.1",
                port,
                username="eventbus",
                password=PASSWORD,
                tls_context=ssl.create_default_context(cafile=str(pki.ca)),
            ) as pub:
                event = {"specversion": "1.0", "id": "m1", "source": "/s", "type": "t"}
                await pub.publish(topic, orjson.dumps(event), qos=1)
            events = await recorder.wait_for(1)
    assert [e["id"] for e in events] == ["m1"]


async def test_a_wrong_password_backs_off_without_showing_it(
    broker: tuple[int, Pki], database_dsn: str
) -> None:
    port, pki = broker
    wrong = "not-" + PASSWORD
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "mq-wrong", Recorder())
        source = build_source(_spec("mq-wrong", port, pki, "x", password=wrong))
        async with running(source, ctx):
            await eventually(lambda: _state(ctx.status, "backoff"))
    error = ctx.status.last_error or ""
    assert "not authorized" in error.lower() or "bad user name or password" in error.lower()
    assert wrong not in error


async def test_a_certificate_from_another_ca_is_refused(
    broker: tuple[int, Pki], database_dsn: str
) -> None:
    port, pki = broker
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "mq-ca", Recorder())
        spec = _spec("mq-ca", port, pki, "x", tls={"ca": str(pki.other_ca)})
        async with running(build_source(spec), ctx):
            await eventually(lambda: _state(ctx.status, "backoff"))
    assert "certificate verify failed" in (ctx.status.last_error or "")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"protocol": "3"}, "protocol"),
        ({"username": None}, "password needs a username"),
        ({"tls": {"ca": "/nope.pem"}}, r"mqtt source 'm': tls\.ca /nope\.pem"),
    ],
)
def test_bad_mqtt_security_names_the_source(extra: dict[str, Any], fragment: str) -> None:
    pki_free = {"name": "m", "type": "mqtt", "topics": ["t"], "password": "p", "username": "u"}
    with pytest.raises(ConfigError, match=fragment):
        build_source({**pki_free, **extra})
