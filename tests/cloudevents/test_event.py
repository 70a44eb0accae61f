"""The CloudEvent model: validation tables, construction, JSON format, dedup key, public names."""

from __future__ import annotations

import copy
import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus._errors import CloudEventError
from eventbus.cloudevents import (
    DEFAULT_MAX_EVENT_SIZE,
    MAX_DATA_DEPTH,
    MAX_EXTENSIONS,
    MAX_HEADER_BYTES,
    MAX_IDENTITY_BYTES,
    decode,
    encode,
    event_key,
    format_time,
    header_value,
    new_event,
    parse_json,
    validate,
)
from eventbus.cloudevents._codec import decode_header

DATA = Path(__file__).parent / "data"


def _table(name: str) -> dict[str, Any]:
    table: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return table


INVALID = _table("invalid_events.json")
VALID = _table("valid_events.json")["cases"]


def _invalid_event(case: dict[str, Any]) -> object:
    if "event" in case:
        return case["event"]
    event = copy.deepcopy(INVALID["base"])
    for name in case.get("unset", []):
        del event[name]
    event.update(case.get("set", {}))
    return event


@pytest.mark.parametrize("case", INVALID["cases"], ids=lambda c: c["name"])
def test_validate_rejects(case: dict[str, Any]) -> None:
    with pytest.raises(CloudEventError) as info:
        validate(_invalid_event(case))
    assert info.value.status == case["status"]
    assert case["error"] in info.value.detail


@pytest.mark.parametrize("case", INVALID["cases"], ids=lambda c: c["name"])
def test_decode_rejects_the_same_events(case: dict[str, Any]) -> None:
    with pytest.raises(CloudEventError) as info:
        decode(orjson.dumps(_invalid_event(case)))
    assert case["error"] in info.value.detail


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_validate_accepts_and_returns_the_event_unchanged(case: dict[str, Any]) -> None:
    original = copy.deepcopy(case["event"])
    assert validate(case["event"]) is case["event"]
    assert case["event"] == original


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_encode_decode_round_trip(case: dict[str, Any]) -> None:
    assert decode(encode(case["event"])) == case["event"]


def test_null_attributes_count_as_absent_and_are_dropped() -> None:
    event = {
        "specversion": "1.0",
        "id": "1",
        "source": "/s",
        "type": "t",
        "subject": None,
        "time": None,
        "unsetextension": None,
        "data": None,
    }
    result = validate(event)
    assert result == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": None}
    assert "subject" in event, "the caller's dict is not modified"


def test_size_limit_uses_serialized_size() -> None:
    event = new_event(type="t", source="/s", data={"blob": "x" * 2000})
    size = len(encode(event))
    assert validate(event, max_size=size) is event
    with pytest.raises(CloudEventError) as info:
        validate(event, max_size=size - 1)
    assert info.value.status == 413
    assert f"{size} bytes" in info.value.detail


def test_size_limit_prefers_the_known_body_length() -> None:
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    with pytest.raises(CloudEventError) as info:
        validate(event, max_size=100, size=101)
    assert info.value.status == 413


def test_huge_payload_is_rejected_before_parsing() -> None:
    body = b'{"specversion":"1.0","data":"' + b"x" * DEFAULT_MAX_EVENT_SIZE + b'"'  # not even JSON
    with pytest.raises(CloudEventError) as info:
        decode(body)
    assert info.value.status == 413


def test_data_that_is_not_json_is_rejected() -> None:
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": {1, 2}}
    with pytest.raises(CloudEventError, match="cannot be serialized as JSON"):
        validate(event)


def test_encode_rejects_values_json_cannot_hold() -> None:
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    assert orjson.loads(encode(event)) == event
    for data in ({1, 2}, b"raw", 2**64):
        with pytest.raises(CloudEventError, match="cannot be serialized as JSON") as info:
            encode({**event, "data": data})
        assert info.value.status == 400


def _nested(depth: int) -> Any:
    """``depth`` levels of objects and arrays, alternating, around a scalar."""
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


BASE = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}


def test_data_may_nest_exactly_to_the_depth_limit() -> None:
    event = {**BASE, "data": _nested(MAX_DATA_DEPTH)}
    assert validate(event) is event
    assert decode(encode(event)) == event
    with pytest.raises(CloudEventError, match=f"more than {MAX_DATA_DEPTH} levels") as info:
        decode(encode({**BASE, "data": _nested(MAX_DATA_DEPTH + 1)}))
    assert info.value.status == 400


def test_depth_counts_the_deepest_branch_and_tuples() -> None:
    wide = {"flat": list(range(1000)), "deep": _nested(MAX_DATA_DEPTH - 1)}
    assert validate({**BASE, "data": wide})
    # 300 levels: deeper than the JSON serializer goes, so the depth check must come first
    for data in ({**wide, "x": _nested(MAX_DATA_DEPTH)}, (_nested(300),)):
        with pytest.raises(CloudEventError, match="levels deep"):
            validate({**BASE, "data": data})


def test_extension_attributes_are_capped() -> None:
    many = {f"ext{i}": "v" for i in range(MAX_EXTENSIONS)}
    assert validate({**BASE, **many})
    with pytest.raises(CloudEventError, match=f"more than {MAX_EXTENSIONS} extension") as info:
        validate({**BASE, **many, "onemore": 1})
    assert info.value.status == 400


def test_attributes_must_fit_in_binary_mode_headers() -> None:
    # "ce-" + name + ": " + value + CRLF per attribute, the value percent-encoded
    fixed = sum(len(name) + 7 + len(value) for name, value in BASE.items())
    room = MAX_HEADER_BYTES - fixed - len("big") - 7
    assert validate({**BASE, "big": "x" * room})
    with pytest.raises(CloudEventError, match="binary-mode headers") as info:
        validate({**BASE, "big": "x" * (room + 1)})
    assert info.value.status == 400
    # measured percent-encoded: each é takes six bytes on the wire
    assert validate({**BASE, "big": "\u00e9" * (room // 6)})
    with pytest.raises(CloudEventError, match="binary-mode headers"):
        validate({**BASE, "big": "\u00e9" * (room // 6 + 1)})
    # data is the body, not a header
    assert validate({**BASE, "data": "x" * MAX_HEADER_BYTES, "datacontenttype": "text/plain"})


@pytest.mark.parametrize("name", ["id", "source", "type"])
def test_identifying_attributes_are_capped_in_bytes(name: str) -> None:
    assert validate({**BASE, name: "x" * MAX_IDENTITY_BYTES})
    assert validate({**BASE, name: "\u00e9" * (MAX_IDENTITY_BYTES // 2)})
    for value in ("x" * (MAX_IDENTITY_BYTES + 1), "\u00e9" * (MAX_IDENTITY_BYTES // 2) + "x"):
        with pytest.raises(CloudEventError, match=f"attribute '{name}' takes 1025 bytes") as info:
            validate({**BASE, name: value})
        assert info.value.status == 400


def test_details_quote_long_names_clipped() -> None:
    name = "x" * 10_000
    with pytest.raises(CloudEventError) as info:
        validate({**BASE, name: 1.5})
    assert len(info.value.detail) < 200


def test_parse_json() -> None:
    assert parse_json(b'{"a": [1, "b"]}') == {"a": [1, "b"]}
    for bad in (b"", b"{", b"\xff", b"[1,]", b"NaN"):
        with pytest.raises(CloudEventError, match="malformed JSON") as info:
            parse_json(bad)
        assert info.value.status == 400


def test_new_event_defaults() -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    event = new_event(type="com.example.tick", source="/timer/t1", data={"n": 1})
    assert uuid.UUID(event["id"]).version == 4
    assert event["specversion"] == "1.0"
    assert event["datacontenttype"] == "application/json"
    assert event["data"] == {"n": 1}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["time"])
    stamp = datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= stamp <= datetime.now(UTC) + timedelta(seconds=1)
    assert "subject" not in event
    assert new_event(type="t", source="/s")["id"] != event["id"]


def test_new_event_with_everything() -> None:
    moment = datetime(2024, 2, 29, 1, 2, 3, 456000, tzinfo=timezone(timedelta(hours=2)))
    event = new_event(
        type="t",
        source="/s",
        data="<a/>",
        subject="sub",
        id="fixed",
        time=moment,
        datacontenttype="application/xml",
        partitionkey="k",
        attempt=3,
    )
    assert event == {
        "specversion": "1.0",
        "id": "fixed",
        "source": "/s",
        "type": "t",
        "time": "2024-02-28T23:02:03.456000Z",
        "subject": "sub",
        "datacontenttype": "application/xml",
        "partitionkey": "k",
        "attempt": 3,
        "data": "<a/>",
    }
    assert new_event(type="t", source="/s", time="2018-04-05T17:31:00Z")["time"] == (
        "2018-04-05T17:31:00Z"
    )


def test_new_event_bytes_go_to_data_base64() -> None:
    event = new_event(type="t", source="/s", data=b"\x00\xff")
    assert event["data_base64"] == "AP8="
    assert "data" not in event
    assert "datacontenttype" not in event


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"type": "", "source": "/s"}, "'type' must be a non-empty string"),
        ({"type": "t", "source": "/s", "Bad": 1}, "extension attribute name 'Bad'"),
        ({"type": "t", "source": "/s", "time": "now"}, "'time' must be an RFC 3339"),
        ({"type": "t", "source": "/s", "data": "x" * DEFAULT_MAX_EVENT_SIZE}, "byte limit"),
    ],
)
def test_new_event_validates(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(CloudEventError, match=re.escape(error)):
        new_event(**kwargs)


def test_format_time() -> None:
    assert format_time(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2020-01-02T03:04:05.000000Z"
    assert format_time(datetime(2020, 1, 2, 3, 4, 5)) == "2020-01-02T03:04:05.000000Z"


def test_event_key_is_stable_and_header_safe() -> None:
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    key = event_key(event)
    assert key == event_key({**event, "type": "other", "data": 5})
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert key != event_key({**event, "id": "2"})
    # The separator keeps (source, id) pairs that concatenate alike apart.
    assert event_key({**event, "source": "/s1", "id": "2"}) != event_key(
        {**event, "source": "/s", "id": "12"}
    )
    odd = event_key({**event, "source": "/\u00e9 x\r\n", "id": "\ud800"})
    assert re.fullmatch(r"[0-9a-f]{32}", odd)


_NEEDS_PERCENT = re.compile(r'[^\x21-\x7e]|["%]')
"""The binding's rule for a header value: anything but printable ASCII, a space, ``"`` and ``%``
are percent-encoded."""


@given(st.text(max_size=40) | st.text(alphabet=st.characters(max_codepoint=0x80), max_size=40))
def test_a_header_value_is_percent_encoded_exactly_where_the_binding_says(text: str) -> None:
    encoded = header_value(text, percent=True)
    if _NEEDS_PERCENT.search(text) is None:
        assert encoded is text
    else:
        assert encoded != text
        assert re.fullmatch(r"[\x21\x23-\x7e]*", encoded)  # printable ASCII, no space or "
    assert decode_header("ce-id", encoded) == text
    assert header_value(text, percent=False) is text
