"""Refused requests are audited at a bounded rate: a flood of requests without a valid key
or from a denied address costs at most 20 rows a second for the whole edge plus one summary
row, and every refusal is still accounted for (rows, summary counts and the
``eventbus_refusals_unrecorded`` metric)."""

from __future__ import annotations

import asyncio
import math
import re
import time

import aiohttp
import pytest

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually
from tests.sources.test_webhook import GITHUB_SECRET, github

RULES = """
- name: all
  targets: [fn]
"""
FLOOD = 400
PER_SECOND = 20


async def _unrecorded_metric(svc: RunningService) -> float:
    _, _, text = await svc.request("GET", "/metrics")
    found = re.search(r"^eventbus_refusals_unrecorded_total (\S+)$", text, re.MULTILINE)
    assert found, "metric eventbus_refusals_unrecorded_total missing"
    return float(found[1])


async def _accounted(svc: RunningService) -> tuple[int, int, int]:
    """(rows one by one, summary rows, refusals the summary rows count)."""
    rows = await svc.service.store.pool.fetch("SELECT path, reason FROM refusals")
    single = [r for r in rows if r["path"] != "*"]
    summaries = [r for r in rows if r["path"] == "*"]
    counted = sum(int(r["reason"].split()[0]) for r in summaries)
    return len(single), len(summaries), counted


@pytest.mark.timeout(120)
async def test_a_flood_of_refused_requests_costs_a_bounded_number_of_rows(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        settings={
            "api_keys": [{"name": "pub", "key": "p" * 32, "scopes": ["publish"]}],
            "client_addresses": {"deny": ["127.0.0.3/32"]},
        },
    )
    metric_before = await _unrecorded_metric(svc)
    sem = asyncio.Semaphore(20)
    # refused by its address: the edge has one budget of rows for every kind of refusal
    denied = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0)))

    async def refused(i: int) -> int:
        async with sem:
            if i % 3 == 2:
                async with denied.post(svc.url + "/events", data=b"{}") as resp:
                    return resp.status
            headers = {"Authorization": "Bearer wrong-key-0123456789"} if i % 3 else {}
            status, _, _ = await svc.request("POST", "/events", b"{}", headers)
            return status

    started = time.monotonic()
    try:
        statuses = await asyncio.gather(*(refused(i) for i in range(FLOOD)))
    finally:
        await denied.close()
    elapsed = time.monotonic() - started
    assert statuses == [401, 401, 403] * (FLOOD // 3) + [401, 401, 403][: FLOOD % 3]

    async def accounted() -> tuple[int, int, int] | None:
        await svc.service.store.audit.flush()
        single, summaries, counted = await _accounted(svc)
        return (single, summaries, counted) if single + counted == FLOOD else None

    # the summary row follows the end of its second
    single, summaries, counted = await eventually(
        accounted, every=0.1, what="every refusal recorded or summarised"
    )
    seconds = math.ceil(elapsed) + 1  # at most this many one-second windows saw the flood
    assert single <= PER_SECOND * seconds
    assert 1 <= summaries <= seconds
    assert await _unrecorded_metric(svc) - metric_before == counted


async def test_without_keys_only_this_machines_programs_and_the_console_are_answered(
    eventbus: StartService, receiver: Receiver
) -> None:
    # Open on loopback: a web page the developer's browser shows could replay dead letters
    # with a cross-site form, or read everything through a name rebound to 127.0.0.1.
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=[
            {"name": "open", "type": "webhook"},
            {"name": "wide-open", "type": "webhook", "service_keys": False},
            {
                "name": "signed",
                "type": "webhook",
                "verify": {"kind": "github", "secret": GITHUB_SECRET},
            },
        ],
    )
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, _, problem = await svc.request("POST", "/dead-letters/replay?all=true", b"", page)
    assert status == 403 and "web page of 'http://evil.example'" in problem["detail"], problem
    status, _, problem = await svc.request("GET", "/rules", None, {"Host": "evil.example"})
    assert status == 403 and "is not a loopback name" in problem["detail"], problem
    # another site's <img src> or no-cors fetch sends no Origin; the browser says cross-site
    # (a live stream of every event, a GET trigger)
    for site in ("cross-site", "same-site"):
        foreign = {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors"}
        status, _, problem = await svc.request("GET", "/rules", None, foreign)
        assert status == 403 and "another site's web page" in problem["detail"], problem
    for site in ("same-origin", "none"):  # the console's own; an address typed in
        status, _, _ = await svc.request("GET", "/rules", None, {"Sec-Fetch-Site": site})
        assert status == 200, site
    event = {"specversion": "1.0", "id": "x", "source": "s", "type": "t"}
    body = b'{"specversion": "1.0", "id": "x", "source": "s", "type": "t"}'
    structured = {"Content-Type": "application/cloudevents+json"}
    status, _, _ = await svc.request("POST", "/events", body, {**structured, **page})
    assert status == 403
    # the console's own requests, and the programs' (no Origin), under any loopback name
    port = svc.url.rsplit(":", 1)[1]
    own = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
    status, _, _ = await svc.request("POST", "/rules/reload", b"", own)
    assert status == 200
    for host in (f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        status, _, _ = await svc.request("GET", "/rules", None, {"Host": host})
        assert status == 200, host
    assert (await svc.post_event(event))[0] == 202
    # A trigger that neither verifies nor has keys is as closed as POST /events (a cross-site
    # form or a rebound name reached it: 202)
    for hook in ("open", "wide-open"):  # service keys or not: none are configured
        for headers in (page, {"Host": "abc.tunnel.example"}):
            status, _, problem = await svc.request("POST", f"/hooks/{hook}", b"{}", headers)
            assert status == 403, problem
            assert f"give hook {hook!r} verify or keys" in problem["detail"], problem
        assert (await svc.request("POST", f"/hooks/{hook}", b"{}"))[0] == 202
    # a verified one is for senders elsewhere, reached through whatever names this machine
    signed = {**github(b"{}"), "Host": "abc.tunnel.example"}
    status, _, _ = await svc.request("POST", "/hooks/signed", b"{}", signed)
    assert status == 202


async def test_without_keys_a_request_a_proxy_relayed_for_another_machine_is_refused(
    eventbus: StartService, receiver: Receiver
) -> None:
    # nginx on this machine sends Host 127.0.0.1:PORT and no Origin: its clients, anyone on
    # the internet, looked like this machine's programs (202 to publish, 200 to reload the
    # rules) though the service had worked out their address; with X-Real-IP alone (a common
    # nginx setup), too.
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=[{"name": "open", "type": "webhook"}],
        settings={
            "client_addresses": {"deny": ["192.0.2.0/24"], "trusted_proxies": ["127.0.0.1/32"]}
        },
    )
    body = b'{"specversion": "1.0", "id": "x", "source": "s", "type": "t"}'
    structured = {"Content-Type": "application/cloudevents+json"}
    relays = (
        {"X-Forwarded-For": "8.8.8.8"},
        {"Forwarded": "for=8.8.8.8"},
        {"X-Real-IP": "8.8.8.8"},
    )
    for relayed in relays:
        for method, path, data, headers in (
            ("POST", "/rules/reload", b"", relayed),
            ("GET", "/dead-letters", None, relayed),
            ("POST", "/events", body, {**structured, **relayed}),
            ("POST", "/hooks/open", b"{}", relayed),
        ):
            status, _, problem = await svc.request(method, path, data, headers)
            assert status == 403, (path, relayed, problem)
            # Forwarded or X-Real-IP alone names no one the edge reads: unknown to the address
            # lists (as without them: see below)
            assert "a request a proxy relayed for" in problem["detail"] or (
                "X-Forwarded-For" not in relayed and "address is unknown" in problem["detail"]
            ), problem
    status, _, problem = await svc.request("GET", "/rules", None, {"X-Forwarded-For": "8.8.8.8"})
    assert "relayed for client 8.8.8.8 is refused" in problem["detail"], problem
    # relayed for this machine (a browser here, through the local proxy)
    for headers in ({"X-Forwarded-For": "127.0.0.1"}, {"X-Forwarded-For": "::1"}):
        assert (await svc.request("GET", "/rules", None, headers))[0] == 200, headers
        assert (await svc.request("POST", "/events", body, {**structured, **headers}))[0] == 202
    # a peer that is not a trusted proxy names no one, whatever it writes
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(svc.url + "/rules", headers={"X-Forwarded-For": "127.0.0.1"}) as resp,
    ):
        assert resp.status == 403
        assert "for a client it does not name" in (await resp.json())["detail"]


async def test_without_keys_a_request_carrying_only_x_real_ip_is_taken_for_relayed(
    eventbus: StartService,
) -> None:
    # nginx set up with `proxy_set_header X-Real-IP $remote_addr` alone: its clients passed
    svc = await eventbus(rules="[]\n", targets=[])
    status, _, problem = await svc.request("GET", "/rules", None, {"X-Real-IP": "203.0.113.9"})
    assert status == 403 and "relayed for a client it does not name" in problem["detail"]
    assert (await svc.request("GET", "/rules", None, {}))[0] == 200
