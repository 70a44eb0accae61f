"""HTTP, Kafka and NATS bindings: table-driven reads, bad input, size limits and round trips."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventbus._errors import CloudEventError
from eventbus.cloudevents import (
    DEFAULT_MAX_BATCH_ENTRIES,
    DEFAULT_MAX_EVENT_SIZE,
    from_http,
    from_kafka,
    from_mqtt,
    from_nats,
    new_event,
    parse_http,
    to_http,
    to_http_batch,
    to_kafka,
    to_nats,
    validate,
)

DATA = Path(__file__).parent / "data"


def _cases(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((DATA / name).read_text(encoding="utf-8"))["cases"]
    return cases


def _bytes(value: str | dict[str, str] | None) -> bytes | None:
    """Case files write bytes as text, or as {"base64": ...} when they are not UTF-8."""
    if value is None:
        return None
    if isinstance(value, dict):
        return base64.b64decode(value["base64"])
    return value.encode()


def _check_error(exc: CloudEventError, expected: dict[str, Any]) -> None:
    assert exc.status == expected["status"], exc.detail
    assert expected["detail"] in exc.detail


HTTP = _cases("http_requests.json")
KAFKA = _cases("kafka_records.json")
NATS = _cases("nats_messages.json")
VALID = [case["event"] for case in _cases("valid_events.json")]
VALID_IDS = [case["name"] for case in _cases("valid_events.json")]


def _http_body(case: dict[str, Any]) -> bytes:
    if "body_base64" in case:
        return base64.b64decode(case["body_base64"])
    return str(case["body"]).encode()


@pytest.mark.parametrize("case", HTTP, ids=lambda c: c["name"])
def test_parse_http(case: dict[str, Any]) -> None:
    body = _http_body(case)
    if "error" in case:
        with pytest.raises(CloudEventError) as info:
            parse_http(case["headers"], body)
        _check_error(info.value, case["error"])
        return
    parsed = parse_http(case["headers"], body)
    if "events" in case:
        assert parsed.batch is False
        assert parsed.events == case["events"]
        assert from_http(case["headers"], body) == case["events"]
        return
    assert parsed.batch is True
    assert len(parsed.events) == len(case["results"])
    for got, want in zip(parsed.events, case["results"], strict=True):
        if "event" in want:
            assert got == want["event"]
        else:
            assert isinstance(got, CloudEventError)
            _check_error(got, want["error"])


def test_from_http_reports_the_first_bad_batch_entry() -> None:
    case = next(c for c in HTTP if c["name"] == "batch with bad entries keeps the good ones")
    with pytest.raises(CloudEventError) as info:
        from_http(case["headers"], _http_body(case))
    assert info.value.status == 400
    assert info.value.detail.startswith("batch entry 1: an event must be a JSON object")


@pytest.mark.parametrize("case", KAFKA, ids=lambda c: c["name"])
def test_from_kafka(case: dict[str, Any]) -> None:
    headers = [(name, _bytes(value) or b"") for name, value in case["headers"]]
    key, value = _bytes(case["key"]), _bytes(case["value"])
    if "error" in case:
        with pytest.raises(CloudEventError) as info:
            from_kafka(headers, key, value)
        _check_error(info.value, case["error"])
    else:
        assert from_kafka(headers, key, value) == case["event"]


@pytest.mark.parametrize("case", NATS, ids=lambda c: c["name"])
def test_from_nats(case: dict[str, Any]) -> None:
    payload = str(case["payload"]).encode()
    if "error" in case:
        with pytest.raises(CloudEventError) as info:
            from_nats(case["headers"], payload)
        _check_error(info.value, case["error"])
    else:
        assert from_nats(case["headers"], payload) == case["event"]


def test_from_mqtt_reads_both_modes_and_refuses_what_it_cannot_read() -> None:
    required = [("specversion", "1.0"), ("id", "m1"), ("source", "/m"), ("type", "t")]
    odd = [("Trace", "x"), ("tenant", "a"), ("data", "not the data")]
    event = from_mqtt("application/xml", [*required, *odd], b"<a/>")
    assert event == {
        "specversion": "1.0",
        "id": "m1",
        "source": "/m",
        "type": "t",
        "tenant": "a",
        "datacontenttype": "application/xml",
        "data": "<a/>",
    }
    # the Content Type property wins over a datacontenttype user property
    typed = from_mqtt("text/plain", [*required, ("datacontenttype", "application/json")], b"1")
    assert (typed["datacontenttype"], typed["data"]) == ("text/plain", "1")
    structured = b'{"specversion": "1.0", "id": "s", "source": "/m", "type": "t"}'
    assert from_mqtt(None, [], structured)["id"] == "s"
    assert from_mqtt("application/cloudevents+json", required, structured)["id"] == "s"
    with pytest.raises(CloudEventError) as info:
        from_mqtt("application/cloudevents-batch+json", [], b"[]")
    assert info.value.status == 415
    with pytest.raises(CloudEventError, match="more than one 'type' user property"):
        from_mqtt(None, [*required, ("type", "u")], b"")


def _binary_view(event: dict[str, Any]) -> dict[str, Any]:
    """What a binary-mode round trip preserves: header values are strings, so integer and
    boolean extensions come back as their canonical strings, and data gets its implied
    content type made explicit; bytes under a JSON type come back as the JSON they hold."""
    view: dict[str, Any] = {}
    for name, value in event.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int) and name != "data":
            value = str(value)
        view[name] = value
    if "datacontenttype" not in event:
        if "data" in event:
            view["datacontenttype"] = "application/json"
        elif "data_base64" in event:
            view["datacontenttype"] = "application/octet-stream"
    elif "data_base64" in event and event["datacontenttype"].endswith("json"):
        view["data"] = orjson.loads(base64.b64decode(view.pop("data_base64")))
    return view


def _via_http_binary(event: dict[str, Any]) -> dict[str, Any]:
    headers, body = to_http(event)
    [result] = from_http(headers, body)
    return result


def _via_http_structured(event: dict[str, Any]) -> dict[str, Any]:
    headers, body = to_http(event, structured=True)
    [result] = from_http(headers, body)
    return result


def _via_kafka_binary(event: dict[str, Any]) -> dict[str, Any]:
    key, headers, value = to_kafka(event)
    return from_kafka(headers, key, value)


def _via_kafka_structured(event: dict[str, Any]) -> dict[str, Any]:
    key, headers, value = to_kafka(event, structured=True)
    return from_kafka(headers, key, value)


def _via_nats_binary(event: dict[str, Any]) -> dict[str, Any]:
    headers, payload = to_nats(event, structured=False)
    return from_nats(headers, payload)


def _via_nats_structured(event: dict[str, Any]) -> dict[str, Any]:
    headers, payload = to_nats(event)
    return from_nats(headers, payload)


ROUND_TRIPS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], bool]] = {
    "http-binary": (_via_http_binary, True),
    "http-structured": (_via_http_structured, False),
    "kafka-binary": (_via_kafka_binary, True),
    "kafka-structured": (_via_kafka_structured, False),
    "nats-binary": (_via_nats_binary, True),
    "nats-structured": (_via_nats_structured, False),
}


@pytest.mark.parametrize("mode", ROUND_TRIPS)
@pytest.mark.parametrize("event", VALID, ids=VALID_IDS)
def test_round_trip(mode: str, event: dict[str, Any]) -> None:
    via, binary = ROUND_TRIPS[mode]
    expected = _binary_view(event) if binary else event
    assert via(event) == expected


@pytest.mark.parametrize("event", VALID, ids=VALID_IDS)
def test_http_batch_round_trip(event: dict[str, Any]) -> None:
    events = [event, new_event(type="t", source="/s", data={"n": 2})]
    headers, body = to_http_batch(events)
    assert headers == {"Content-Type": "application/cloudevents-batch+json"}
    parsed = parse_http(headers, body)
    assert parsed.batch is True
    assert parsed.events == events


def test_to_http_binary_headers_are_percent_encoded() -> None:
    event = {
        "specversion": "1.0",
        "id": 'a "b" 100%',
        "source": "/s",
        "type": "t",
        "subject": "Euro \u20ac \U0001f600",
        "count": 5,
        "flag": True,
        "datacontenttype": "text/plain",
        "data": "caf\u00e9",
    }
    headers, body = to_http(event)
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "a%20%22b%22%20100%25",
        "ce-source": "/s",
        "ce-type": "t",
        "ce-subject": "Euro%20%E2%82%AC%20%F0%9F%98%80",
        "ce-count": "5",
        "ce-flag": "true",
        "Content-Type": "text/plain",
    }
    assert body == "caf\u00e9".encode()
    assert all(value.isascii() and value.isprintable() for value in headers.values())


def test_to_http_encodes_only_what_the_binding_requires() -> None:
    # Printable ASCII other than space, '"' and '%' is sent as is, so a reader that does not
    # percent-decode (the SDK's v1 from_http) still reads such values right.
    printable = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
    assert len(printable) == 92
    event = new_event(type="com.example/t:1", source="/a/b?c=d&e#f", subject=printable)
    headers, _ = to_http(event)
    assert headers["ce-subject"] == printable
    assert headers["ce-source"] == "/a/b?c=d&e#f"
    assert headers["ce-type"] == "com.example/t:1"
    headers, _ = to_http({**event, "subject": ' "%\u00fc'})
    assert headers["ce-subject"] == "%20%22%25%C3%BC"


def test_to_http_bodies() -> None:
    base = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    assert to_http(base) == ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s",
                              "ce-type": "t"}, b"")  # fmt: skip
    headers, body = to_http({**base, "data": {"a": 1}})
    assert (headers["Content-Type"], body) == ("application/json", b'{"a":1}')
    headers, body = to_http({**base, "data_base64": "AAE="})
    assert (headers["Content-Type"], body) == ("application/octet-stream", b"\x00\x01")
    headers, body = to_http({**base, "datacontenttype": "text/plain; charset=iso-8859-1",
                             "data": "caf\u00e9"})  # fmt: skip
    assert body == b"caf\xe9"
    headers, body = to_http({**base, "datacontenttype": "text/plain", "data": 42})
    assert body == b"42"
    headers, body = to_http({**base, "data": "x"}, structured=True)
    assert headers == {"Content-Type": "application/cloudevents+json"}
    assert orjson.loads(body) == {**base, "data": "x"}


def test_to_http_rejects_unencodable_data() -> None:
    base = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    with pytest.raises(CloudEventError, match="cannot be encoded as ascii"):
        to_http({**base, "datacontenttype": "text/plain; charset=ascii", "data": "\u00e9"})
    with pytest.raises(CloudEventError, match="cannot be serialized as JSON"):
        to_http({**base, "data": {1, 2}})


def test_to_kafka_key_and_modes() -> None:
    event = new_event(type="t", source="/s", partitionkey="p-1")
    key, headers, value = to_kafka(event)
    assert key == b"p-1"
    assert ("ce_partitionkey", b"p-1") in headers
    assert value == b"", "no data is an empty value, never a compaction tombstone"
    key, headers, value = to_kafka(event, structured=True)
    assert key == b"p-1"
    assert headers == [("content-type", b"application/cloudevents+json")]
    assert orjson.loads(value) == event
    assert to_kafka(new_event(type="t", source="/s"))[0] is None


def test_to_nats_modes() -> None:
    event = new_event(type="t", source="/s", data={"a": 1})
    headers, payload = to_nats(event)
    assert headers == {"Content-Type": "application/cloudevents+json"}
    assert orjson.loads(payload) == event
    headers, payload = to_nats(event, structured=False)
    assert headers["ce-datacontenttype"] == "application/json"
    assert "Content-Type" not in headers
    assert payload == b'{"a":1}'


HUGE = "x" * DEFAULT_MAX_EVENT_SIZE


def _huge_readers() -> dict[str, Callable[[], object]]:
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": HUGE}
    structured = orjson.dumps(event)
    ce = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
    kafka_ce = [("ce_" + k[3:], v.encode()) for k, v in ce.items()]
    return {
        "http structured": lambda: from_http(
            {"content-type": "application/cloudevents+json"}, structured
        ),
        "http binary": lambda: from_http({**ce, "content-type": "text/plain"}, HUGE.encode()),
        "http batch entry": lambda: from_http(
            {"content-type": "application/cloudevents-batch+json"}, orjson.dumps([event])
        ),
        "kafka structured": lambda: from_kafka([], None, structured),
        "kafka binary": lambda: from_kafka(kafka_ce, None, HUGE.encode()),
        "nats structured": lambda: from_nats(None, structured),
        "nats binary": lambda: from_nats(ce, HUGE.encode()),
    }


@pytest.mark.parametrize("reader", list(_huge_readers()))
def test_huge_payload_is_413(reader: str) -> None:
    with pytest.raises(CloudEventError) as info:
        _huge_readers()[reader]()
    assert info.value.status == 413
    assert "limit" in info.value.detail


def test_binary_size_counts_headers_and_body() -> None:
    ce = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
    header_size = sum(len(k) + len(v) for k, v in ce.items())
    body = b"x" * 100
    headers = {**ce, "content-type": "text/plain"}
    assert from_http(headers, body, max_size=header_size + 100)
    with pytest.raises(CloudEventError) as info:
        from_http(headers, body, max_size=header_size + 99)
    assert info.value.status == 413


def test_batch_entries_are_limited_one_by_one() -> None:
    small = new_event(type="t", source="/s", data="x" * 10)
    big = new_event(type="t", source="/s", data="x" * 1000)
    parsed = parse_http(
        {"content-type": "application/cloudevents-batch+json"},
        orjson.dumps([small, big, small]),
        max_size=500,
    )
    assert parsed.events[0] == small
    assert isinstance(parsed.events[1], CloudEventError)
    assert parsed.events[1].status == 413
    assert parsed.events[2] == small


def test_batch_entries_are_capped_before_any_is_validated() -> None:
    headers = {"content-type": "application/cloudevents-batch+json"}
    event = new_event(type="t", source="/s")
    assert len(parse_http(headers, orjson.dumps([event] * DEFAULT_MAX_BATCH_ENTRIES)).events) == (
        DEFAULT_MAX_BATCH_ENTRIES
    )
    # entries that are not even events: refused for their number, not reported one by one
    with pytest.raises(CloudEventError) as info:
        parse_http(headers, orjson.dumps([{}] * (DEFAULT_MAX_BATCH_ENTRIES + 1)))
    assert info.value.status == 413
    assert f"more than the limit of {DEFAULT_MAX_BATCH_ENTRIES}" in info.value.detail
    with pytest.raises(CloudEventError, match="3 events, more than the limit of 2"):
        parse_http(headers, orjson.dumps([event] * 3), max_entries=2)


def test_a_key_that_cannot_join_a_valid_event_stays_out_of_it() -> None:
    # A valid event with a 9,000-byte key (past the attributes' room) or with the most
    # extensions an event may have was refused because of the key.
    long_key = b"k" * 9000
    structured = orjson.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"})
    event = from_kafka([("content-type", b"application/cloudevents+json")], long_key, structured)
    assert event["id"] == "1" and "partitionkey" not in event
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"2"), ("ce_source", b"/s"), ("ce_type", b"t")]
    headers += [(f"ce_x{i}", b"v") for i in range(50)]
    event = from_kafka(headers, b"short-key", b"")
    assert event["id"] == "2" and "partitionkey" not in event and event["x49"] == "v"
    # a key that fits still joins, and an invalid event is refused for what it is
    assert from_kafka(headers[:4], b"short-key", b"")["partitionkey"] == "short-key"
    with pytest.raises(CloudEventError, match="'type'"):
        from_kafka(headers[:3], long_key, b"")


def test_a_json_body_is_read_in_its_declared_charset() -> None:
    # Read as UTF-8 whatever the charset said: a UTF-16 body was refused, and a UTF-8 one
    # declared UTF-16 kept that label, which binary-mode deliveries (UTF-8 bytes) then carried.
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
    headers["content-type"] = "application/json; charset=utf-16; v=1"
    (event,) = from_http(headers, '{"k": "é"}'.encode("utf-16"))
    assert (event["data"], event["datacontenttype"]) == ({"k": "é"}, "application/json; v=1")
    with pytest.raises(CloudEventError, match="neither UTF-8 nor utf-16 text"):
        from_http(headers, b'{"k": "\xe9" }')  # not UTF-8, and an odd length: not UTF-16
    # UTF-8 whatever the label says, when it is UTF-8 (many clients say ISO-8859-1)
    headers["content-type"] = "application/json; charset=ISO-8859-1"
    (event,) = from_http(headers, '{"name": "Zoë"}'.encode())
    assert (event["data"], event["datacontenttype"]) == ({"name": "Zoë"}, "application/json")
    (event,) = from_http(headers, '{"name": "Zoë"}'.encode("latin-1"))
    assert event["data"] == {"name": "Zoë"}
    # UTF-16 and UTF-32 without a mark show in the bytes (their zero bytes are valid UTF-8:
    # read as that, '{"k": 1}' in UTF-16LE was refused as malformed JSON), whatever the label
    for codec, label in (("utf-16-le", "utf-16le"), ("utf-16-be", "utf-8"), ("utf-32-le", "")):
        headers["content-type"] = f"application/json; charset={label}" if label else "text/json"
        (event,) = from_http(headers, '{"k": "é", "n": 1}'.encode(codec))
        assert event["data"] == {"k": "é", "n": 1}, codec
        assert event["datacontenttype"] == ("text/json" if not label else "application/json")


def test_text_bytes_in_their_own_charset_cross_binary_mode_as_that_text() -> None:
    # Bytes under a text type went out as its body, which binary mode's ingest read in that
    # charset: Latin-1 bytes under text/plain were accepted, then refused by every reader.
    event = {
        "specversion": "1.0",
        "id": "1",
        "source": "/s",
        "type": "t",
        "datacontenttype": "text/csv; charset=iso-8859-1",
        "data_base64": base64.b64encode("café;1".encode("latin-1")).decode(),
    }
    headers, body = to_http(validate(event))
    assert body == "café;1".encode("latin-1")
    assert from_http(headers, body)[0]["data"] == "café;1"


def test_json_data_goes_out_in_utf8_under_a_type_saying_so() -> None:
    # JSON data is written in UTF-8: a charset=utf-16 it came with stayed on the type, and a
    # function that followed it read other characters.
    event = {
        "specversion": "1.0",
        "id": "1",
        "source": "/s",
        "type": "t",
        "datacontenttype": "application/json; charset=utf-16; v=2",
        "data": {"a": "é"},
    }
    headers, body = to_http(validate(event))
    assert (headers["Content-Type"], body) == ("application/json; v=2", '{"a":"é"}'.encode())
    assert from_http(headers, body)[0]["data"] == {"a": "é"}
    utf8 = {**event, "datacontenttype": "application/json; charset=UTF-8"}
    assert to_http(utf8)[0]["Content-Type"] == "application/json; charset=UTF-8"
