"""Interop with the CloudEvents Python SDK, both its v1 API and its ``core`` bindings.

Events the SDK writes must read the same with our bindings, and what our bindings write must
read back in the SDK with the same attributes and data.
"""

from __future__ import annotations

import base64
import warnings
from datetime import datetime
from typing import Any

import pytest
from cloudevents.core.bindings import http as core_http
from cloudevents.core.bindings import kafka as core_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as CoreEvent
from cloudevents.v1 import kafka as v1_kafka
from cloudevents.v1.http import CloudEvent as V1Event
from cloudevents.v1.http import from_http as v1_from_http
from cloudevents.v1.http import to_binary as v1_to_binary
from cloudevents.v1.http import to_structured as v1_to_structured

from eventbus.cloudevents import from_http, from_kafka, new_event, to_http, to_kafka

# The v1 API marks its helpers deprecated; the warnings say nothing about interop.
pytestmark = pytest.mark.filterwarnings("ignore")

COMMON_EVENTS: list[tuple[dict[str, Any], Any]] = [
    ({"type": "com.example.order", "source": "/orders", "subject": "o-1", "ext1": "v"}, {"a": 1}),
    ({"type": "t", "source": "/s", "datacontenttype": "application/octet-stream"}, b"\x00\xff"),
    ({"type": "t", "source": "/s", "dataschema": "https://example.com/s.json"}, None),
]
# Each SDK API has a data type it writes wrongly in binary mode (v1 JSON-quotes text/plain
# strings, core writes lists as Python reprs), so each gets the cases it writes right.
V1_EVENTS = [
    *COMMON_EVENTS,
    ({"type": "t", "source": "/s", "datacontenttype": "application/json"}, [1, "two", None]),
]
CORE_EVENTS = [
    *COMMON_EVENTS,
    ({"type": "t", "source": "/s", "datacontenttype": "text/plain"}, "plain text"),
    # core percent-encodes header values: exercise the decoding with spaces, quotes, non-ASCII.
    ({"type": "t", "source": "/caf\u00e9 \u65e5", "subject": 'say "hi" 100%'}, {"x": 1}),
]


def _as_bytes(value: str | bytes | None) -> bytes | None:
    """The SDK types Kafka keys and values as text or bytes; a Kafka client hands out bytes."""
    return value.encode() if isinstance(value, str) else value


def _v1_expected(event: V1Event) -> dict[str, Any]:
    expected: dict[str, Any] = dict(event.get_attributes())
    if isinstance(event.data, bytes):
        expected["data_base64"] = base64.b64encode(event.data).decode()
    elif event.data is not None:
        expected["data"] = event.data
    return expected


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize(("attributes", "data"), V1_EVENTS)
def test_v1_sdk_http_reads_the_same(mode: str, attributes: dict[str, Any], data: Any) -> None:
    sdk_event = V1Event(dict(attributes), data)
    writer = v1_to_binary if mode == "binary" else v1_to_structured
    headers, body = writer(sdk_event)
    assert from_http(headers, body) == [_v1_expected(sdk_event)]


def _ours() -> list[dict[str, Any]]:
    return [
        new_event(type="t", source="/s", data={"a": [1, 2]}, subject="sub", ext1="v"),
        new_event(type="t", source="/s", data=b"\x00\x01", datacontenttype="application/x-bin"),
        new_event(type="t", source="/s", data="hi", datacontenttype="text/plain"),
        new_event(type="t", source="/s"),
    ]


def _split(event: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    attributes = {k: v for k, v in event.items() if k not in ("data", "data_base64")}
    if "data_base64" in event:
        return attributes, base64.b64decode(event["data_base64"])
    return attributes, event.get("data")


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("event", _ours())
def test_v1_sdk_http_accepts_ours(structured: bool, event: dict[str, Any]) -> None:
    headers, body = to_http(event, structured=structured)
    sdk_event = v1_from_http(headers, body)
    attributes, data = _split(event)
    assert sdk_event.get_attributes() == attributes
    if isinstance(data, str) and not structured:
        data = data.encode()  # the v1 SDK hands a binary-mode text body back as bytes
    assert sdk_event.data == data


def test_v1_sdk_kafka_both_ways() -> None:
    attributes = {"type": "t", "source": "/s", "partitionkey": "pk"}
    attributes["datacontenttype"] = "application/json"
    sdk_event = V1Event(dict(attributes), {"a": 1})
    expected = _v1_expected(sdk_event)
    message = v1_kafka.to_binary(sdk_event)
    key = _as_bytes(message.key)
    assert from_kafka(list(message.headers.items()), key, _as_bytes(message.value)) == expected
    # The v1 SDK's structured record moves datacontenttype out of the event into the record's
    # content-type header; read as the plain JSON event it is, the event simply lacks it.
    message = v1_kafka.to_structured(sdk_event)
    del expected["datacontenttype"]
    assert from_kafka(list(message.headers.items()), key, _as_bytes(message.value)) == expected

    ours = new_event(type="t", source="/s", data={"a": 1}, partitionkey="pk")
    key, headers, value = to_kafka(ours)
    back = v1_kafka.from_binary(v1_kafka.KafkaMessage(dict(headers), key, value))
    assert back.get_data() == {"a": 1}
    assert back["id"] == ours["id"]
    assert back["time"] == ours["time"]
    # The v1 SDK hands the record key back raw, as bytes.
    assert back["partitionkey"] == b"pk"
    key, headers, value = to_kafka(ours, structured=True)
    back = v1_kafka.from_structured(v1_kafka.KafkaMessage(dict(headers), key, value))
    assert back.get_data() == {"a": 1}
    assert back["partitionkey"] == "pk"


def _core_expected(event: CoreEvent) -> dict[str, Any]:
    expected: dict[str, Any] = dict(event.get_attributes())
    expected["time"] = expected["time"].isoformat().replace("+00:00", "Z")
    data = event.get_data()
    if isinstance(data, bytes):
        expected["data_base64"] = base64.b64encode(data).decode()
    elif data is not None:
        expected["data"] = data
    return expected


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize(("attributes", "data"), CORE_EVENTS)
def test_core_sdk_http_reads_the_same(mode: str, attributes: dict[str, Any], data: Any) -> None:
    attributes = dict(attributes)
    if data is not None:
        attributes.setdefault("datacontenttype", "application/json")
    sdk_event = CoreEvent(attributes, data)
    writer = core_http.to_binary if mode == "binary" else core_http.to_structured
    message = writer(sdk_event, JSONFormat())
    assert from_http(message.headers, message.body) == [_core_expected(sdk_event)]


@pytest.mark.parametrize("structured", [False, True])
def test_core_sdk_http_accepts_ours(structured: bool) -> None:
    event = new_event(type="t", source="/caf\u00e9 x", subject='"q" 50%', data={"a": 1}, e1="v")
    headers, body = to_http(event, structured=structured)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdk_event = core_http.from_http(core_http.HTTPMessage(headers, body), JSONFormat())
    attributes = dict(sdk_event.get_attributes())
    sdk_time = attributes.pop("time")
    if isinstance(sdk_time, str):
        sdk_time = datetime.fromisoformat(sdk_time.replace("Z", "+00:00"))
    ours, data = _split(event)
    assert sdk_time == datetime.fromisoformat(ours.pop("time").replace("Z", "+00:00"))
    assert attributes == ours
    assert sdk_event.get_data() == data


def test_core_sdk_kafka_both_ways() -> None:
    attributes = {"type": "t", "source": "/s \u00e9", "partitionkey": "pk"}
    attributes["datacontenttype"] = "application/json"
    sdk_event = CoreEvent(attributes, {"a": 1})
    for writer in (core_kafka.to_binary, core_kafka.to_structured):
        message = writer(sdk_event, JSONFormat())
        got = from_kafka(list(message.headers.items()), _as_bytes(message.key), message.value)
        assert got == _core_expected(sdk_event)

    ours = new_event(type="t", source="/s", data={"a": 1}, partitionkey="pk")
    for structured in (False, True):
        key, headers, value = to_kafka(ours, structured=structured)
        message = core_kafka.KafkaMessage(dict(headers), key, value)
        back = core_kafka.from_kafka(message, JSONFormat())
        assert back.get_id() == ours["id"]
        assert back.get_data() == {"a": 1}
