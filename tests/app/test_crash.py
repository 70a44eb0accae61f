"""Crash and shutdown: ``eventbus serve`` as a real process on real NATS and PostgreSQL.

SIGKILL with 1,000 events in flight, restart: every event that got a 2xx is delivered at
least once. SIGTERM: in-flight deliveries finish, the audit is flushed, and what was not
delivered is delivered by the next process.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from eventbus.delivery._dispatcher import CUT_OFF_DELIVERY
from eventbus.delivery._invoke import CUT_OFF
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import ServeProcess
from tests.fixtures.wait import eventually

RULES = """
- name: everything
  targets: [fn]
"""
# What a killed process held un-acknowledged comes back after JetStream's ack wait: 3 s (as in
# the chaos rig) instead of the default 30 s, so a crash test does not sit out the default.
# Deliveries that outlast it are kept alive by the router's progress reports.
QUICK_REDELIVERY: dict[str, Any] = {"bus": {"nats": {"ack_wait": 3}}}


async def _publish(url: str, n: int, batch: int = 50, prefix: str = "k") -> set[str]:
    """Publish n events in batches (4 requests at a time); return the ids answered 202."""
    accepted: set[str] = set()
    sem = asyncio.Semaphore(4)

    async def one(session: aiohttp.ClientSession, start: int) -> None:
        events = [
            {
                "specversion": "1.0",
                "id": f"{prefix}-{i}",
                "source": "tests/crash",
                "type": "t",
                "data": {"i": i},
            }
            for i in range(start, min(start + batch, n))
        ]
        async with sem:
            try:
                async with session.post(
                    url + "/events",
                    data=orjson.dumps(events),
                    headers={"Content-Type": "application/cloudevents-batch+json"},
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status in (202, 207):
                        accepted.update(e["id"] for e in body["entries"] if e["status"] == 202)
            except aiohttp.ClientError:
                pass  # the process died mid-request: those events were not acknowledged

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, s) for s in range(0, n, batch)))
    return accepted


def _delivered_ids(receiver: Receiver) -> set[str]:
    return {r.cloudevent["id"] for r in receiver.requests if r.cloudevent is not None}


async def _wait_all(receiver: Receiver, ids: set[str], timeout: float) -> None:  # noqa: ASYNC109
    try:
        await eventually(lambda: ids <= _delivered_ids(receiver), within=timeout, every=0.2)
    except AssertionError:
        missing = ids - _delivered_ids(receiver)
        raise AssertionError(
            f"{len(missing)} accepted events never delivered, e.g. {sorted(missing)[:5]}"
        ) from None


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sigkill_with_1000_in_flight_loses_nothing(
    serve_process: Callable[..., ServeProcess],
    receiver: Receiver,
    database_dsn: str,
    tmp_path: Path,
) -> None:
    receiver.respond(Response(204, delay=0.02))
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn"), "concurrency": 8}]
    # one data directory, as a restart has: the retries the killed process held (deliveries
    # beyond the target's share wait in the schedule) are given back at the next start, not
    # after their 30 s lease
    settings = {**QUICK_REDELIVERY, "data_dir": str(tmp_path / "data-restarted")}
    first = serve_process(rules=RULES, targets=targets, settings=settings)
    await first.start()
    publishing = asyncio.create_task(_publish(first.url, 1000))
    await receiver.wait_for(100, timeout=60)
    await first.kill()
    accepted = await publishing
    assert len(accepted) >= 100
    delivered_before = _delivered_ids(receiver)
    assert accepted - delivered_before, "the kill came too late to leave anything in flight"

    second = serve_process(rules=RULES, targets=targets, settings=settings)
    await second.start()
    await _wait_all(receiver, accepted, timeout=120)
    assert "claimed by a process that ended" in second.log.read_text()

    # the audit of the process that ran to the end records each delivery it made
    await second.terminate()
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetch("SELECT DISTINCT id FROM attempts WHERE outcome = 'delivered'")
    finally:
        await conn.close()
    audited = {r["id"] for r in rows}
    assert (accepted - delivered_before) <= audited | delivered_before
    assert audited <= _delivered_ids(receiver)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigterm_finishes_in_flight_and_acks_nothing_undelivered(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    receiver.respond(Response(204, delay=0.3))
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn"), "concurrency": 4}]
    settings: dict[str, Any] = {"router": {"shutdown_grace": 2}}
    first = serve_process(rules=RULES, targets=targets, settings=settings)
    await first.start()
    accepted = await _publish(first.url, 200, batch=20, prefix="t")
    assert len(accepted) == 200
    await receiver.wait_for(4)

    async def all_taken() -> bool:
        # every event taken from the bus by the router, its accepted row in the audit's
        # buffer (what the stop must flush); one still on the bus is recorded by the next
        # instance, and a stop under load came before the router had taken them all
        async with aiohttp.ClientSession() as http, http.get(first.url + "/metrics") as resp:
            text = await resp.text()
        found = re.search(r"^eventbus_events_routed_total (\S+)$", text, re.M)
        return found is not None and float(found[1]) >= 200

    await eventually(all_taken, within=30, what="every event taken from the bus")
    assert await first.terminate() == 0

    conn = await asyncpg.connect(database_dsn)
    try:
        audited = {r["id"] for r in await conn.fetch("SELECT id FROM events")}
    finally:
        await conn.close()
    assert audited == accepted  # the audit buffer was flushed on the way out

    receiver.respond(Response(204))
    second = serve_process(rules=RULES, targets=targets, settings=settings)
    await second.start()
    await _wait_all(receiver, accepted, timeout=90)
    await second.terminate()


async def _invoke(session: aiohttp.ClientSession, url: str, n: int) -> tuple[int, str, Any]:
    """A sync call of ``fn`` with ``{"n": n}``: its status, its event's id, its answer."""
    async with session.post(
        url + "/targets/fn/invoke",
        data=orjson.dumps({"n": n}),
        headers={"Content-Type": "application/json"},
    ) as resp:
        body = await resp.json(content_type=None)
        return resp.status, resp.headers.get("X-Eventbus-Event-Id", ""), body


@pytest.mark.timeout(120)
async def test_a_sync_call_cut_off_by_the_shutdown_is_answered_503_and_audited(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    # Calls outlasting router.shutdown_grace were cancelled by the server: their callers got
    # a bare 500 "Internal Server Error" without the event's id, and the audit held no attempt
    # though the function had received them.
    # The deliveries' grace began once the HTTP server had waited its own for these calls: a
    # stop took twice router.shutdown_grace. Here an event's delivery hangs beside them.
    receiver.respond(Response(200, delay=30))
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn"), "timeout": 60}]
    grace = 3
    service = serve_process(
        rules=RULES, targets=targets, settings={"router": {"shutdown_grace": grace}}
    )
    await service.start()
    (hangs,) = await _publish(service.url, 1, batch=1, prefix="hangs")
    await receiver.wait_for(1)

    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(_invoke(session, service.url, n)) for n in range(3)]
        await receiver.wait_for(4)
        began = time.monotonic()
        await service.terminate()
        took = time.monotonic() - began
        answers = await asyncio.gather(*calls)
    # one grace for the calls and the delivery together (the audit's flush besides), not two
    assert took < 2 * grace - 0.5, took
    for status, event_id, body in answers:
        assert status == 503, body
        assert "stopped before the call ended" in body["detail"], body
        assert event_id, "the answer names the event"
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, outcome, error, duration_ms FROM attempts WHERE target = 'fn'"
        )
    finally:
        await conn.close()
    assert sorted(r["id"] for r in rows) == sorted([hangs, *(e for _, e, _ in answers)])
    # the delivery's attempt too (it had no row: a function slower than the grace saw the
    # event at every restart, and the trail showed none of it)
    assert {(r["id"], r["outcome"], r["error"]) for r in rows} == {
        *((e, "failed", CUT_OFF) for _, e, _ in answers),
        (hangs, "failed", CUT_OFF_DELIVERY),
    }
    assert all(r["duration_ms"] >= grace * 1000 - 100 for r in rows), rows  # after the grace


@pytest.mark.timeout(120)
async def test_a_body_still_coming_at_the_end_of_the_grace_is_answered_503(
    serve_process: Callable[..., ServeProcess], receiver: Receiver
) -> None:
    # It got uvicorn's bare 500 text, and the log an ERROR traceback (the cancelled read).
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    service = serve_process(
        rules=RULES, targets=targets, settings={"router": {"shutdown_grace": 1}}
    )
    await service.start()
    port = int(service.url.rsplit(":", 1)[1])
    answers = []
    for path in ("/events", "/targets/fn/invoke"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        writer.write(head.encode() + b'{"half": ')
        await writer.drain()
        answers.append((reader, writer))
    await asyncio.sleep(0.5)  # both reading their bodies
    assert await service.terminate() == 0
    for reader, writer in answers:
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        assert b"content-type: application/problem+json" in head.lower(), answer
        assert b"retry-after: 1" in head.lower(), answer
        assert b"before the request's body arrived" in body, answer
    assert "Exception in ASGI application" not in service.log.read_text()


_HANGS_GRACE = 30.0  # router.shutdown_grace of the second-signal tests


async def _serving_a_function_that_hangs(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, **target: Any
) -> tuple[ServeProcess, list[dict[str, Any]], dict[str, Any]]:
    """A started service whose target ``fn`` (with the settings ``target``) answers after
    60 s, with its targets and settings (a grace of ``_HANGS_GRACE``) for one started after
    it."""
    receiver.respond(Response(200, delay=60))
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn"), "timeout": 90, **target}]
    settings = {"router": {"shutdown_grace": _HANGS_GRACE}}
    service = serve_process(rules=RULES, targets=targets, settings=settings)
    await service.start()
    return service, targets, settings


async def _second_signal(service: ServeProcess) -> float:
    """SIGTERM ``service``; once its log says a second signal stops it at once, SIGTERM it
    again; how long from the first signal it took to exit (asserted 0)."""
    assert service.proc is not None
    line, grace = "a second SIGTERM or Ctrl-C stops at once", _HANGS_GRACE
    began = time.monotonic()
    service.proc.terminate()
    await eventually(lambda: line in service.log.read_text(), within=grace, what=line)
    service.proc.terminate()
    assert await asyncio.wait_for(service.proc.wait(), 2 * grace) == 0
    assert "stopping now: the deliveries still under way are cut off" in service.log.read_text()
    return time.monotonic() - began


async def _attempts(database_dsn: str) -> set[tuple[str, str, str | None]]:
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetch("SELECT id, outcome, error FROM attempts WHERE target = 'fn'")
    finally:
        await conn.close()
    return {(r["id"], r["outcome"], r["error"]) for r in rows}


@pytest.mark.timeout(120)
async def test_a_second_signal_while_deliveries_finish_stops_at_once(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    # A second Ctrl-C (or SIGTERM) did nothing: the stop waited out router.shutdown_grace for
    # a function that hung. Now it cuts the deliveries short; each is audited as cut off and
    # the bus delivers it again at the next start.
    service, targets, settings = await _serving_a_function_that_hangs(serve_process, receiver)
    (hangs,) = await _publish(service.url, 1, batch=1, prefix="hangs")
    await receiver.wait_for(1)
    took = await _second_signal(service)
    assert took < _HANGS_GRACE / 2, took
    assert await _attempts(database_dsn) == {(hangs, "failed", CUT_OFF_DELIVERY)}

    receiver.respond(Response(204))
    again = serve_process(rules=RULES, targets=targets, settings=settings)
    await again.start()
    await _wait_all(receiver, {hangs}, timeout=60)  # the bus still held it
    await again.terminate()


@pytest.mark.timeout(120)
async def test_deliveries_stopped_while_waiting_for_a_slot_are_not_audited_as_sent(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    # Those queued behind the concurrency cap were audited "cut off before the target
    # answered" too, as if sent: 100 such rows of 200 in a review's run, each event then
    # with two attempts numbered 1.
    service, _, _ = await _serving_a_function_that_hangs(serve_process, receiver, concurrency=1)
    assert len(await _publish(service.url, 3, batch=3, prefix="capped")) == 3
    await receiver.wait_for(1)
    (request,) = receiver.requests
    assert request.cloudevent is not None
    await _second_signal(service)
    assert await _attempts(database_dsn) == {(request.cloudevent["id"], "failed", CUT_OFF_DELIVERY)}


@pytest.mark.timeout(120)
async def test_a_second_signal_while_sync_calls_run_answers_them_at_once(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    # The HTTP server's wait for open requests: uvicorn took a second SIGINT to stop waiting
    # (its log says "CTRL+C to force quit") but left the calls running, and a second SIGTERM
    # not at all. Both now end the calls as the end of the grace would: 503, audited.
    service, _, _ = await _serving_a_function_that_hangs(serve_process, receiver)
    async with aiohttp.ClientSession() as session:
        calling = asyncio.create_task(_invoke(session, service.url, 1))
        await receiver.wait_for(1)
        took = await _second_signal(service)
        status, event_id, body = await calling
    assert took < _HANGS_GRACE / 2, took
    assert status == 503, body
    assert "stopped before the call ended" in body["detail"], body
    assert await _attempts(database_dsn) == {(event_id, "failed", CUT_OFF)}
