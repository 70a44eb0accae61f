"""End to end over HTTP on real NATS JetStream, PostgreSQL and a real function endpoint:
publish in every CloudEvents HTTP mode, routing, transforms, replies, the audit trail, access
keys, and every kind of bad input (the service stays up and loses nothing else)."""

from __future__ import annotations

import gc
import gzip
from typing import Any

import orjson
import pytest
from cloudevents.v1.http import CloudEvent, to_binary, to_structured

from eventbus.bus import NatsServer
from eventbus.http._problem import Problem
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
RULES = """
- name: orders
  match:
    type: [com.example.order.created]
    data:
      total: [{numeric: [">", 100]}]
  targets: [fn]
- name: order-summary
  match:
    type: [com.example.order.created]
  transform:
    input_paths: {total: $.data.total, who: $.data.customer}
    template: {"amount": <total>, "customer": <who>}
  targets: [summary]
- name: replies
  match:
    type: [com.example.order.reply]
  targets: [replies]
"""


def _event(i: int | str, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e-{i}",
        "source": "tests/shop",
        "type": "com.example.order.created",
        "data": {"total": 150, "customer": "ann"},
        **extra,
    }


async def _start(eventbus: StartService, receiver: Receiver, **kw: Any) -> RunningService:
    return await eventbus(
        rules=RULES,
        targets=[
            {"name": n, "type": "http", "url": receiver.url(f"/{n}")}
            for n in ("fn", "summary", "replies")
        ],
        **kw,
    )


async def test_structured_binary_and_batch_modes_route_and_audit(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    status, body = await svc.post_event(_event("s"))
    assert (status, body) == (202, {"id": "e-s", "source": "tests/shop", "duplicate": False})

    status, _, body = await svc.request(
        "POST",
        "/events",
        orjson.dumps({"total": 500, "customer": "bo"}),
        {
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-id": "e-b",
            "ce-source": "tests/shop",
            "ce-type": "com.example.order.created",
            "ce-subject": "orders/%C3%A9",
        },
    )
    assert status == 202, body

    batch = [_event("b1"), _event("b2", data={"total": 5, "customer": "cy"})]
    status, _, body = await svc.request(
        "POST",
        "/events",
        orjson.dumps(batch),
        {"Content-Type": "application/cloudevents-batch+json"},
    )
    assert status == 202, body
    assert [e["status"] for e in body["entries"]] == [202, 202]
    # an empty batch is valid in a request (JSON format 4.3): nothing to publish
    status, _, body = await svc.request(
        "POST", "/events", b"[]", {"Content-Type": "application/cloudevents-batch+json"}
    )
    assert (status, body) == (202, {"failed": 0, "duplicates": 0, "entries": []})

    # fn: only totals > 100 (e-s, e-b, e-b1); summary: all four, transformed
    fn = await receiver.wait_for(3, path="/fn")
    summary = await receiver.wait_for(4, path="/summary")
    await svc.drained()  # every event routed: no other delivery to /fn is on its way
    assert sorted(r.cloudevent["id"] for r in receiver.requests if r.path == "/fn") == [
        "e-b",
        "e-b1",
        "e-s",
    ]
    binary = next(r for r in fn if r.cloudevent["id"] == "e-b")
    assert binary.cloudevent["subject"] == "orders/é"
    assert binary.cloudevent["data"] == {"total": 500, "customer": "bo"}
    assert binary.headers["ce-type"] == "com.example.order.created"
    bodies = sorted((r.json()["amount"], r.json()["customer"]) for r in summary)
    assert bodies == [(5, "cy"), (150, "ann"), (150, "ann"), (500, "bo")]
    assert all(r.headers["ce-source"] == "tests/shop" for r in summary)

    trail = await svc.trail("tests/shop", "e-s", 2)
    assert trail["via"] == "http"
    assert {(m["rule"], m["target"]) for m in trail["matches"]} == {
        ("orders", "fn"),
        ("order-summary", "summary"),
    }
    assert {a["outcome"] for a in trail["attempts"]} == {"delivered"}
    assert all(a["status"] == 204 for a in trail["attempts"])


async def _counted(svc: RunningService, via: str = "http", counter: str = "duplicate") -> float:
    """``eventbus_events_<counter>_total{via}`` now."""
    _, _, text = await svc.request("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(f'eventbus_events_{counter}_total{{via="{via}"}}'):
            return float(line.split()[-1])
    return 0.0


async def _refused(svc: RunningService, reason: str, via: str = "http") -> float:
    """``eventbus_events_rejected_total{reason,via}`` now."""
    _, _, text = await svc.request("GET", "/metrics")
    line = f'eventbus_events_rejected_total{{reason="{reason}",via="{via}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


async def test_each_refused_request_is_counted_under_its_own_via(
    eventbus: StartService, receiver: Receiver
) -> None:
    # A request refused whole (a body over the limit, compressed, a bad Content-Length) was
    # not counted; an invalid event sent to /targets/x/invoke or /notifications was counted
    # as via="http", a publish.
    svc = await _start(eventbus, receiver, settings={"max_event_size": 1024})
    json_type = {"Content-Type": STRUCTURED}
    gzipped = {**json_type, "Content-Encoding": "gzip"}
    sends = [
        ("/events", b"x" * 5000, json_type, 413, "http"),
        ("/events", orjson.dumps(_event("g")), gzipped, 415, "http"),
        ("/events", b"{", json_type, 400, "http"),
        ("/targets/fn/invoke", b"{", json_type, 400, "invoke"),
        ("/targets/fn/invoke", b"x" * 5000, json_type, 413, "invoke"),
        ("/notifications", b"{", {"Content-Type": "application/json"}, 400, "http:notification"),
    ]
    for path, body, headers, status, via in sends:
        before = await _refused(svc, str(status), via)
        publishes = await _refused(svc, str(status))
        assert (await svc.request("POST", path, body, headers))[0] == status, path
        assert await _refused(svc, str(status), via) - before == 1, (path, status)
        if via != "http":
            assert await _refused(svc, str(status)) == publishes, (path, status)


@pytest.mark.parametrize("backend", ["nats", "kafka"])
@pytest.mark.timeout(120)
async def test_a_republished_event_is_answered_as_a_duplicate_when_it_is_one(
    eventbus: StartService, receiver: Receiver, request: pytest.FixtureRequest, backend: str
) -> None:
    """JetStream drops a source+id seen within its duplicate window: the answer says so
    (body, header, metric). Kafka keeps every copy, so the answer says "not a duplicate" (what
    is on the bus), and the bus's consumer drops the copies. The function gets each once."""
    kafka = request.getfixturevalue("kafka_bootstrap") if backend == "kafka" else None
    svc = await _start(eventbus, receiver, kafka_bootstrap=kafka)
    dropped = backend == "nats"
    before = await _counted(svc)

    status, headers, body = await svc.request(
        "POST", "/events", orjson.dumps(_event("d1")), {"Content-Type": STRUCTURED}
    )
    assert (status, body["duplicate"]) == (202, False)
    assert "eventbus-duplicate" not in {name.lower() for name in headers}
    status, headers, body = await svc.request(
        "POST", "/events", orjson.dumps(_event("d1")), {"Content-Type": STRUCTURED}
    )
    assert (status, body) == (202, {"id": "e-d1", "source": "tests/shop", "duplicate": dropped})
    assert headers.get("eventbus-duplicate") == ("true" if dropped else None)

    batch = [_event("d1"), _event("d2"), {"specversion": "1.0", "id": "bad"}, _event("d2")]
    status, headers, body = await svc.request(
        "POST", "/events", orjson.dumps(batch), {"Content-Type": BATCH}
    )
    assert status == 207, body
    assert [(e["status"], e.get("duplicate")) for e in body["entries"]] == [
        (202, dropped),
        (202, False),  # the first d2 of the batch is new; the one after it repeats it
        (400, None),
        (202, dropped),
    ]
    assert body["duplicates"] == 2 * dropped
    assert headers.get("eventbus-duplicates") == ("2" if dropped else None)
    if dropped:  # on publish; Kafka's consumer drops them (and counts them) later
        assert await _counted(svc) - before == 3

    await svc.drained()
    copies = sorted(r.cloudevent["id"] for r in receiver.requests if r.path == "/fn")
    assert copies == ["e-d1", "e-d2"]
    assert await _counted(svc) - before == 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_cloudevents_sdk_client_events_arrive_intact(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    attrs = {
        "type": "com.example.order.created",
        "source": "tests/sdk",
        "subject": "sku-1",
        "partitionkey": "k1",
        "datacontenttype": "application/json",
    }
    ev1 = CloudEvent(dict(attrs, id="sdk-1"), {"total": 101, "customer": "di"})
    ev2 = CloudEvent(dict(attrs, id="sdk-2"), {"total": 102, "customer": "ed"})
    for headers, body in (to_binary(ev1), to_structured(ev2)):
        status, _, resp = await svc.request("POST", "/events", body, dict(headers))
        assert status == 202, resp
    got = {r.cloudevent["id"]: r.cloudevent for r in await receiver.wait_for(2, path="/fn")}
    for ev in (ev1, ev2):
        arrived = got[ev["id"]]
        for name in (
            "type",
            "source",
            "subject",
            "partitionkey",
            "specversion",
            "time",
            "datacontenttype",
        ):
            assert arrived[name] == ev[name], name
        assert arrived["data"] == ev.data


@pytest.mark.parametrize("claimed", [8, -1_000_000])
async def test_a_producer_cannot_set_the_hop_count(
    eventbus: StartService, receiver: Receiver, claimed: int
) -> None:
    # The count was taken from the event as posted: 8 had its reply dropped at the hop limit,
    # -1000000 let two functions answer each other a million times.
    svc = await _start(eventbus, receiver)
    reply = {"specversion": "1.0", "id": f"r{claimed}", "source": "tests/fn", "type": "t"}
    receiver.script(Response(200, reply={**reply, "type": "com.example.order.reply"}))
    receiver.respond(Response(204))
    event = _event(f"hops{claimed}", data={"total": 101, "customer": "x"}, eventbushops=claimed)
    status, _ = await svc.post_event(event)
    assert status == 202
    routed = await receiver.wait_for(1, path="/replies")
    assert int(routed[0].cloudevent["eventbushops"]) == 1


async def test_function_reply_is_published_back_and_routed(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    reply = {
        "specversion": "1.0",
        "id": "r-1",
        "source": "tests/fn",
        "type": "com.example.order.reply",
        "data": {"ok": True},
    }
    receiver.script(Response(200, reply=reply))
    receiver.respond(Response(204))
    status, _ = await svc.post_event(_event("with-reply", data={"total": 101, "customer": "x"}))
    assert status == 202
    routed = await receiver.wait_for(1, path="/replies")
    assert routed[0].cloudevent["id"] == "r-1"
    assert int(routed[0].cloudevent["eventbushops"]) == 1  # binary mode: headers are strings
    trail = await svc.trail("tests/fn", "r-1", 1)
    assert trail["via"] == "reply"
    # The two trails link: the reply names the event it answers, that event lists its reply.
    cause = trail["cause"]
    assert cause == {"source": "tests/shop", "id": "e-with-reply"}
    original = await svc.trail(cause["source"], cause["id"], 1)
    assert original["cause"] is None
    assert [(c["source"], c["id"], c["via"]) for c in original["caused"]] == [
        ("tests/fn", "r-1", "reply")
    ]
    # A producer's event posing as a reply to it is neither linked nor listed.
    posing = _event("posing", eventbuscausesource=cause["source"], eventbuscauseid=cause["id"])
    assert (await svc.post_event(posing))[0] == 202
    await receiver.wait_for(2, path="/fn")
    await svc.drained()
    assert (await svc.trail(posing["source"], posing["id"]))["cause"] is None
    again = await svc.trail(cause["source"], cause["id"], 1)
    assert [c["id"] for c in again["caused"]] == ["r-1"]


async def test_a_reply_the_bus_already_holds_is_counted_as_a_duplicate(
    eventbus: StartService, receiver: Receiver
) -> None:
    """Replies (like sources) have nobody to answer: a duplicate is counted, by entry point."""
    svc = await _start(eventbus, receiver)
    before = await _counted(svc, "reply")
    received = await _counted(svc, "reply", "received")
    reply = {
        "specversion": "1.0",
        "id": "r-same",
        "source": "tests/fn",
        "type": "com.example.order.reply",
        "data": {"ok": True},
    }
    receiver.script(Response(200, reply=reply), Response(200, reply=reply))
    receiver.respond(Response(204))
    for i in (1, 2):
        status, _ = await svc.post_event(_event(f"twice-{i}"))
        assert status == 202
    await receiver.wait_for(1, path="/replies")
    await svc.drained()  # both replies published and routed
    assert [r.cloudevent["id"] for r in receiver.requests if r.path == "/replies"] == ["r-same"]
    assert await _counted(svc, "reply") - before == 1
    assert await _counted(svc, "reply", "received") - received == 1


_BINARY = {"ce-specversion": "1.0", "ce-id": "z", "ce-source": "s", "ce-type": "t"}
BAD_REQUESTS = [
    (
        "compressed",
        {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip", **_BINARY},
        gzip.compress(b"data"),
        415,
        "Content-Encoding 'gzip' is not supported",
    ),
    ("malformed JSON", {"Content-Type": "application/cloudevents+json"}, b'{"id": ', 400, "JSON"),
    ("not an object", {"Content-Type": "application/cloudevents+json"}, b"[1, 2]", 400, ""),
    (
        "missing type",
        {"Content-Type": "application/cloudevents+json"},
        orjson.dumps({"specversion": "1.0", "id": "x", "source": "s"}),
        400,
        "type",
    ),
    (
        "bad specversion",
        {"Content-Type": "application/cloudevents+json"},
        orjson.dumps({"specversion": "0.3", "id": "x", "source": "s", "type": "t"}),
        400,
        "specversion",
    ),
    (
        "bad time",
        {"Content-Type": "application/cloudevents+json"},
        orjson.dumps({"specversion": "1.0", "id": "x", "source": "s", "type": "t", "time": "x"}),
        400,
        "time",
    ),
    ("binary without ce headers", {"Content-Type": "application/json"}, b"{}", 400, "specversion"),
    ("xml format", {"Content-Type": "application/cloudevents+xml"}, b"<e/>", 415, ""),
    (
        "huge event",
        {"Content-Type": "application/cloudevents+json"},
        orjson.dumps(_event("huge", data={"blob": "x" * 300_000})),
        413,
        "",
    ),
    (
        "huge request",
        {"Content-Type": "application/cloudevents-batch+json"},
        b"[" + b" " * 2_000_000 + b"]",
        413,
        "exceeds",
    ),
]


async def test_bad_input_gets_problem_details_and_service_stays_up(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    for name, headers, body, want, word in BAD_REQUESTS:
        status, resp_headers, problem = await svc.request("POST", "/events", body, headers)
        assert status == want, (name, problem)
        assert resp_headers["Content-Type"].startswith("application/problem+json"), name
        assert problem["status"] == want and problem["detail"], name
        assert word.lower() in problem["detail"].lower(), (name, problem["detail"])

    # a batch with one bad entry: the good ones are accepted, the bad one reported (and
    # counted, as a single bad event is: a batch's refused entries were not)
    refused = await _refused(svc, "400")
    batch = [_event("ok-1"), {"specversion": "1.0", "id": "bad"}, _event("ok-2")]
    status, _, body = await svc.request(
        "POST",
        "/events",
        orjson.dumps(batch),
        {"Content-Type": "application/cloudevents-batch+json"},
    )
    assert status == 207, body
    assert body["failed"] == 1
    assert [e["status"] for e in body["entries"]] == [202, 400, 202]
    assert "source" in body["entries"][1]["error"]
    assert await _refused(svc, "400") - refused == 1

    status, _ = await svc.post_event(_event("after-bad"))
    assert status == 202
    ids = {r.cloudevent["id"] for r in await receiver.wait_for(3, path="/fn")}
    assert ids == {"e-ok-1", "e-ok-2", "e-after-bad"}

    status, _, problem = await svc.request("GET", "/dead-letters/not-a-number")
    assert status == 400
    for query in ("limit=0", "limit=-1", "limit=abc", "limit=5000", "after=x", "since=yesterday"):
        status, headers, problem = await svc.request("GET", f"/dead-letters?{query}")
        assert status == 400, (query, problem)
        assert headers["Content-Type"].startswith("application/problem+json")
    status, _, _ = await svc.request("GET", "/sources/dead-letters?limit=0")
    assert status == 400
    status, _, body = await svc.request("GET", "/dead-letters?since=2026-01-01T00:00:00")
    assert status == 200 and body["items"] == []
    status, _, problem = await svc.request("POST", "/dead-letters/999999/replay")
    assert status == 404 and "999999" in problem["detail"]


async def test_a_refused_body_is_freed_with_its_answer(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The answer's exception held the handler's frame through its traceback, and the frame held
    # the exception: a cycle that kept each refused request's body until the next full
    # collection (600 refused bodies of 1 MB: 810 MB, with the service's collector tuning)
    svc = await _start(eventbus, receiver)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            status, _, _ = await svc.request(
                "POST", "/events", b"[" + b" " * 2_000_000 + b"]", {"Content-Type": BATCH}
            )
            assert status == 413
            status, _, _ = await svc.request("POST", "/hooks/nowhere", b"{}")
            assert status == 404
        left = [o for o in gc.get_objects() if isinstance(o, Problem)]
    finally:
        gc.enable()
    assert left == []


async def test_api_keys_refuse_and_audit(eventbus: StartService, receiver: Receiver) -> None:
    keys = [
        {"name": "pub", "key": "publish-key-0123456789", "scopes": ["publish"]},
        {"name": "ops", "key": "admin-key-0123456789ab", "scopes": ["admin"]},
    ]
    svc = await _start(eventbus, receiver, settings={"api_keys": keys})
    status, problem = await svc.post_event(_event("nokey"))
    assert status == 401 and problem["detail"] == "missing API key"
    status, problem = await svc.post_event(
        _event("badkey"), Authorization="Bearer wrong-key-xxxxxxxx"
    )
    assert status == 401 and problem["detail"] == "invalid API key"
    status, _ = await svc.post_event(_event("good"), Authorization="Bearer publish-key-0123456789")
    assert status == 202
    status, _, problem = await svc.request(
        "GET", "/dead-letters", headers={"X-API-Key": "publish-key-0123456789"}
    )
    assert status == 403 and "admin" in problem["detail"]
    status, _, _ = await svc.request(
        "GET", "/dead-letters", headers={"Authorization": "Bearer admin-key-0123456789ab"}
    )
    assert status == 200
    status, _, _ = await svc.request("GET", "/healthz")
    assert status == 200

    await svc.service.store.audit.flush()
    rows = await svc.service.store.pool.fetch("SELECT reason, path FROM refusals ORDER BY at")
    assert [(r["reason"], r["path"]) for r in rows][:2] == [
        ("missing API key", "/events"),
        ("invalid API key", "/events"),
    ]
    assert any("lacks scope" in r["reason"] for r in rows)


@pytest.mark.timeout(120)
async def test_bus_down_answers_503_with_retry_after_then_recovers(
    eventbus: StartService, receiver: Receiver, tmp_path: Any
) -> None:
    async with NatsServer(tmp_path / "own-nats") as nats:
        svc = await _start(
            eventbus,
            receiver,
            settings={
                "bus": {"backend": "nats", "nats": {"url": nats.url}, "publish_timeout": 1.0}
            },
        )
        assert (await svc.post_event(_event("before")))[0] == 202
        await receiver.wait_for(1, path="/fn")
        await nats.stop()
        status, _, problem = await svc.request(
            "POST",
            "/events",
            orjson.dumps(_event("during")),
            {"Content-Type": "application/cloudevents+json"},
        )
        assert status == 503, problem
        assert await _refused(svc, "503") == 1
        status, _headers, _ = await svc.request("GET", "/readyz")
        assert status == 503
        await nats.start()

        async def accepted() -> bool:
            status, _ = await svc.post_event(_event("after"))
            return status == 202

        await eventually(accepted, within=20, every=0.2, what="publishing once NATS is back")
        got = await receiver.wait_for(2, path="/fn", timeout=30)
        assert {r.cloudevent["id"] for r in got} == {"e-before", "e-after"}
