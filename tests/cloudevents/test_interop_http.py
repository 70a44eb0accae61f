"""Interop with the CloudEvents Python SDK over real HTTP, both its v1 API and its ``core``
bindings (real NATS, PostgreSQL and HTTP; no mocks).

Receiver side: a running eventbus delivers to a function endpoint the test runs, in binary and
structured mode, and the SDK parses the request as it arrived. Sender side: requests the SDK
made are posted to eventbus's real edge and must reach the function intact. The in-memory
counterparts, without servers, are in ``test_interop.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from cloudevents.core.bindings import http as core_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as CoreEvent
from cloudevents.v1.http import CloudEvent as V1Event
from cloudevents.v1.http import from_http as v1_from_http
from cloudevents.v1.http import to_binary as v1_to_binary
from cloudevents.v1.http import to_structured as v1_to_structured

from tests.fixtures.receiver import Receiver, Recorded
from tests.fixtures.service import RunningService, StartService

# The v1 API marks its helpers deprecated; the warnings say nothing about interop.
pytestmark = pytest.mark.filterwarnings("ignore")

RULES = """
- name: all
  targets: [binary, structured]
"""

# Values any reader gets right: printable ASCII without space, '"' or '%' (sent unencoded).
PLAIN = {
    "id": "plain-1",
    "source": "/buckets/photos?region=eu-1&x=y#z",
    "subject": "cats/tom.jpg:v2",
    "tenant": "acme_corp.eu-1",
}
# Values the binding requires percent-encoding for: space, quotes, '%', non-ASCII.
ENCODED = {
    "id": "encoded-1",
    "source": "/caf\u00e9 \u65e5",
    "subject": 'sub/ject "\u00fc" 100%',
    "tenant": "a b",
}


async def _start(eventbus: StartService, receiver: Receiver) -> RunningService:
    return await eventbus(
        rules=RULES,
        targets=[
            {"name": mode, "type": "http", "url": receiver.url(f"/{mode}"), "mode": mode}
            for mode in ("binary", "structured")
        ],
    )


def _event(attributes: dict[str, str]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "type": "com.example.interop",
        "time": "2026-12-01T10:00:00.5Z",
        "datacontenttype": "application/json",
        "data": {"size": 48213, "name": "tom"},
        **attributes,
    }


def _core_attributes(request: Recorded) -> tuple[dict[str, Any], Any]:
    message = core_http.HTTPMessage(dict(request.headers), request.body)
    event = core_http.from_http(message, JSONFormat())
    attributes = dict(event.get_attributes())
    time = attributes["time"]
    if isinstance(time, datetime):
        attributes["time"] = time.isoformat().replace("+00:00", "Z")
    return attributes, event.get_data()


def _v1_attributes(request: Recorded) -> tuple[dict[str, Any], Any]:
    event = v1_from_http(dict(request.headers), request.body)
    return dict(event.get_attributes()), event.data


def _without_data(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "data"}


def _same_time(attributes: dict[str, Any]) -> dict[str, Any]:
    # The SDKs print fractions of a second their own way: compare the instant.
    iso = str(attributes["time"]).replace("Z", "+00:00")
    return {**attributes, "time": datetime.fromisoformat(iso)}


async def test_the_sdk_reads_what_eventbus_delivers(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    events = [_event(PLAIN), _event(ENCODED)]
    status, _, body = await svc.request(
        "POST",
        "/events",
        orjson.dumps(events),
        {"Content-Type": "application/cloudevents-batch+json"},
    )
    assert status == 202, body
    await receiver.wait_for(2, path="/binary")
    await receiver.wait_for(2, path="/structured")
    delivered = {(r.path, r.cloudevent["id"]): r for r in receiver.requests if r.cloudevent}

    for event in events:
        expected = _same_time(_without_data(event))
        for mode in ("/binary", "/structured"):
            request = delivered[(mode, event["id"])]
            attributes, data = _core_attributes(request)
            assert (_same_time(attributes), data) == (expected, event["data"]), mode
            attributes, data = _v1_attributes(request)
            assert data == event["data"], mode
            if mode == "/structured" or event is events[0]:
                assert _same_time(attributes) == expected, mode
                continue
            # The v1 from_http does not percent-decode binary-mode headers (the spec asks
            # receivers to): it hands back the encoded text, which decodes to the value.
            encoded = {n for n in ("source", "subject", "tenant") if attributes[n] != event[n]}
            assert encoded == {"source", "subject", "tenant"}
            assert {n: unquote(attributes[n]) for n in encoded} == {n: event[n] for n in encoded}
    assert '"' not in delivered[("/binary", "encoded-1")].headers["ce-subject"]
    assert delivered[("/binary", "plain-1")].headers["ce-source"] == PLAIN["source"]


def _v1_requests() -> list[tuple[str, dict[str, str], bytes]]:
    requests = []
    for attributes, writer in ((PLAIN, v1_to_binary), (ENCODED, v1_to_structured)):
        event = _event(attributes)
        data = event.pop("data")
        headers, body = writer(V1Event({**event, "id": f"v1-{writer.__name__}"}, data))
        requests.append((f"v1-{writer.__name__}", dict(headers), body))
    return requests


def _core_requests() -> list[tuple[str, dict[str, str], bytes]]:
    requests = []
    for attributes in (PLAIN, ENCODED):
        for writer in (core_http.to_binary, core_http.to_structured):
            event = _event(attributes)
            data = event.pop("data")
            event["id"] = f"core-{writer.__name__}-{attributes['id']}"
            event["time"] = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
            message = writer(CoreEvent(event, data), JSONFormat())
            requests.append((event["id"], dict(message.headers), message.body))
    return requests


async def test_eventbus_reads_what_the_sdk_sends(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    requests = _v1_requests() + _core_requests()
    for _, headers, body in requests:
        status, _, answer = await svc.request("POST", "/events", body, headers)
        assert status == 202, answer
    arrived = {
        r.cloudevent["id"]: r.cloudevent
        for r in await receiver.wait_for(len(requests), path="/binary")
        if r.cloudevent
    }
    assert sorted(arrived) == sorted(event_id for event_id, _, _ in requests)
    for event_id, _, _ in requests:
        plain = event_id == "v1-to_binary" or event_id.endswith(PLAIN["id"])
        attributes = PLAIN if plain else ENCODED
        got = arrived[event_id]
        assert {n: got[n] for n in ("source", "subject", "tenant")} == {
            n: attributes[n] for n in ("source", "subject", "tenant")
        }, event_id
        assert got["type"] == "com.example.interop"
        assert got["data"] == {"size": 48213, "name": "tom"}
        assert _same_time(got)["time"] == _same_time(_event(PLAIN))["time"]


async def test_the_v1_binary_writer_unencoded_values(
    eventbus: StartService, receiver: Receiver
) -> None:
    """The v1 to_binary writes header values as they are: ASCII arrives intact (a '%' not
    followed by two hex digits is kept literally), non-ASCII is refused with a pointer to
    percent-encoding (HTTP servers read raw header bytes as Latin-1, so it would arrive wrong)."""
    svc = await _start(eventbus, receiver)
    ascii_only = V1Event({**_without_data(_event(PLAIN)), "subject": 'say "hi" 100% sure'}, {})
    headers, body = v1_to_binary(ascii_only)
    status, _, answer = await svc.request("POST", "/events", body, dict(headers))
    assert status == 202, answer
    (arrived,) = await receiver.wait_for(1, path="/binary")
    assert arrived.cloudevent is not None
    assert arrived.cloudevent["subject"] == 'say "hi" 100% sure'

    non_ascii = V1Event({**_without_data(_event(ENCODED)), "id": "v1-raw"}, {})
    headers, body = v1_to_binary(non_ascii)
    status, _, problem = await svc.request("POST", "/events", body, dict(headers))
    assert status == 400
    assert "percent-encod" in problem["detail"]
