"""``/hooks/<name>`` at the edge: who may call a trigger and what it refuses, on a real service.

Unknown hooks, other methods, unreadable and oversized bodies, addresses outside the allow
list (requests sent from several loopback addresses), ``X-Forwarded-For`` trusted only from
named proxies, the trigger's own keys and the service's, the bus down: each a specific 4xx/5xx
problem+json, refusals recorded, and the service still taking events afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from eventbus.bus._nats_server import NatsServer
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, ServeProcess, StartService
from tests.fixtures.wait import eventually, frozen
from tests.sources.test_webhook import _PARTNER, _rejected, generic

JSON = {"Content-Type": "application/json"}
FORM = "application/x-www-form-urlencoded"
RULES = "- name: all\n  targets: [fn]\n"
KEY = "hook-key-0123456789abcdef"
PUBLISH_KEY = "publish-key-0123456789ab"
ADMIN_ONLY = "admin-key-0123456789abcd"

# The service has API keys: a trigger with no verification and no keys of its own takes them
# unless it says otherwise (service_keys: false, an open trigger).
OPEN = {"type": "webhook", "service_keys": False}
SOURCES: list[dict[str, Any]] = [
    {"name": "open", **OPEN, "max_body": 1000},
    {"name": "typed", **OPEN, "event_type": "com.example.{header:X-Kind}"},
    {"name": "small", **OPEN, "max_body": 100_000},
    {"name": "local2", **OPEN, "allow": ["127.0.0.2/32", "::1/128"]},
    {"name": "denied", **OPEN, "deny": ["127.0.0.0/8"]},
    {
        "name": "proxied",
        **OPEN,
        "allow": ["10.0.0.0/8"],
        "trusted_proxies": ["127.0.0.1/32"],
    },
    {"name": "keyed", "type": "webhook", "keys": [KEY]},
    {"name": "both", "type": "webhook", "keys": [KEY], "service_keys": True},
    {"name": "default", "type": "webhook"},
    {"name": "signed", "type": "webhook", "verify": {"kind": "gitlab", "secret": KEY}},
    {
        "name": "big",
        "type": "webhook",
        "verify": {"kind": "github", "secret": KEY},
        "max_body": 64 * 1024 * 1024,
    },
    {"name": "yearly", "type": "timer", "schedule": "0 3 1 1 *"},
]


@pytest.fixture
async def service(eventbus: StartService, receiver: Receiver) -> RunningService:
    return await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=SOURCES,
        settings={
            "max_event_size": 64 * 1024,
            "api_keys": [
                {"name": "pub", "key": PUBLISH_KEY, "scopes": ["publish"]},
                {"name": "adm", "key": ADMIN_ONLY, "scopes": ["admin"]},
            ],
        },
    )


async def _problem(
    svc: RunningService,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    status, resp_headers, answer = await svc.request(method, path, body, headers)
    assert resp_headers["Content-Type"] == "application/problem+json", answer
    assert answer["status"] == status and answer["instance"] == path.partition("?")[0]
    return status, resp_headers, answer["detail"]


async def _from(svc: RunningService, local: str, path: str, **headers: str) -> int:
    """POST from the loopback address ``local``."""
    connector = aiohttp.TCPConnector(local_addr=(local, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(svc.url + path, data=b"{}", headers=headers) as resp,
    ):
        return resp.status


async def test_requests_the_edge_refuses(service: RunningService, receiver: Receiver) -> None:
    status, _, detail = await _problem(service, "POST", "/hooks/nope", b"{}")
    assert (status, detail) == (404, "no webhook source 'nope'")
    assert (await _problem(service, "POST", "/hooks/", b"{}"))[0] == 404
    assert (await _problem(service, "POST", "/hooks/open/extra", b"{}"))[0] == 404
    assert (await _problem(service, "POST", "/hooks/yearly", b"{}"))[0] == 404  # a timer
    status, headers, detail = await _problem(service, "GET", "/hooks/open")
    assert (status, headers["Allow"]) == (405, "POST")
    status, _, detail = await _problem(
        service, "POST", "/hooks/open", b'{"a": ', {"Content-Type": "application/json"}
    )
    assert status == 400 and detail.startswith("the body is not valid JSON: "), detail
    status, _, detail = await _problem(
        service,
        "POST",
        "/hooks/open",
        b"a=%zz&&",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 400 and "not a valid form post" in detail
    # an escape that is not one was kept as its text ("%ZZ") and the event published
    for body in (b"a=1&b=%ZZ", b"a=%", b"a=%4"):
        status, _, detail = await _problem(
            service, "POST", "/hooks/open", body, {"Content-Type": FORM}
        )
        assert status == 400 and "is not a %XX escape" in detail, (body, detail)
    # percent-escapes that are not UTF-8 were replaced by U+FFFD and the event published
    status, _, detail = await _problem(
        service, "POST", "/hooks/open", b"t=x&p=%FF%FE", {"Content-Type": FORM}
    )
    assert status == 400 and "not a valid form post" in detail, detail
    status, _, detail = await _problem(service, "POST", "/hooks/typed", b"{}")
    assert status == 400 and "no value for the event type" in detail
    status, _, detail = await _problem(service, "POST", "/hooks/open", b"x" * 1001)
    assert status == 413 and "exceeds 1000 bytes" in detail
    status, headers, detail = await _problem(
        service, "POST", "/hooks/open", b"\x1f\x8b", {"Content-Encoding": "GZIP"}
    )
    assert (status, headers["Accept-Encoding"]) == (415, "identity"), detail

    async def chunks() -> Any:
        for _ in range(20):
            yield b"y" * 100

    async with service.session.post(service.url + "/hooks/open", data=chunks()) as resp:
        assert resp.status == 413  # no Content-Length: counted as it arrives
    # the body fits the trigger, the event (base64 of it) does not fit max_event_size
    status, _, detail = await _problem(service, "POST", "/hooks/small", bytes(range(256)) * 300)
    assert status == 413 and "more than the 65536-byte limit" in detail

    await service.drained()
    assert receiver.requests == []
    status, _, answer = await service.request("POST", "/hooks/typed", b"{}", {"X-Kind": "ok"})
    assert status == 202, answer
    assert (await receiver.wait_for(1))[0].cloudevent["type"] == "com.example.ok"


async def _head_only(svc: RunningService, path: str, *headers: str) -> bytes:
    """Send a request's head declaring a 60 MB body, none of it, and read the answer."""
    host, port = svc.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 60000000"]
        writer.write("\r\n".join([*head, *headers]).encode() + b"\r\n\r\n")
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


async def test_a_large_body_is_not_read_when_it_cannot_be_taken(service: RunningService) -> None:
    # A trigger allowing 64 MiB: 60 MB bodies without a signature were read whole (about
    # 95 MB of memory each) before the 401, and the limit allowed bodies no event can hold.
    answer = await _head_only(service, "/hooks/big")
    assert answer.startswith(b"HTTP/1.1 401"), answer  # no signature header: refused at once
    # signed (the signature is checked once the body is read): over what max_event_size
    # (64 KiB here) can hold in any encoding, refused before a byte is read
    answer = await _head_only(service, "/hooks/big", "X-Hub-Signature-256: sha256=00")
    assert answer.startswith(b"HTTP/1.1 413"), answer
    big = b"{}" + b" " * 300_000
    before = (await _rejected(service)).get(("hook", "413"), 0)
    status, _, detail = await _problem(
        service, "POST", "/hooks/big", big, {"X-Hub-Signature-256": "sha256=00"}
    )
    assert (status, detail) == (413, f"request body of 300002 bytes exceeds {4 * 64 * 1024} bytes")
    # counted, as the docs say of a body refused whole (it was not)
    assert (await _rejected(service)).get(("hook", "413"), 0) - before == 1
    await service.service.store.audit.flush()
    rows = await service.service.store.pool.fetch(
        "SELECT reason FROM refusals WHERE path = '/hooks/big'"
    )
    assert [r["reason"] for r in rows] == ["header X-Hub-Signature-256 is missing"]


async def test_ip_lists_and_trusted_proxies(service: RunningService) -> None:
    assert await _from(service, "127.0.0.2", "/hooks/local2") == 202
    assert await _from(service, "127.0.0.1", "/hooks/local2") == 403
    assert await _from(service, "127.0.0.3", "/hooks/denied") == 403
    # X-Forwarded-For counts only from a trusted proxy, and only its right-most entries
    forwarded = {"X-Forwarded-For": "10.1.2.3"}
    assert await _from(service, "127.0.0.1", "/hooks/proxied", **forwarded) == 202
    assert await _from(service, "127.0.0.1", "/hooks/proxied") == 403
    assert await _from(service, "127.0.0.2", "/hooks/proxied", **forwarded) == 403
    assert (
        await _from(
            service, "127.0.0.1", "/hooks/proxied", **{"X-Forwarded-For": "10.1.2.3, 192.0.2.9"}
        )
        == 403
    )
    status, _, detail = await _problem(service, "POST", "/hooks/local2", b"{}")
    assert status == 403 and detail == "address 127.0.0.1 is not allowed to call hook 'local2'"
    # a client the address refuses is not told the methods (405 with Allow came first), nor
    # one without the trigger's key
    assert (await _problem(service, "GET", "/hooks/denied"))[0] == 403
    assert (await _problem(service, "GET", "/hooks/keyed"))[0] == 401
    await service.service.store.audit.flush()
    rows = await service.service.store.pool.fetch(
        "SELECT remote, reason FROM refusals WHERE path = '/hooks/local2'"
    )
    assert len(rows) == 2 and all("not allowed" in r["reason"] for r in rows)


async def test_ip_lists_over_ipv6(eventbus: StartService) -> None:
    svc = await eventbus(
        rules="[]",
        targets=[],
        sources=[
            {"name": "six", **OPEN, "allow": ["::1/128"]},
            {"name": "four", **OPEN, "allow": ["127.0.0.0/8"]},
            {"name": "no-six", **OPEN, "deny": ["::/0"]},
        ],
        settings={"listen": {"host": "::1"}},
    )
    svc.url = svc.url.replace("127.0.0.1", "[::1]")
    assert (await svc.request("POST", "/hooks/six", b"{}"))[0] == 202
    status, _, detail = await _problem(svc, "POST", "/hooks/four", b"{}")
    assert (status, detail) == (403, "address ::1 is not allowed to call hook 'four'")
    assert (await _problem(svc, "POST", "/hooks/no-six", b"{}"))[0] == 403


async def _triggers(
    eventbus: StartService, sources: list[dict[str, Any]], **settings: Any
) -> RunningService:
    """The service with webhook ``sources`` only (no rule, no target) and ``settings``."""
    return await eventbus(rules="[]", targets=[], sources=sources, settings=settings)


async def test_a_triggers_lists_judge_the_client_the_services_proxy_names(
    eventbus: StartService,
) -> None:
    # A proxy in front of the whole service (client_addresses.trusted_proxies): a trigger's
    # own lists judged the proxy's address, so its deny list let a denied client in (202) and
    # its allow list refused an allowed one (403).
    svc = await _triggers(
        eventbus,
        [
            {"name": "deny", **OPEN, "deny": ["10.9.9.9/32"]},
            {"name": "allow", **OPEN, "allow": ["10.0.0.0/8"]},
            {"name": "own", **OPEN, "allow": ["10.0.0.0/8"], "trusted_proxies": ["10.5.5.5/32"]},
        ],
        client_addresses={"trusted_proxies": ["127.0.0.1/32"]},
        api_keys=[{"name": "pub", "key": PUBLISH_KEY, "scopes": ["publish"]}],
    )
    assert await _from(svc, "127.0.0.1", "/hooks/deny", **{"X-Forwarded-For": "10.9.9.9"}) == 403
    assert await _from(svc, "127.0.0.1", "/hooks/deny", **{"X-Forwarded-For": "10.1.1.1"}) == 202
    assert await _from(svc, "127.0.0.1", "/hooks/allow", **{"X-Forwarded-For": "10.1.1.1"}) == 202
    assert await _from(svc, "127.0.0.1", "/hooks/allow", **{"X-Forwarded-For": "8.8.8.8"}) == 403
    # the trigger's own proxies add to the service's: a chain through both names the client
    chain = {"X-Forwarded-For": "10.1.1.1, 10.5.5.5"}
    assert await _from(svc, "127.0.0.1", "/hooks/own", **chain) == 202
    status, _, detail = await _problem(
        svc, "POST", "/hooks/allow", b"{}", {"X-Forwarded-For": "192.0.2.7"}
    )
    assert (status, detail) == (403, "address 192.0.2.7 is not allowed to call hook 'allow'")


async def test_the_services_lists_judge_the_client_a_triggers_proxy_names(
    eventbus: StartService,
) -> None:
    # A proxy in front of one trigger (its own trusted_proxies): the service-wide lists judged
    # the proxy's address, so a client the service denies got through the trigger (202) and
    # one the service allows was refused (403). Elsewhere the trigger's proxy is not trusted.
    tunnel = {"name": "tunnel", "type": "webhook", "keys": [KEY]}
    svc = await _triggers(
        eventbus,
        [{**tunnel, "trusted_proxies": ["127.0.0.1/32"]}],
        client_addresses={"allow": ["10.0.0.0/8"], "deny": ["10.9.9.0/24"]},
    )
    key = {"Authorization": f"Bearer {KEY}"}
    client = {**key, "X-Forwarded-For": "10.1.2.3"}
    assert await _from(svc, "127.0.0.1", "/hooks/tunnel", **client) == 202
    status, _, detail = await _problem(
        svc, "POST", "/hooks/tunnel", b"{}", {**key, "X-Forwarded-For": "10.9.9.9"}
    )
    assert (status, detail) == (403, "address 10.9.9.9 is not allowed")
    assert await _from(svc, "127.0.0.1", "/hooks/tunnel", **key) == 403  # the proxy: not allowed
    assert await _from(svc, "127.0.0.1", "/events", **client) == 403
    assert await _from(svc, "127.0.0.1", "/hooks/nope", **client) == 403


async def test_a_trigger_open_to_this_machine_takes_its_own_proxys_word(
    eventbus: StartService,
) -> None:
    # Without API keys, a trigger with neither verify nor keys answers this machine's
    # programs only; relayed by a proxy in its own trusted_proxies for this machine, it was
    # refused as relayed (only the service's proxies were asked who the client was).
    svc = await _triggers(
        eventbus, [{"name": "local", "type": "webhook", "trusted_proxies": ["127.0.0.2/32"]}]
    )
    here, there = {"X-Forwarded-For": "127.0.0.1"}, {"X-Forwarded-For": "10.1.1.1"}
    assert await _from(svc, "127.0.0.2", "/hooks/local", **here) == 202
    assert await _from(svc, "127.0.0.2", "/hooks/local", **there) == 403
    assert await _from(svc, "127.0.0.3", "/hooks/local", **here) == 403  # not its proxy
    assert await _from(svc, "127.0.0.2", "/events", **here) == 403  # the trigger's alone


async def test_keys_of_the_trigger_and_of_the_service(service: RunningService) -> None:
    status, headers, detail = await _problem(service, "POST", "/hooks/keyed", b"{}")
    assert (status, detail, headers["WWW-Authenticate"]) == (401, "missing API key", "Bearer")
    bad = {"Authorization": "Bearer wrong-key-0123456789"}
    assert (await _problem(service, "POST", "/hooks/keyed", b"{}", bad))[2] == "invalid API key"
    # the service's keys do not open a trigger that has its own only
    other = {"X-API-Key": PUBLISH_KEY}
    assert (await _problem(service, "POST", "/hooks/keyed", b"{}", other))[0] == 401
    assert (await service.request("POST", "/hooks/keyed", b"{}", {"X-API-Key": KEY}))[0] == 202
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert (await service.request("POST", "/hooks/keyed", b"{}", bearer))[0] == 202

    # a trigger with neither verification nor keys takes the service's
    assert (await _problem(service, "POST", "/hooks/default", b"{}"))[0] == 401
    pub = {"X-API-Key": PUBLISH_KEY}
    assert (await service.request("POST", "/hooks/default", b"{}", pub))[0] == 202
    # scope admin may do everything, publish included
    admin = {"X-API-Key": ADMIN_ONLY}
    assert (await service.request("POST", "/hooks/default", b"{}", admin))[0] == 202
    # its own keys and the service's
    for key in (KEY, PUBLISH_KEY):
        assert (await service.request("POST", "/hooks/both", b"{}", {"X-API-Key": key}))[0] == 202
    assert (await _problem(service, "POST", "/hooks/both", b"{}", bad))[0] == 401
    # a verified trigger needs no API key: its signature (here a token) is the check
    token = {"X-Gitlab-Token": KEY, "Content-Type": "application/json"}
    body = b'{"object_kind": "push"}'
    assert (await service.request("POST", "/hooks/signed", body, token))[0] == 202

    await service.service.store.audit.flush()
    rows = await service.service.store.pool.fetch(
        "SELECT reason FROM refusals WHERE path = '/hooks/keyed'"
    )
    assert sorted(r["reason"] for r in rows) == [
        "invalid API key",
        "invalid API key",
        "missing API key",
    ]


async def _on_own_bus(
    eventbus: StartService, receiver: Receiver, nats: NatsServer, trigger: dict[str, Any]
) -> RunningService:
    """The service with ``trigger``, its bus on ``nats`` (a publish given up after 1 s)."""
    return await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=[trigger],
        settings={"bus": {"backend": "nats", "nats": {"url": nats.url}, "publish_timeout": 1.0}},
    )


@pytest.mark.timeout(120)
async def test_bus_down_answers_503_then_recovers(
    eventbus: StartService, receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with NatsServer(tmp_path / "own-nats") as nats:
        svc = await _on_own_bus(eventbus, receiver, nats, {"name": "open", "type": "webhook"})
        await nats.stop()
        status, headers, detail = await _problem(svc, "POST", "/hooks/open", b'{"n": 1}')
        assert status == 503 and headers["Retry-After"] == "5", detail
        # the sender is not told the servers behind (it was "NATS at nats://127.0.0.1:PORT is
        # not connected: ..."); the log is
        assert detail == "the event bus is unavailable"
        assert "/hooks/open answered 503: NATS at nats://" in caplog.text
        await nats.start()

        async def accepted() -> bool:
            status, _, _ = await svc.request("POST", "/hooks/open", orjson.dumps({"n": 2}), JSON)
            return status == 202

        await eventually(accepted, within=20, every=0.2, what="the hook once NATS is back")
        got = await receiver.wait_for(1, timeout=30)
        assert got[0].cloudevent["data"] == {"n": 2}


@pytest.mark.timeout(120)
async def test_a_signed_request_retried_after_a_publish_timed_out_is_one_event(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # A trigger whose events take no id from the request: a publish that timed out on a
    # frozen bus landed once the bus woke, and the sender's retry of the same signed request
    # was published again under another random id: two events at the function.
    async with NatsServer(tmp_path / "own-nats") as nats:
        svc = await _on_own_bus(eventbus, receiver, nats, _PARTNER)
        body = orjson.dumps({"order": 7})
        signed = generic(body, stamp=str(int(time.time())))
        assert nats.pid is not None
        async with frozen(nats.pid):
            status, _, detail = await _problem(svc, "POST", "/hooks/partner", body, signed)
            assert status == 503, detail
        answer: dict[str, Any] = {}

        async def accepted() -> bool:
            status, _, got = await svc.request("POST", "/hooks/partner", body, signed)
            answer.update(got if status == 202 else {})
            return status == 202

        await eventually(accepted, within=20, every=0.2, what="the retry once NATS is back")
        assert answer["duplicate"] is True, answer  # the first landed after all
        got = await receiver.wait_for(1, timeout=30)
        await svc.drained()
        assert [r.cloudevent["id"] for r in receiver.requests] == [answer["id"]]
        assert got[0].cloudevent["data"] == {"order": 7}


async def test_hooks_are_served_where_other_sources_do_not_run(
    eventbus: StartService, receiver: Receiver
) -> None:
    """The extra workers of ``serve --workers N`` run no sources (run_sources: false), but a
    webhook request may reach any of them."""
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=[
            {"name": "open", **OPEN},
            {"name": "yearly", "type": "timer", "schedule": "0 3 1 1 *"},
        ],
        settings={"run_sources": False},
    )
    status, _, answer = await svc.request("POST", "/hooks/open", b'{"a": 1}', JSON)
    assert status == 202, answer
    assert (await receiver.wait_for(1))[0].cloudevent["data"] == {"a": 1}
    assert [s.name for s in svc.service.source_statuses()] == ["open"]


async def test_the_hook_route_is_in_the_openapi_document(service: RunningService) -> None:
    status, _, document = await service.request("GET", "/openapi.json")
    assert status == 200
    operation = document["paths"]["/hooks/{name}"]["post"]
    assert operation["operationId"] == "webhook"
    assert set(operation["responses"]) == {
        *("200", "202", "400", "401", "403", "404", "405", "408", "413", "415", "503")
    }
    assert operation["responses"]["401"]["content"]["application/problem+json"]


@pytest.mark.timeout(180)
async def test_every_worker_of_serve_serves_the_hooks(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, tmp_path: Path
) -> None:
    """``serve --workers 2``: connections spread over both workers (SO_REUSEPORT), and every
    one of them finds the hook, though only the first worker runs the other sources."""
    target = {"name": "fn", "type": "http", "url": receiver.url("/fn")}
    proc = serve_process(rules=RULES, targets=[target], workers=2)
    (tmp_path / "connectors" / "connectors.yaml").write_text(
        yaml.safe_dump({"targets": [target], "sources": [{"name": "open", **OPEN}]})
    )
    await proc.start()
    try:
        # start() returns once one worker answers; the other listens once it is ready too
        await eventually(
            lambda: proc.log.read_text().count("eventbus ready") == 2,
            within=60,
            what="both workers ready",
        )
        statuses = []
        for i in range(40):
            # a connection of its own each time, so the kernel may hand it to either worker
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
                s.post(f"{proc.url}/hooks/open", json={"n": i}) as resp,
            ):
                statuses.append(resp.status)
        assert statuses == [202] * 40
        got = await receiver.wait_for(40, timeout=30)
        assert sorted(r.cloudevent["data"]["n"] for r in got) == list(range(40))
        assert "1 sources" in proc.log.read_text()
        # A reload asked of one worker reaches the other (its parent passes SIGHUP on): every
        # event after it is routed by the new rules, whichever worker takes it from the bus.
        # Before, the other worker kept the old rules until it restarted.
        rules = tmp_path / "rules" / "rules.yaml"
        transform = "  transform: {template: {new: <n>}, input_paths: {n: $.data.n}}\n"
        rules.write_text(RULES + transform)
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{proc.url}/rules/reload") as resp,
        ):
            assert resp.status == 200, await resp.text()
        # the worker asked (once for the request, once for the signal) and the other one
        await eventually(
            lambda: proc.log.read_text().count("rules reloaded: 1 rules") == 3,
            within=10,
            what="both workers reloaded",
        )
        for i in range(40, 60):
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
                s.post(f"{proc.url}/hooks/open", json={"n": i}) as resp,
            ):
                assert resp.status == 202
        got = await receiver.wait_for(60, timeout=30)
        assert sorted(r.json()["new"] for r in got[40:]) == list(range(40, 60))
    finally:
        assert await proc.terminate() == 0


async def test_a_trigger_open_to_anyone_though_the_service_has_keys_is_named_at_start(
    eventbus: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    # service_keys: false with neither verify nor keys: without API keys the trigger answers
    # this machine's programs only, with them anyone (a web page's form included), silently.
    caplog.set_level(logging.WARNING, logger="eventbus")
    await eventbus(
        rules="[]",
        targets=[],
        sources=[
            {"name": "wide", **OPEN},
            {"name": "listed", **OPEN, "allow": ["10.0.0.0/8"]},
            {"name": "default", "type": "webhook"},
            {"name": "keyed", "type": "webhook", "keys": [KEY]},
        ],
        settings={"api_keys": [{"name": "pub", "key": PUBLISH_KEY, "scopes": ["publish"]}]},
    )
    warned = [r.getMessage() for r in caplog.records if "takes no key" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("source 'wide':"), warned
    assert "anyone who reaches the service may post events to it" in warned[0]
