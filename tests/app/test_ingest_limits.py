"""What the edge refuses, end to end over HTTP on real NATS, PostgreSQL and a function endpoint:
every event it accepts can be stored, read back through its trail and dead letter, and
delivered in binary mode; everything else is a 4xx problem naming the cause, never a 5xx."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from typing import Any

import orjson

from eventbus.bus._nats_server import free_port
from eventbus.cloudevents import (
    DEFAULT_MAX_BATCH_ENTRIES,
    MAX_DATA_DEPTH,
    MAX_EXTENSIONS,
    MAX_HEADER_BYTES,
    MAX_IDENTITY_BYTES,
    to_http,
)
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

SOURCE = "tests/limits"
RULES = """
- name: deliver
  match: {source: [tests/limits], type: [deliver]}
  targets: [fn]
- name: dead
  match: {source: [tests/limits], type: [dead]}
  targets: [dead]
"""
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}


def _event(event_id: str, type: str = "deliver", **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": SOURCE, "type": type, **extra}


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


async def _start(eventbus: StartService, receiver: Receiver) -> RunningService:
    # "dead" points at a port nothing listens on and gives up after one attempt
    dead = f"http://127.0.0.1:{free_port()}/gone"
    return await eventbus(
        rules=RULES,
        targets=[
            {"name": "fn", "type": "http", "url": receiver.url("/fn")},
            {"name": "dead", "type": "http", "url": dead, "delivery": {"retry": "none"}},
        ],
    )


async def _refused(
    svc: RunningService, headers: dict[str, str], body: bytes, status: int, fragment: str
) -> None:
    got, resp_headers, problem = await svc.request("POST", "/events", body, headers)
    assert got == status, problem
    assert resp_headers["Content-Type"].startswith("application/problem+json")
    assert fragment in problem["detail"], problem["detail"]


async def _dead_letter(svc: RunningService, event_id: str) -> Any:
    async def listed() -> list[dict[str, Any]]:
        status, _, body = await svc.request("GET", "/dead-letters")
        assert status == 200, body
        return [item for item in body["items"] if item["event_id"] == event_id]

    found = await eventually(listed, within=10, every=0.1, what=f"{event_id} dead-lettered")
    status, _, item = await svc.request("GET", f"/dead-letters/{found[0]['id']}")
    assert status == 200, item
    return item


async def test_times_outside_years_1_to_9999_in_utc_are_refused(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    for time in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-00:01", "9999-12-31T23:59:60Z"):
        body = orjson.dumps(_event("bad-time", time=time))
        await _refused(svc, STRUCTURED, body, 400, "'time' must fall within years 0001-9999")
    # the extremes that remain, and the forms Python's parser refuses, are all accepted and
    # audited (the time column holds the instant, or NULL where the audit cannot read it)
    accepted = {
        "first": "0001-01-01T00:00:00-23:59",
        "last": "9999-12-31T23:59:59.999999+23:59",
        "leap": "2016-12-31T23:59:60Z",
        "lower": "2018-04-05t17:31:00z",
    }
    for name, time in accepted.items():
        status, body = await svc.post_event(_event(name, type="audit-only", time=time))
        assert status == 202, body
    for name, time in accepted.items():
        trail = await svc.trail(SOURCE, name)
        assert trail["event"]["time"] == time
    rows = await svc.service.store.pool.fetch(
        "SELECT id, time FROM events WHERE source = $1", SOURCE
    )
    stored = {row["id"]: row["time"] for row in rows}
    assert stored["first"] == datetime(1, 1, 1, 23, 59, tzinfo=UTC)
    assert stored["last"] == datetime(9999, 12, 31, 0, 0, 59, 999999, tzinfo=UTC)
    # the instant, or NULL where the audit's parser does not read the form
    assert stored["leap"] in (None, datetime(2017, 1, 1, tzinfo=UTC))
    assert stored["lower"] in (None, datetime(2018, 4, 5, 17, 31, tzinfo=UTC))
    status, _ = await svc.post_event(_event("after"))
    assert status == 202
    await receiver.wait_for(1, path="/fn")


async def test_non_ascii_data_base64_is_a_400_naming_the_field_in_every_mode(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    bad = _event("b64", data_base64="café")
    await _refused(svc, STRUCTURED, orjson.dumps(bad), 400, "'data_base64' is not valid base64")
    binary = {"ce-specversion": "1.0", "ce-id": "b", "ce-source": SOURCE, "ce-type": "deliver"}
    await _refused(
        svc, {**binary, "ce-data_base64": "caf%C3%A9"}, b"", 400, "'data_base64' cannot travel"
    )
    batch = [_event("ok-1"), bad, _event("ok-2")]
    status, _, body = await svc.request("POST", "/events", orjson.dumps(batch), BATCH)
    assert status == 207, body
    assert [e["status"] for e in body["entries"]] == [202, 400, 202]
    assert "'data_base64'" in body["entries"][1]["error"]
    got = await receiver.wait_for(2, path="/fn")
    assert {r.cloudevent["id"] for r in got} == {"ok-1", "ok-2"}


async def test_batches_are_capped_and_their_answers_stay_small(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    # a 1 MB body of tiny entries: refused whole, with one short problem
    tiny = b"[" + b",".join([b"{}"] * 340_000) + b"]"
    await _refused(svc, BATCH, tiny, 413, f"more than the limit of {DEFAULT_MAX_BATCH_ENTRIES}")
    over = orjson.dumps(
        [_event(f"e{i}", type="none") for i in range(DEFAULT_MAX_BATCH_ENTRIES + 1)]
    )
    await _refused(svc, BATCH, over, 413, "events, more than the limit")
    # the largest batch of bad entries: each error is a short line
    status, _, body = await svc.request(
        "POST", "/events", orjson.dumps([{}] * DEFAULT_MAX_BATCH_ENTRIES), BATCH
    )
    assert status == 207 and body["failed"] == DEFAULT_MAX_BATCH_ENTRIES
    assert len(orjson.dumps(body)) < 100 * DEFAULT_MAX_BATCH_ENTRIES
    # and one of long, invalid extension names: the names are clipped in the errors
    long_names = [_event(f"n{i}", **{"x" * 900: 1.5}) for i in range(1000)]
    status, _, body = await svc.request("POST", "/events", orjson.dumps(long_names), BATCH)
    assert status == 207 and body["failed"] == 1000
    assert len(orjson.dumps(body)) < 250 * 1000


async def test_data_at_the_depth_limit_is_stored_read_delivered_and_dead_lettered(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    deepest = _nested(MAX_DATA_DEPTH)
    too_deep = _nested(MAX_DATA_DEPTH + 1)
    fragment = f"more than {MAX_DATA_DEPTH} levels"
    # 300 levels parse, but are deeper than orjson writes: the limit must refuse them first
    very_deep = orjson.dumps(_event("x"))[:-1] + b',"data":' + b"[" * 300 + b"]" * 300 + b"}"
    for body in (orjson.dumps(_event("x", data=too_deep)), very_deep):
        await _refused(svc, STRUCTURED, body, 400, fragment)
    binary = {"ce-specversion": "1.0", "ce-id": "b", "ce-source": SOURCE, "ce-type": "deliver"}
    await _refused(
        svc, {**binary, "Content-Type": "application/json"}, orjson.dumps(too_deep), 400, fragment
    )
    status, _, body = await svc.request(
        "POST",
        "/events",
        orjson.dumps([_event("x", data=too_deep), _event("y", type="none")]),
        BATCH,
    )
    assert status == 207 and fragment in body["entries"][0]["error"]

    status, body = await svc.post_event(_event("deep", data=deepest))
    assert status == 202, body
    status, body = await svc.post_event(_event("deep-dead", type="dead", data=deepest))
    assert status == 202, body
    [delivered] = await receiver.wait_for(1, path="/fn")
    assert delivered.headers["ce-id"] == "deep" and delivered.json() == deepest
    trail = await svc.trail(SOURCE, "deep", 1)
    assert trail["event"]["data"] == deepest
    assert trail["attempts"][0]["outcome"] == "delivered"
    dead = await _dead_letter(svc, "deep-dead")
    assert dead["event"]["data"] == deepest
    assert (await svc.trail(SOURCE, "deep-dead", 1))["event"]["data"] == deepest


async def test_every_accepted_event_fits_binary_mode_headers_and_the_audit(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    many = {f"ext{i}": f"value-{i}" for i in range(MAX_EXTENSIONS)}
    await _refused(
        svc,
        STRUCTURED,
        orjson.dumps(_event("x", **many, onemore=1)),
        400,
        f"more than {MAX_EXTENSIONS} extension attributes",
    )
    await _refused(
        svc,
        STRUCTURED,
        orjson.dumps(_event("x", big="é" * MAX_HEADER_BYTES)),
        400,
        "binary-mode headers",
    )
    # the most an event may carry: every extension, headers filled to the last byte
    event = _event("fits", **{name: many[name] for name in list(many)[1:]})
    headers, _ = to_http(event)
    # each attribute is one "ce-name: value" line ending in CRLF
    used = sum(len(name) + len(value) + 4 for name, value in headers.items())
    event["big"] = "x" * (MAX_HEADER_BYTES - used - len("ce-big") - 4)
    status, body = await svc.post_event(event)
    assert status == 202, body
    [delivered] = await receiver.wait_for(1, path="/fn")
    assert delivered.status == 204 and delivered.cloudevent == event
    assert (await svc.trail(SOURCE, "fits", 1))["attempts"][0]["outcome"] == "delivered"
    # The longest source and id are indexed together in the audit; one byte more is refused.
    # (About 2.8 KB of them made the row unwritable, which stopped every acknowledgement.)
    letters = random.Random(3).choices(string.ascii_letters, k=2 * MAX_IDENTITY_BYTES + 1)
    source, event_id = "".join(letters[:1024]), "".join(letters[1024:2048])
    status, body = await svc.post_event({**_event(event_id), "source": source})
    assert status == 202, body
    assert (await svc.trail(source, event_id))["event"]["id"] == event_id
    await _refused(
        svc,
        STRUCTURED,
        orjson.dumps({**_event(event_id + "x"), "source": source}),
        400,
        "attribute 'id' takes 1025 bytes, more than the 1024-byte limit",
    )


async def test_binary_mode_refuses_raw_non_ascii_and_data_headers(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    binary = {"ce-specversion": "1.0", "ce-id": "b", "ce-source": SOURCE, "ce-type": "deliver"}
    # aiohttp sends the header's UTF-8 bytes raw; the server would read them as Latin-1
    await _refused(svc, {**binary, "ce-subject": "café"}, b"", 400, "percent-encode")
    await _refused(svc, {**binary, "ce-data": "{}"}, b"", 400, "the data is the message body")
    status, _, body = await svc.request(
        "POST", "/events", b"", {**binary, "ce-subject": "caf%C3%A9"}
    )
    assert status == 202, body
    [delivered] = await receiver.wait_for(1, path="/fn")
    assert delivered.cloudevent["subject"] == "café"
    assert delivered.headers["ce-subject"] == "caf%C3%A9"


async def test_an_event_over_the_brokers_message_limit_is_a_413_naming_it(
    eventbus: StartService, receiver: Receiver
) -> None:
    # max_event_size allows 4 MiB; the session's NATS server takes 1 MiB: 422 "the event bus
    # refused the event: NATS publish failed: MaxPayloadError()" before.
    svc = await eventbus(
        rules=RULES,
        targets=[
            {"name": "fn", "type": "http", "url": receiver.url("/fn")},
            {"name": "dead", "type": "http", "url": receiver.url("/dead")},
        ],
        settings={"max_event_size": 4 << 20},
    )
    big = _event("big", data="x" * 2_000_000)
    await _refused(svc, STRUCTURED, orjson.dumps(big), 413, "max_payload")
    status, _, body = await svc.request("POST", "/events", orjson.dumps([big, _event("ok")]), BATCH)
    assert status == 207, body
    assert [e["status"] for e in body["entries"]] == [413, 202]
    await receiver.wait_for(1)
