"""Liveness and readiness on a running service: /readyz answers promptly and says which
component is in the way (a frozen database, an audit writer that cannot write), /healthz
stays green for what the service rides out and turns red only when it cannot go on."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import aiohttp
import psutil
import pytest_asyncio

from eventbus._supervisor import Supervisor
from eventbus.store import EmbeddedPostgres
from tests.fixtures.postgres import private_data_root
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import StartService
from tests.fixtures.wait import eventually
from tests.test_supervisor import Scripted

RULES = """
- name: all
  match: {source: [{prefix: "tests/"}]}
  targets: [fn]
"""


@pytest_asyncio.fixture
async def own_postgres() -> AsyncIterator[EmbeddedPostgres]:
    root = private_data_root()
    server = EmbeddedPostgres(root / "data")
    await server.start()
    try:
        yield server
    finally:
        for proc in _whole(server):
            proc.resume()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _whole(server: EmbeddedPostgres) -> list[psutil.Process]:
    if server.pid is None or not psutil.pid_exists(server.pid):
        return []
    postmaster = psutil.Process(server.pid)
    return [postmaster, *postmaster.children(recursive=True)]


async def test_readyz_answers_promptly_while_the_database_is_frozen(
    eventbus: StartService, receiver: Receiver, own_postgres: EmbeddedPostgres
) -> None:
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        settings={"database": {"url": own_postgres.dsn}},
    )
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200
    assert body == {"bus": "ok", "database": "ok", "audit": "ok", "router": "ok", "retries": "ok"}
    frozen = _whole(own_postgres)
    for proc in frozen:
        proc.suspend()
    try:
        # Bounded by the client: a probe that takes longer than a second or two is useless to
        # an orchestrator (it used to take 20 s here).
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(svc.url + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["database"] == "no answer within 0.8 s"
            async with session.get(svc.url + "/healthz") as resp:
                assert resp.status == 200  # frozen is not dead: wait, do not restart
    finally:
        for proc in frozen:
            proc.resume()

    async def ready() -> bool:
        return (await svc.request("GET", "/readyz"))[0] == 200

    await eventually(ready, within=60, what="ready again after the thaw")


async def test_healthz_fails_when_an_embedded_server_cannot_be_brought_back(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    status, _, body = await svc.request("GET", "/healthz")
    assert status == 200 and body == {"status": "ok"}
    # The service's own servers are external here: watch one that died and will not start.
    gone = Scripted("nats-server", failures=10**6)
    gone.up = False
    supervisor = Supervisor([gone], check_every=0.01, backoff_first=0.01, give_up_after=2)
    svc.service.supervisor = supervisor
    supervisor.start()
    try:
        await eventually(lambda: supervisor.failed is not None)
        status, _, body = await svc.request("GET", "/healthz")
        assert status == 503 and body["status"] == "failed"
        assert "nats-server" in body["detail"] and "will not start" in body["detail"]
    finally:
        await supervisor.stop()
