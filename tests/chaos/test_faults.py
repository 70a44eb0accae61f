"""The standing chaos suite: one fault per test, injected into a real ``eventbus serve`` on its
embedded default while a stream of events flows through it to a recording function.

Each test publishes at a steady rate, injects its fault once a part of the stream was
accepted, lets the system settle and reconciles what the publisher got 202 for, what the
function received and what PostgreSQL recorded (``tests/chaos/_ledger.py``): nothing accepted
may be lost or go unaudited, and duplicates must be explained by the fault.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.chaos._ledger import Fault
from tests.chaos._rig import Rig
from tests.fixtures.receiver import Response
from tests.fixtures.wait import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

_RECOVER_WITHIN = 20.0  # seconds for the service to bring a killed embedded server back


def _kill_and_restart(rig: Rig, name: str) -> Callable[[], Awaitable[Fault]]:
    async def inject() -> Fault:
        began = time.monotonic()
        await rig.service.kill()
        await rig.service.start()
        return Fault(name, began, time.monotonic())

    return inject


async def test_sigkill_service_mid_stream(rig: Rig) -> None:
    inject = _kill_and_restart(rig, "SIGKILL eventbus, restart")
    report = await rig.run(count=2000, rate=400, after=600, inject=inject)
    report.check()


async def test_sigkill_service_mid_webhook_stream(rig: Rig) -> None:
    # the same fault on the HTTP trigger: a webhook answered 202 is never lost, and a sender's
    # retry of one cut off by the kill is the same event (its webhook-id), not a second one
    inject = _kill_and_restart(rig, "SIGKILL eventbus, restart (webhooks)")
    report = await rig.run(count=1500, rate=300, after=400, inject=inject, webhooks=True)
    report.check()


async def test_sigkill_embedded_nats_server(rig: Rig) -> None:
    async def inject() -> Fault:
        killed = rig.nats_server()
        assert killed is not None
        began = time.monotonic()
        killed.kill()

        def restarted() -> bool:
            again = rig.nats_server()
            return again is not None and again.pid != killed.pid

        what = "the embedded nats-server restarted"
        await eventually(restarted, within=_RECOVER_WITHIN, every=0.1, what=what)
        return Fault("SIGKILL nats-server", began, time.monotonic())

    report = await rig.run(count=2000, rate=400, after=600, inject=inject)
    report.check()


async def test_postgres_frozen_for_5s(rig: Rig) -> None:
    async def inject() -> Fault:
        # the whole server: a stopped postmaster alone would still serve open connections
        frozen = rig.postgres()
        assert frozen
        began = time.monotonic()
        for proc in frozen:
            proc.suspend()
        try:
            await asyncio.sleep(5)  # the fault itself lasts this long
        finally:
            for proc in frozen:
                proc.resume()
        return Fault("SIGSTOP/SIGCONT PostgreSQL for 5 s", began, time.monotonic())

    report = await rig.run(count=3000, rate=400, after=600, inject=inject)
    report.check()


async def test_function_down_for_6s(rig: Rig) -> None:
    async def inject() -> Fault:
        began = time.monotonic()
        await rig.receiver.stop()
        await asyncio.sleep(6)  # the fault itself lasts this long
        await rig.receiver.start()
        return Fault("function down for 6 s", began, time.monotonic())

    # a slower stream, so events keep arriving before (3 s), during and after (2 s) the outage
    report = await rig.run(count=2200, rate=200, after=600, inject=inject)
    report.check()
    assert report.counts["other attempt rows"] > 0, "the outage never met a delivery"


async def test_sigterm_mid_delivery(rig: Rig) -> None:
    # a function a little slower than the stream, so deliveries are in flight and a backlog
    # waits in the bus when SIGTERM comes
    rig.receiver.respond(Response(204, delay=0.03))

    async def inject() -> Fault:
        began = time.monotonic()
        code = await rig.service.terminate()
        assert code == 0, f"eventbus exited with {code} on SIGTERM: {rig.log_tail()}"
        await rig.service.start()
        return Fault("SIGTERM eventbus mid-delivery, restart", began, time.monotonic())

    report = await rig.run(count=2000, rate=400, after=600, inject=inject)
    report.check()


async def test_sigkill_one_kafka_worker_mid_stream(kafka_rig: Rig) -> None:
    # two workers in one consumer group: the killed one's partitions go to the other while
    # its parent restarts it, and what it had not committed is consumed again
    rig = kafka_rig

    async def restart_counted() -> bool:
        # the parent's count, served by the workers (it serves no /metrics itself)
        async with (
            aiohttp.ClientSession() as session,
            session.get(rig.service.url + "/metrics") as resp,
        ):
            text = await resp.text()
        found = re.findall(r'^eventbus_worker_restarts_total\{worker="\d"\} (\S+)$', text, re.M)
        assert len(found) <= 1 and float(found[0] if found else 0) <= 1, text
        return found == ["1.0"]

    async def inject() -> Fault:
        workers = rig.workers()
        assert len(workers) == 2, workers
        began = time.monotonic()
        workers[0].kill()

        def replaced() -> bool:
            now = rig.workers()
            return len(now) == 2 and workers[0].pid not in {p.pid for p in now}

        await eventually(replaced, within=_RECOVER_WITHIN, every=0.1, what="the worker restarted")
        await eventually(restart_counted, within=10, every=0.2, what="the restart in /metrics")
        return Fault("SIGKILL one of two Kafka workers", began, time.monotonic())

    report = await rig.run(count=2000, rate=400, after=600, inject=inject)
    report.check()
