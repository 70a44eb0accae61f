"""``POST /targets/{name}/invoke`` end to end: a running service on real NATS and PostgreSQL,
invoking a real function endpoint (``receiver``) synchronously and asynchronously, and Kafka and
NATS targets synchronously. Every answer as docs/targets.md documents it, the requests the
function got counted (no retry on the sync path), and the audit trail of each invocation."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nats
import orjson
import pytest
from multidict import CIMultiDict
from nats.js.api import StreamConfig
from prometheus_client.parser import text_string_to_metric_families

from eventbus import app as app_module
from eventbus.bus._nats_server import free_port
from eventbus.store import Store
from eventbus.targets import _http as http_module
from eventbus.targets import register_target
from tests.fixtures.nats import unique_name
from tests.fixtures.postgres import table_locked
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually
from tests.targets.test_writing_a_target import _example_module

# A rule that matches every event of type t, to another target: an invocation must not be routed
# by the rules, and an event published to /events must not reach the invoked target.
RULES = """
- name: everything
  match: {type: [t]}
  targets: [other]
"""
FAST = {"strategy": "fixed", "initial_delay": "50ms", "jitter": False}
STRUCTURED = {"Content-Type": "application/cloudevents+json"}


def _fn(receiver: Receiver, **spec: Any) -> dict[str, Any]:
    delivery = spec.pop("delivery", {"retry": {**FAST, "max_attempts": 3}})
    return {
        "name": "fn",
        "type": "http",
        "url": receiver.url("/fn"),
        "timeout": 2,
        "delivery": delivery,
        **spec,
    }


def _other(receiver: Receiver) -> dict[str, Any]:
    return {"name": "other", "type": "http", "url": receiver.url("/other")}


def _event(i: str, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": i,
        "source": "tests/invoke",
        "type": "t",
        "datacontenttype": "application/json",
        "data": {"i": i},
        **extra,
    }


async def _start(eventbus: StartService, receiver: Receiver, **fn: Any) -> RunningService:
    settings = fn.pop("settings", None)
    return await eventbus(
        rules=RULES, targets=[_fn(receiver, **fn), _other(receiver)], settings=settings
    )


async def _invoke(
    svc: RunningService,
    event: dict[str, Any] | None = None,
    *,
    target: str = "fn",
    body: bytes | None = None,
    query: str = "",
    **headers: str,
) -> tuple[int, CIMultiDict[str], Any]:
    if event is not None:
        body = orjson.dumps(event)
        headers = {**STRUCTURED, **headers}
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    status, answered, parsed = await svc.request(
        "POST", f"/targets/{target}/invoke{query}", body, headers
    )
    return status, CIMultiDict(answered), parsed


async def _trail_attempts(svc: RunningService, event_id: str, n: int) -> Any:
    return await svc.trail("tests/invoke", event_id, attempts=n)


# --- sync: the function's answer, once -------------------------------------------------------


async def test_sync_returns_the_functions_answer_and_is_audited(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    receiver.script(
        Response(200, headers={"Content-Type": "application/json"}, body=b'{"thumb": "ok"}')
    )
    status, headers, body = await _invoke(svc, _event("s1"))
    assert status == 200 and body == {"thumb": "ok"}
    assert headers["Content-Type"] == "application/json"
    assert float(headers["X-Eventbus-Duration-Ms"]) > 0
    assert headers["X-Eventbus-Event-Id"] == "s1"
    (request,) = receiver.requests
    assert request.path == "/fn" and request.cloudevent == _event("s1")

    trail = await _trail_attempts(svc, "s1", 1)
    assert trail["via"] == "invoke:sync:fn:remote=127.0.0.1"
    assert [(m["rule"], m["target"]) for m in trail["matches"]] == [("invoke:fn", "fn")]
    (attempt,) = trail["attempts"]
    assert attempt["rule"] == "invoke:fn" and attempt["outcome"] == "delivered"
    assert attempt["status"] == 200 and attempt["duration_ms"] > 0
    await svc.drained()
    assert [r.path for r in receiver.requests] == ["/fn"]  # the rules never saw it


@pytest.mark.parametrize(
    ("answer", "passed_headers"),
    [
        (Response(404, headers={"Content-Type": "text/plain"}, body=b"no such thumb"), {}),
        (Response(422, headers={"Content-Type": "application/json"}, body=b'{"e": 1}'), {}),
        (Response(500, headers={"Content-Type": "application/x-boom"}, body=b"boom"), {}),
        (Response(503, headers={"Retry-After": "7"}, body=b"later"), {"Retry-After": "7"}),
        (Response(429, headers={"Retry-After": "3"}), {"Retry-After": "3"}),
        # a few hundred digits read as infinity: the caller got a plain-text 500
        (Response(503, headers={"Retry-After": "9" * 400}), {"Retry-After": "31536000"}),
        # as it came: Starlette added '; charset=utf-8' and the Latin-1 text read garbled
        (Response(400, headers={"Content-Type": "text/plain"}, body=b"\xe9t\xe9"), {}),
        # what the caller needs to follow a redirect or answer a challenge
        (
            Response(302, headers={"Location": "https://elsewhere.example/x"}),
            {"Location": "https://elsewhere.example/x"},
        ),
        (
            Response(
                401, headers={"WWW-Authenticate": "Bearer realm=fn", "Cache-Control": "no-store"}
            ),
            {"WWW-Authenticate": "Bearer realm=fn", "Cache-Control": "no-store"},
        ),
        # every end-to-end header, a binary-mode CloudEvent's attributes too (only a list of
        # nine was passed); never its cookies, on eventbus's origin, nor hop-by-hop ones
        (
            Response(
                409,
                headers={
                    "ce-id": "a-1",
                    "ce-type": "com.example.answer",
                    "X-Request-Id": "r-7",
                    "Set-Cookie": "session=x",
                    "Clear-Site-Data": '"cookies"',
                    "Connection": "X-Hop",
                    "X-Hop": "1",
                },
            ),
            {
                "ce-id": "a-1",
                "ce-type": "com.example.answer",
                "X-Request-Id": "r-7",
                "Set-Cookie": None,
                "Clear-Site-Data": None,
                "X-Hop": None,
            },
        ),
    ],
)
async def test_sync_passes_the_functions_error_through_without_retrying(
    eventbus: StartService,
    receiver: Receiver,
    answer: Response,
    passed_headers: dict[str, str | None],
) -> None:
    svc = await _start(eventbus, receiver, delivery={"retry": FAST, "circuit_breaker": False})
    receiver.respond(answer)
    async with svc.session.post(
        svc.url + "/targets/fn/invoke",
        data=orjson.dumps(_event("e1")),
        headers=STRUCTURED,
        allow_redirects=False,
    ) as resp:
        assert resp.status == answer.status
        assert await resp.read() == answer.body  # byte for byte
        for name, value in passed_headers.items():
            assert resp.headers.get(name) == value, name
        default = "application/octet-stream" if answer.body else None
        # the function's own type, never a problem+json
        assert resp.headers.get("Content-Type") == answer.headers.get("Content-Type", default)
    trail = await _trail_attempts(svc, "e1", 1)
    (attempt,) = trail["attempts"]
    assert (attempt["outcome"], attempt["status"]) == ("failed", answer.status)
    await svc.drained()
    assert len(receiver.requests) == 1  # no retry
    assert (await svc.request("GET", "/retries"))[2]["total"] == 0
    assert (await svc.request("GET", "/dead-letters?target=fn"))[2]["items"] == []


async def test_sync_timeout_is_504_and_a_closed_port_502(
    eventbus: StartService, receiver: Receiver
) -> None:
    closed = {"name": "down", "type": "http", "url": f"http://127.0.0.1:{free_port()}/"}
    svc = await eventbus(
        rules=RULES, targets=[_fn(receiver, timeout=0.5), _other(receiver), closed]
    )
    before = await _failed_counts(svc)
    receiver.respond(Response(200, delay=5))
    status, headers, problem = await _invoke(svc, _event("slow"))
    assert status == 504, problem
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["detail"] == "target 'fn': timeout after 0.5s"
    assert float(headers["X-Eventbus-Duration-Ms"]) >= 450
    status, _, problem = await _invoke(svc, _event("refused"), target="down")
    assert status == 502 and "connection refused" in problem["detail"], problem
    trail = await _trail_attempts(svc, "refused", 1)
    assert trail["attempts"][0]["outcome"] == "failed"
    assert "connection refused" in trail["attempts"][0]["error"]
    assert len(receiver.requests) == 1
    after = await _failed_counts(svc)  # the registry is the process's: count the difference
    assert {t: after.get(t, 0) - before.get(t, 0) for t in ("fn", "down")} == {"fn": 1, "down": 1}


async def _failed_counts(svc: RunningService, outcome: str = "failed") -> dict[str, float]:
    """``eventbus_deliveries_total{outcome}`` by target."""
    _, _, text = await svc.request("GET", "/metrics")
    return {
        sample.labels["target"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "eventbus_deliveries_total" and sample.labels["outcome"] == outcome
    }


async def _behind_a_breaker(
    eventbus: StartService, receiver: Receiver, *, failures: int, **fn: Any
) -> RunningService:
    """A service whose target ``fn`` opens its circuit after ``failures`` (for 30 s), and a
    rule sending events of type ``c`` to it."""
    delivery = {"retry": FAST, "circuit_breaker": {"failures": failures, "open_for": "30s"}}
    rules = RULES + "- name: to-fn\n  match: {type: [c]}\n  targets: [fn]\n"
    targets = [_fn(receiver, delivery=delivery, **fn), _other(receiver)]
    return await eventbus(rules=rules, targets=targets)


async def test_sync_open_circuit_is_503_with_retry_after(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _behind_a_breaker(eventbus, receiver, failures=2)
    receiver.respond(500)
    for i in range(2):
        status, _, _ = await _invoke(svc, _event(f"c{i}"))
        assert status == 500
    status, headers, problem = await _invoke(svc, _event("c2"))
    assert status == 503 and "circuit" in problem["detail"], problem
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert len(receiver.requests) == 2  # the open circuit sent nothing
    status, _, listing = await svc.request("GET", "/targets")
    assert {t["name"]: t["circuit"] for t in listing["targets"]}["fn"] == "open"
    trail = await _trail_attempts(svc, "c2", 1)
    (attempt,) = trail["attempts"]
    assert (attempt["outcome"], attempt["attempt"]) == ("refused", 0)
    assert "circuit" in attempt["error"]
    # the circuit the sync calls opened is the one rule deliveries go through
    status, _ = await svc.post_event(_event("c3", type="c"))
    assert status == 202
    await svc.drained()
    (parked,) = (await svc.request("GET", "/retries"))[2]["items"]
    assert (parked["event_id"], parked["waiting_for"], parked["attempts"]) == ("c3", "circuit", 0)
    assert len(receiver.requests) == 2


async def test_a_delivery_behind_a_sync_call_holding_the_slot_meets_the_circuit_it_opened(
    eventbus: StartService, receiver: Receiver
) -> None:
    # A sync call held the target's own slot, which the dispatcher's deliveries did not
    # count: one of them went on into the target and waited there, past the check of the
    # circuit, and was sent once the call's failure had opened it.
    svc = await _behind_a_breaker(eventbus, receiver, failures=1, concurrency=1)
    receiver.script(Response(500, delay=1.0))
    async with asyncio.TaskGroup() as calls:
        calling = calls.create_task(_invoke(svc, _event("s1")))
        await receiver.wait_for(1)  # the call holds the slot
        assert (await svc.post_event(_event("behind", type="c")))[0] == 202
    assert calling.result()[0] == 500  # the failure that opens the circuit
    await svc.drained()
    (parked,) = (await svc.request("GET", "/retries"))[2]["items"]
    assert (parked["event_id"], parked["waiting_for"]) == ("behind", "circuit"), parked
    assert len(receiver.requests) == 1


async def test_sync_full_concurrency_cap_is_429_with_retry_after(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver, concurrency=1, timeout=10)
    receiver.script(Response(200, delay=1.5))
    first = asyncio.create_task(_invoke(svc, _event("busy1")))
    await receiver.wait_for(1)
    before = await _failed_counts(svc, "refused")
    status, headers, problem = await _invoke(svc, _event("busy2"))
    assert status == 429, problem
    # counted as its attempts row says (it was not counted at all)
    assert (await _failed_counts(svc, "refused")).get("fn", 0) - before.get("fn", 0) == 1
    assert headers["Retry-After"] == "1"
    assert "concurrency cap of 1" in problem["detail"]
    status, _, _ = await first
    assert status == 200
    assert len(receiver.requests) == 1
    trail = await _trail_attempts(svc, "busy2", 1)
    assert trail["attempts"][0]["outcome"] == "refused"
    # the slot is free again
    status, _, _ = await _invoke(svc, _event("busy3"))
    assert status == 204


async def test_a_target_holding_every_pooled_connection_fails_no_other_target(
    eventbus: StartService, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # All HTTP targets share one pool of connections (512; 2 here). A slow target with a
    # high concurrency held every one: a healthy target's calls waited for a connection,
    # were answered 504 "timeout" and counted as its failures, and opened its circuit, its
    # function having received nothing.
    monkeypatch.setattr(http_module, "CONNECTION_LIMIT", 2)
    breaker = {"failures": 1, "open_for": "60s"}
    fn = _fn(
        receiver, delivery={"retry": {**FAST, "max_attempts": 100}, "circuit_breaker": breaker}
    )
    rules = (
        "- name: hog\n  match: {type: [hog]}\n  targets: [hog]\n"
        "- name: fn\n  match: {type: [t]}\n  targets: [fn]\n"
    )
    async with Receiver() as slow:
        slow.respond(Response(204, delay=4))
        hog = {"name": "hog", "type": "http", "url": slow.url("/hog"), "concurrency": 8}
        svc = await eventbus(rules=rules, targets=[fn, hog])
        for i in range(2):
            assert (await svc.post_event(_event(f"h{i}", type="hog")))[0] == 202
        await slow.wait_for(2)  # both connections taken for 4 s
        status, headers, problem = await _invoke(svc, _event("called"))
        assert status == 429, problem  # answered at once, not after fn's 2 s timeout
        assert headers["Retry-After"] == "1"
        assert "all 2 connections of the HTTP client" in problem["detail"], problem
        assert (await svc.post_event(_event("routed")))[0] == 202
        await receiver.wait_for(1, timeout=30)  # once the hog's requests end
        trail = await svc.trail("tests/invoke", "routed", attempts=2)
    attempts = [(a["outcome"], a["error"]) for a in trail["attempts"]]
    assert attempts[0][0] == "retry-scheduled", attempts  # fn's 2 s timeout spent waiting
    assert "not sent: all 2 connections" in attempts[0][1], attempts
    assert attempts[-1] == ("delivered", None), attempts
    assert [r.cloudevent["id"] for r in receiver.requests if r.cloudevent] == ["routed"]
    _, _, listing = await svc.request("GET", "/targets")
    assert {t["name"]: t["circuit"] for t in listing["targets"]}["fn"] == "closed"


async def test_sync_past_the_rate_limit_is_429_not_a_queue(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The callers queued for tokens without bound: six at once on a 1/s target waited up to
    # 5 s each; a gateway's throttle answers at once.
    svc = await _start(eventbus, receiver, delivery={"rate_limit": 0.5, "circuit_breaker": False})
    status, _, _ = await _invoke(svc, _event("rate1"))
    assert status == 204  # the one token there was
    status, headers, problem = await _invoke(svc, _event("rate2"))  # the next in 2 s
    assert status == 429, problem
    assert headers["Retry-After"] == "1" and "rate_limit" in problem["detail"]
    assert len(receiver.requests) == 1
    trail = await _trail_attempts(svc, "rate2", 1)
    assert trail["attempts"][0]["outcome"] == "refused"


# --- what can be invoked, and with what -------------------------------------------------------


async def test_unknown_and_disabled_targets(eventbus: StartService, receiver: Receiver) -> None:
    rules = RULES + "- name: to-fn\n  match: {type: [gone]}\n  targets: [fn]\n"
    svc = await eventbus(rules=rules, targets=[_fn(receiver), _other(receiver)])
    status, headers, problem = await _invoke(svc, _event("u1"), target="nope")
    assert status == 404 and headers["Content-Type"] == "application/problem+json"
    assert problem["detail"] == "no target 'nope'"
    # a compressed body is refused, not passed on as if it were the data
    gzipped = gzip.compress(b"{}")
    status, headers, problem = await _invoke(
        svc, body=gzipped, Content_Type="application/json", Content_Encoding="gzip"
    )
    assert (status, headers["Accept-Encoding"]) == (415, "identity"), problem

    receiver.script(410)  # a rule's delivery answered 410 Gone: the target is switched off
    status, _ = await svc.post_event(_event("g1", type="gone"))
    assert status == 202
    await svc.drained()
    for mode in ("sync", "async"):
        status, _, problem = await _invoke(
            svc, _event(f"d-{mode}"), X_Eventbus_Invocation_Type=mode
        )
        assert status == 409, problem
        assert "disabled" in problem["detail"] and "/targets/fn/enable" in problem["detail"]
    assert len(receiver.requests) == 1
    status, _, _ = await svc.request("POST", "/targets/fn/enable")
    assert status == 200
    status, _, _ = await _invoke(svc, _event("d2"))
    assert status == 204


@pytest.mark.parametrize(
    ("body", "headers", "query", "status", "detail"),
    [
        (b'{"specversion": "1.0", "id": ', STRUCTURED, "", 400, "malformed JSON"),
        (b'{"specversion": "1.0", "id": "x"}', STRUCTURED, "", 400, "missing required"),
        (b"[]", {"Content-Type": "application/cloudevents-batch+json"}, "", 400, "not a batch"),
        (b"<e/>", {"Content-Type": "application/cloudevents+xml"}, "", 415, "unsupported"),
        (b"{}", {"ce-specversion": "1.0", "ce-id": "1"}, "", 400, "missing required"),
        (b"{not json", {"Content-Type": "application/json"}, "", 400, "JSON"),
        (b"x", {"Content-Type": "text/plain"}, "?type=", 400, "type"),
        (b"x", {"X-Eventbus-Invocation-Type": "later"}, "", 400, "sync or async"),
        (b"x" * 300_000, {"Content-Type": "text/plain"}, "", 413, "exceeds"),
        # UTF-8 bytes in a header were read as Latin-1: the source "café" became "cafÃ©"
        (b"x", {"X-Eventbus-Source": "café"}, "", 400, "'X-Eventbus-Source' holds raw non-ASCII"),
        (b"x", {"X-Eventbus-Subject": "%FF"}, "", 400, "'X-Eventbus-Subject' is not percent"),
    ],
)
async def test_malformed_requests_are_400s_naming_the_problem(
    eventbus: StartService,
    receiver: Receiver,
    body: bytes,
    headers: dict[str, str],
    query: str,
    status: int,
    detail: str,
) -> None:
    svc = await _start(eventbus, receiver)
    got, answer_headers, problem = await _invoke(svc, body=body, query=query, **headers)
    assert got == status, problem
    assert answer_headers["Content-Type"] == "application/problem+json"
    assert detail in problem["detail"], problem
    assert receiver.requests == []


async def test_raw_data_is_wrapped_and_binary_mode_kept(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    query = "?type=com.example.resize&source=" + quote("/cli/é", safe="")
    status, headers, _ = await _invoke(
        svc, body=b'{"w": 10}', query=query, Content_Type="application/json"
    )
    assert status == 204
    status, _, _ = await _invoke(
        svc,
        body=b"hello",
        Content_Type="text/plain; charset=utf-8",
        X_Eventbus_Type="com.example.text",
        X_Eventbus_Subject="s%C3%A9",  # percent-encoded UTF-8, as a ce- header carries it
    )
    assert status == 204
    status, _, _ = await _invoke(svc, body=b"")
    assert status == 204
    binary = {"ce-specversion": "1.0", "ce-id": "b1", "ce-source": "tests/invoke", "ce-type": "t"}
    status, _, _ = await _invoke(svc, body=b"\x00\x01", Content_Type="image/png", **binary)
    assert status == 204
    wrapped, text, empty, kept = (r.cloudevent for r in receiver.requests)
    assert wrapped is not None and text is not None and empty is not None and kept is not None
    assert (wrapped["type"], wrapped["source"], wrapped["data"]) == (
        "com.example.resize",
        "/cli/é",
        {"w": 10},
    )
    assert wrapped["id"] == headers["X-Eventbus-Event-Id"] and wrapped["time"]
    assert (text["type"], text["source"], text["subject"], text["data"]) == (
        "com.example.text",
        "eventbus/invoke",
        "sé",
        "hello",
    )
    assert (empty["type"], "data" not in empty) == ("eventbus.invoke", True)
    assert kept["id"] == "b1" and kept["datacontenttype"] == "image/png"


async def test_api_keys_guard_invocation_and_name_the_invoker(
    eventbus: StartService, receiver: Receiver
) -> None:
    keys = [
        {"name": "pub", "key": "publish-key-0123456789", "scopes": ["publish"]},
        {"name": "ops", "key": "admin-key-0123456789ab", "scopes": ["admin"]},
    ]
    svc = await _start(eventbus, receiver, settings={"api_keys": keys})
    status, _, problem = await _invoke(svc, _event("k0"))
    assert status == 401 and problem["detail"] == "missing API key"
    status, _, problem = await _invoke(svc, _event("k1"), X_API_Key="publish-key-0123456789")
    assert status == 403 and "admin" in problem["detail"]
    assert receiver.requests == []
    status, _, _ = await _invoke(svc, _event("k2"), Authorization="Bearer admin-key-0123456789ab")
    assert status == 204
    auth = {"Authorization": "Bearer admin-key-0123456789ab"}
    query = "/events/trail?source=tests/invoke&id=k2"

    async def trail() -> Any:
        status, _, body = await svc.request("GET", query, headers=auth)
        return body if status == 200 and body["attempts"] else None

    found = await eventually(trail, what="the trail of k2")
    assert found["via"] == "invoke:sync:fn:key=ops"


# --- async: through the bus, delivered like a rule's route -----------------------------------


async def test_async_is_202_then_delivered_with_retries(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    receiver.script(503, 500)
    status, headers, body = await _invoke(svc, _event("a1"), X_Eventbus_Invocation_Type="async")
    assert status == 202
    assert body == {"id": "a1", "source": "tests/invoke", "target": "fn", "duplicate": False}
    assert "X-Eventbus-Duration-Ms" not in headers
    # the same again within the bus's window: dropped, and now said so (it looked invoked)
    status, headers, body = await _invoke(svc, _event("a1"), X_Eventbus_Invocation_Type="async")
    assert status == 202 and body["duplicate"] is True
    assert headers["Eventbus-Duplicate"] == "true"
    requests = await receiver.wait_for(3)
    assert [r.status for r in requests] == [503, 500, 204]
    assert {r.path for r in requests} == {"/fn"}  # the rule matching type t was not applied
    trail = await _trail_attempts(svc, "a1", 3)
    assert trail["via"] == "invoke:async:fn:remote=127.0.0.1"
    assert [(m["rule"], m["target"]) for m in trail["matches"]] == [("invoke:fn", "fn")]
    assert [(a["rule"], a["outcome"]) for a in trail["attempts"]] == [
        ("invoke:fn", "retry-scheduled"),
        ("invoke:fn", "retry-scheduled"),
        ("invoke:fn", "delivered"),
    ]


async def test_async_dead_letters_when_the_function_stays_down(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver, delivery={"retry": {**FAST, "max_attempts": 2}})
    receiver.respond(500)
    status, _, _ = await _invoke(svc, _event("dl1"), X_Eventbus_Invocation_Type="ASYNC")
    assert status == 202

    async def dead_letters() -> Any:
        status, _, page = await svc.request("GET", "/dead-letters?rule=invoke%3Afn")
        return page["items"] if status == 200 and page["items"] else None

    (dead,) = await eventually(dead_letters, what="the invocation dead-lettered")
    assert (dead["event_id"], dead["target"], dead["attempts"]) == ("dl1", "fn", 2)
    assert dead["reason"] == "attempts-exhausted" and dead["last_status"] == 500
    assert len(receiver.requests) == 2
    receiver.respond(204)
    status, _, _ = await svc.request("POST", f"/dead-letters/{dead['id']}/replay")
    assert status == 202
    await receiver.wait_for(3)


# --- broker targets answer with their acknowledgement ----------------------------------------


async def test_sync_kafka_and_nats_targets_answer_with_the_acknowledgement(
    eventbus: StartService, receiver: Receiver, kafka_bootstrap: str, nats_url: str
) -> None:
    topic, subject = unique_name("invoke"), unique_name("invoke")
    targets = [
        _fn(receiver),
        _other(receiver),
        {
            "name": "orders",
            "type": "kafka",
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "idempotent": False,
        },
        {"name": "subj", "type": "nats", "url": nats_url, "subject": subject, "jetstream": True},
    ]
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=subject, subjects=[subject]))
        svc = await eventbus(rules=RULES, targets=targets)
        status, headers, ack = await _invoke(svc, _event("k1"), target="orders")
        assert status == 200 and headers["Content-Type"] == "application/json", ack
        assert ack["topic"] == topic and ack["offset"] >= 0 and ack["partition"] >= 0
        status, _, ack = await _invoke(svc, _event("n1"), target="subj")
        assert (status, ack) == (
            200,
            {"subject": subject, "stream": subject, "seq": 1, "duplicate": False},
        )
        await nc.jetstream().delete_stream(subject)
        status, _, problem = await _invoke(svc, _event("n2"), target="subj")
        assert status == 502 and "no JetStream stream" in problem["detail"], problem
    finally:
        await nc.close()
    trail = await _trail_attempts(svc, "k1", 1)
    assert trail["attempts"][0]["outcome"] == "delivered"


async def test_async_deduplicates_per_target_not_against_published_events(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    event = _event("same")
    status, _ = await svc.post_event(event)  # the rule routes it to "other"
    assert status == 202
    before = await _invoke_counts(svc)
    for target in ("fn", "fn", "other"):  # a retried invocation is the same one
        status, _, _ = await _invoke(svc, event, target=target, X_Eventbus_Invocation_Type="async")
        assert status == 202
    status, _, _ = await _invoke(svc, _event("sync"), target="fn")  # never on the bus
    assert status == 204  # the function's own answer
    await svc.drained()
    assert sorted(r.path for r in receiver.requests) == ["/fn", "/fn", "/other", "/other"]
    after = await _invoke_counts(svc)
    # the repeat was counted as received, and so was the synchronous call
    assert {name: after[name] - before[name] for name in after} == {
        "eventbus_events_received_total": 2,
        "eventbus_events_duplicate_total": 1,
        "eventbus_invocations_total": 1,
    }


async def _invoke_counts(svc: RunningService) -> dict[str, float]:
    """The counters of ``via="invoke"``."""
    _, _, text = await svc.request("GET", "/metrics")
    names = (
        "eventbus_events_received_total",
        "eventbus_events_duplicate_total",
        "eventbus_invocations_total",
    )
    counts = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in counts and sample.labels.get("via") == "invoke":
                counts[sample.name] = sample.value
    return counts


async def test_sync_nats_request_reply(
    eventbus: StartService, receiver: Receiver, nats_url: str
) -> None:
    subject = unique_name("reply")
    nc = await nats.connect(nats_url)

    async def answer(msg: Any) -> None:
        await msg.respond(b"pong:" + orjson.loads(msg.data)["id"].encode())

    try:
        await nc.subscribe(subject, cb=answer)
        await nc.flush()
        targets = [
            _fn(receiver),
            _other(receiver),
            {"name": "subj", "type": "nats", "url": nats_url, "subject": subject},
        ]
        svc = await eventbus(rules=RULES, targets=targets)
        status, headers, body = await _invoke(svc, _event("r1"), target="subj", query="?reply=true")
        assert (status, body) == (200, "pong:r1")
        assert float(headers["X-Eventbus-Duration-Ms"]) > 0
        status, _, ack = await _invoke(svc, _event("r2"), target="subj")
        assert (status, ack) == (200, {"subject": subject})  # without reply: the server took it
    finally:
        await nc.close()
    # nobody answers now: each request fails, and the publishes to the subject still go (the
    # failures of responders opened the target's circuit, 5 by default, for its publishes)
    for i in range(6):
        status, _, problem = await _invoke(
            svc, _event(f"nr{i}"), target="subj", query="?reply=true"
        )
        assert status == 502 and "no responders" in problem["detail"], (i, problem)
    status, _, ack = await _invoke(svc, _event("r2b"), target="subj")
    assert (status, ack) == (200, {"subject": subject}), ack
    status, _, problem = await _invoke(svc, _event("r3"), query="?reply=true")
    assert status == 400 and "NATS targets only" in problem["detail"], problem
    status, _, problem = await _invoke(
        svc, _event("r4"), target="subj", query="?reply=true", X_Eventbus_Invocation_Type="async"
    )
    assert status == 400 and "synchronous" in problem["detail"], problem
    status, _, problem = await _invoke(svc, _event("r5"), target="subj", query="?reply=maybe")
    assert status == 400 and "reply" in problem["detail"], problem
    assert receiver.requests == []


async def test_a_target_type_without_invoke_is_invoked_through_deliver(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    example = _example_module()  # docs/targets.md's jsonl target: deliver only
    register_target("invoke-jsonl", example.JsonLinesTargetSpec, example.JsonLinesTarget)
    out = tmp_path / "invoked.jsonl"
    plugin = {"name": "file", "type": "invoke-jsonl", "path": str(out)}
    svc = await eventbus(rules=RULES, targets=[_fn(receiver), _other(receiver), plugin])
    status, headers, body = await _invoke(svc, _event("j1"), target="file")
    assert (status, body) == (200, None) and "Content-Type" not in headers
    status, _, _ = await _invoke(
        svc, _event("j2"), target="file", X_Eventbus_Invocation_Type="async"
    )
    assert status == 202
    await svc.drained()
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["id"] for line in lines] == ["j1", "j2"]
    trail = await _trail_attempts(svc, "j1", 1)
    assert trail["attempts"][0]["outcome"] == "delivered"


@pytest.mark.timeout(120)
async def test_async_on_the_kafka_bus(
    eventbus: StartService, receiver: Receiver, kafka_bootstrap: str
) -> None:
    svc = await eventbus(
        rules=RULES,
        targets=[_fn(receiver), _other(receiver)],
        kafka_bootstrap=kafka_bootstrap,
    )
    receiver.script(503)
    status, _, _ = await _invoke(svc, _event("kb1"), X_Eventbus_Invocation_Type="async")
    assert status == 202
    requests = await receiver.wait_for(2, timeout=60)
    assert [(r.path, r.status) for r in requests] == [("/fn", 503), ("/fn", 204)]
    trail = await _trail_attempts(svc, "kb1", 2)
    assert trail["via"] == "invoke:async:fn:remote=127.0.0.1"
    assert [a["outcome"] for a in trail["attempts"]] == ["retry-scheduled", "delivered"]


# --- POST /events with X-Eventbus-Invocation-Type: sync: the rule marked sync answers ---------

SYNC_RULES = (
    RULES
    + """
- name: resize
  sync: true
  match: {type: [t], subject: [resize]}
  transform:
    input_paths: {w: $.data.w}
    template: {"width": <w>}
  targets: [fn]
- name: listed
  sync: true
  match: {subject: [listed]}
  transform:
    input_paths: {items: "$.data.items[*]"}
    template: {"items": <items>}
  targets: [fn]
- name: twice-a
  sync: true
  match: {subject: [twice]}
  targets: [fn]
- name: twice-b
  sync: true
  match: {subject: [twice]}
  targets: [other]
"""
)
SYNC = {"X-Eventbus-Invocation-Type": "sync"}


async def test_a_synchronous_publish_is_answered_by_the_rule_marked_sync(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    svc = await eventbus(rules=SYNC_RULES, targets=[_fn(receiver), _other(receiver)])
    receiver.script(Response(201, headers={"Content-Type": "text/plain"}, body=b"resized"))
    event = {**_event("p1", subject="resize"), "data": {"w": 10}}
    async with svc.session.post(
        svc.url + "/events", data=orjson.dumps(event), headers={**STRUCTURED, **SYNC}
    ) as resp:
        assert (resp.status, await resp.read()) == (201, b"resized")
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert float(resp.headers["X-Eventbus-Duration-Ms"]) > 0
    (request,) = receiver.requests
    assert request.path == "/fn" and request.json() == {"width": 10}  # the rule's transform
    assert request.headers["ce-id"] == "p1"
    trail = await _trail_attempts(svc, "p1", 1)
    assert trail["via"] == "http:sync:resize:remote=127.0.0.1"
    assert [(m["rule"], m["target"]) for m in trail["matches"]] == [("resize", "fn")]
    assert [(a["rule"], a["outcome"]) for a in trail["attempts"]] == [("resize", "delivered")]
    await svc.drained()
    assert len(receiver.requests) == 1  # not on the bus: "everything" never routed it

    status, _, problem = await _invoke_events(svc, _event("p2"))
    assert status == 404 and problem["detail"] == "no rule with sync: true matches the event"
    status, _, problem = await _invoke_events(svc, _event("p3", subject="twice"))
    assert status == 409, problem
    assert "2 rules with sync: true (twice-a, twice-b)" in problem["detail"]
    # matched, and its transform failed on the event: said so, not "no rule matches"
    many = {**_event("p3b", subject="listed"), "data": {"items": list(range(10_001))}}
    status, _, problem = await _invoke_events(svc, many)
    assert status == 422, problem
    assert problem["detail"].startswith(
        "the transform of a rule with sync: true failed on the event: rule 'listed': "
    ), problem
    assert "10001 values" in problem["detail"], problem
    batch = orjson.dumps([_event("p4", subject="resize")])
    status, _, problem = await svc.request(
        "POST",
        "/events",
        batch,
        {"Content-Type": "application/cloudevents-batch+json", **SYNC},
    )
    assert status == 400 and "not a batch" in problem["detail"], problem
    assert len(receiver.requests) == 1
    # a mistyped type was an asynchronous publish, answered 202
    status, _, problem = await svc.request(
        "POST",
        "/events",
        orjson.dumps(_event("p4b", subject="resize")),
        {**STRUCTURED, "X-Eventbus-Invocation-Type": "synch"},
    )
    assert status == 400 and "must be sync or async" in problem["detail"], problem
    assert len(receiver.requests) == 1

    # async (the default) is the ordinary publish: the rules route it, "everything" included
    status, _ = await svc.post_event(_event("p5", subject="resize"))
    assert status == 202
    await receiver.wait_for(3)
    assert sorted(r.path for r in receiver.requests[1:]) == ["/fn", "/other"]

    rules_file = tmp_path / "rules" / "rules.yaml"
    rules_file.write_text("- name: two\n  sync: true\n  targets: [fn, other]\n")
    status, _, problem = await svc.request("POST", "/rules/reload")
    assert status == 400 and "sync: true has exactly one target" in problem["detail"], problem


async def _invoke_events(svc: RunningService, event: dict[str, Any]) -> tuple[int, Any, Any]:
    return await svc.request("POST", "/events", orjson.dumps(event), {**STRUCTURED, **SYNC})


async def test_a_synchronous_publish_needs_scope_publish_and_names_the_key(
    eventbus: StartService, receiver: Receiver
) -> None:
    keys = [{"name": "pub", "key": "publish-key-0123456789", "scopes": ["publish"]}]
    svc = await eventbus(
        rules=SYNC_RULES, targets=[_fn(receiver), _other(receiver)], settings={"api_keys": keys}
    )
    event = _event("ks1", subject="resize")
    status, _, problem = await _invoke_events(svc, event)
    assert status == 401 and problem["detail"] == "missing API key"
    assert receiver.requests == []
    status, _, _ = await svc.request(
        "POST",
        "/events",
        orjson.dumps(event),
        {**STRUCTURED, **SYNC, "Authorization": "Bearer publish-key-0123456789"},
    )
    assert status == 204
    await svc.service.store.audit.flush()
    via = await svc.service.store.pool.fetchval("SELECT via FROM events WHERE id = 'ks1'")
    assert via == "http:sync:resize:key=pub"


async def test_an_invocation_the_audit_trail_cannot_take_is_answered_503_not_held(
    eventbus: StartService,
    receiver: Receiver,
    database_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its rows are written before the call; with PostgreSQL not taking them and the audit
    # buffer full, a synchronous call (and a sync POST /events) waited for ever.
    class SmallBuffer(Store):
        @classmethod
        async def open(cls, *args: Any, **kwargs: Any) -> Store:
            return await Store.open(*args, **kwargs, audit_batch=3, audit_buffer=6)

    monkeypatch.setattr(app_module, "Store", SmallBuffer)
    svc = await _start(eventbus, receiver)
    async with table_locked(database_dsn, "events"):
        for n in range(2):  # three rows each: the buffer is full after two
            assert (await _invoke(svc, _event(f"full-{n}")))[0] == 204
        status, headers, problem = await _invoke(svc, _event("full-2"))
        assert (status, headers["Retry-After"]) == (503, "5"), problem
        assert "the audit trail is full: 6 rows wait for PostgreSQL" in problem["detail"]
        assert len(receiver.requests) == 2  # nothing sent
    assert (await _invoke(svc, _event("full-3")))[0] == 204
    await svc.service.store.audit.flush()
    ids = await svc.service.store.pool.fetch("SELECT id FROM attempts ORDER BY id")
    assert [r["id"] for r in ids] == ["full-0", "full-1", "full-3"]
