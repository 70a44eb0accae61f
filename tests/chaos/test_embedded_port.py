"""The embedded nats-server's port taken by another program while the server is down (killed,
crashed): the service, reconnecting by itself, must not hand that program a credential, and
the supervisor must not take that program's greeting for the server it restarted."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time

import aiohttp
import orjson
import psutil
import pytest

from tests.chaos._rig import Rig
from tests.fixtures.wait import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# what a nats-server greets with: a nonce to sign, credentials required
_INFO = (
    b'INFO {"server_id":"SQUAT","version":"2.10.0","proto":1,"host":"127.0.0.1",'
    b'"max_payload":1048576,"auth_required":true,"nonce":"bm9uY2Utb2YtdGhlLXNxdWF0dGVy"}\r\n'
)


def _listen_port(proc: psutil.Process) -> int:
    return next(
        c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
    )


async def _squat(port: int, within: float) -> socket.socket | None:
    """Bind and listen on ``port`` as soon as it is free (polling every 2 ms for ``within``
    seconds); None when the restarted server took it first."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            await asyncio.sleep(0.002)
            continue
        sock.listen(16)
        sock.setblocking(False)
        return sock
    return None


async def test_a_program_on_the_port_of_a_killed_server_gets_no_credential(rig: Rig) -> None:
    await rig.service.start()
    password = re.search(
        r'password: "([^"]+)"', (rig.data / "nats" / "nats-server.conf").read_text()
    )
    assert password is not None
    connects: list[bytes] = []
    for _attempt in range(3):  # the supervisor restarts the server within a second: race it
        server = rig.nats_server()
        assert server is not None
        port = _listen_port(server)
        server.kill()
        server.wait(5)
        squatter = await _squat(port, within=2.0)
        if squatter is not None:
            break
        await eventually(lambda: rig.nats_server() is not None, within=20, what="restarted")
    else:
        pytest.fail("the restarted server took the port first three times")
    log_before = rig.service.log.read_text()

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_INFO)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(5):
                while line := await reader.readline():
                    if line.startswith(b"CONNECT"):
                        connects.append(line)
                        break
        writer.close()

    try:
        squat = await asyncio.start_server(greet, sock=squatter)
        # the service's client reconnects every few hundred milliseconds; the supervisor tries
        # to start the server again meanwhile
        await eventually(lambda: len(connects) >= 2, within=20, what="the client reconnecting")
        await asyncio.sleep(2.0)  # the supervisor's checks while the port is held
    finally:
        squat.close()
        squatter.close()
    for line in connects:
        assert password[1].encode() not in line and b'"pass"' not in line, line
        assert b'"sig"' in line and b'"nkey"' in line, line  # it signed the nonce instead
    held = rig.service.log.read_text()[len(log_before) :]
    # the program's greeting is not the server's: no restart is announced while it holds the port
    assert "embedded nats-server restarted" not in held, held[-3000:]
    assert "restarting embedded nats-server failed" in held, held[-3000:]
    # once the port is free again the server comes back, and events flow
    await eventually(lambda: rig.nats_server() is not None, within=30, what="the server back")
    event = {"specversion": "1.0", "id": "after", "source": "chaos/port", "type": "chaos.tick"}

    async def accepted() -> bool:  # 503 until the client has reconnected
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                rig.service.url + "/events",
                data=orjson.dumps(event),
                headers={"Content-Type": "application/cloudevents+json"},
            ) as resp,
        ):
            return resp.status == 202

    await eventually(accepted, within=30, every=0.2, what="an event accepted again")
    await rig.receiver.wait_for(1, timeout=30)
