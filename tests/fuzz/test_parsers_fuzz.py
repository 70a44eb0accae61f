"""Fuzzing the pure binding readers (``parse_http``, ``from_kafka``, ``from_nats``,
``from_mqtt``) with random bytes and near-valid events, many examples per kind of change since
they cost no I/O.

The property: a reader either returns valid events or raises CloudEventError with a 4xx status
(nothing else escapes), and every event it returns can be carried to the end: encoded for the
bus, wrapped by the trail and dead-letter views, its time read by the audit, and written in
HTTP binary mode within the header budget and read back by the same binding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus._errors import CloudEventError
from eventbus._rfc3339 import read_time
from eventbus.cloudevents import (
    MAX_HEADER_BYTES,
    MAX_IDENTITY_BYTES,
    encode,
    from_http,
    from_kafka,
    from_mqtt,
    from_nats,
    load_json,
    parse_http,
    to_http,
)
from tests.fuzz._inputs import CHANGES, FUZZ, binary_headers, changed_events, header_values

STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}


def check_carriable(event: dict[str, Any]) -> None:
    """What the pipeline does with an accepted event, none of which may fail."""
    encode(event)  # the bus
    orjson.dumps({"item": {"event": event, "payload": {"v": event}}})  # the admin views
    if "time" in event:
        # the audit writer's reading, the one validation used: the instant it accepted
        read_time(event["time"]).astimezone(UTC)
    # the audit indexes them (source with id): each within what an index entry holds
    for name in ("id", "source", "type"):
        assert len(event[name].encode("utf-8", "surrogatepass")) <= MAX_IDENTITY_BYTES
    headers, body = to_http(event)
    assert all(value.isascii() for value in headers.values()), headers
    lines = sum(len(name) + len(value) + 4 for name, value in headers.items())
    assert lines <= MAX_HEADER_BYTES + len("Content-Type") + 4 + 200, lines
    [read_back] = from_http(headers, body)
    assert read_back["id"] == event["id"]


def read_or_refuse(read: Callable[[], Any]) -> list[dict[str, Any]]:
    """The events ``read`` returns, each checked; [] when it refuses with a 4xx."""
    try:
        result = read()
    except CloudEventError as exc:
        assert 400 <= exc.status < 500, exc
        assert exc.detail
        return []
    events = result if isinstance(result, list) else [result]
    for event in events:
        if not isinstance(event, CloudEventError):
            check_carriable(event)
    return events


def _json(value: Any) -> bytes:
    # json, not orjson: it writes what orjson refuses to (integers past 64 bits, NaN, 300
    # levels), which is the point of fuzz input
    return json.dumps(value, ensure_ascii=False).encode()


@FUZZ
@pytest.mark.parametrize("change", CHANGES)
@given(data=st.data())
def test_structured_and_batch_readers(change: str, data: st.DataObject) -> None:
    event = data.draw(changed_events(change))
    read_or_refuse(lambda: parse_http(STRUCTURED, _json(event)).events)
    read_or_refuse(lambda: parse_http(BATCH, _json([event, event])).events)
    read_or_refuse(lambda: from_nats(None, _json(event)))
    read_or_refuse(lambda: from_kafka([], None, _json(event)))


@FUZZ
@given(body=st.binary(max_size=2_000), media=st.sampled_from([STRUCTURED, BATCH]))
def test_readers_of_random_bytes(body: bytes, media: dict[str, str]) -> None:
    read_or_refuse(lambda: parse_http(media, body).events)
    read_or_refuse(lambda: from_nats(None, body))
    read_or_refuse(lambda: from_kafka([], None, body))
    read_or_refuse(lambda: from_mqtt(None, [], body))


@FUZZ
@given(headers=binary_headers(), body=st.binary(max_size=500))
def test_binary_mode_readers(headers: dict[str, str], body: bytes) -> None:
    # HTTP servers hand header bytes over as Latin-1: what the ingest route passes on
    as_served = {k: v.encode().decode("latin-1") for k, v in headers.items()}
    read_or_refuse(lambda: parse_http(as_served, body).events)
    read_or_refuse(lambda: from_nats(headers, body))
    kafka = [(name.replace("ce-", "ce_", 1), value.encode()) for name, value in headers.items()]
    read_or_refuse(lambda: from_kafka(kafka, None, body))
    # MQTT 5: the attributes as user properties, named without a prefix, repeats possible
    user = [(name.removeprefix("ce-"), value) for name, value in headers.items()]
    content_type = headers.get("content-type")
    read_or_refuse(lambda: from_mqtt(content_type, user, body))
    read_or_refuse(lambda: from_mqtt(content_type, user + user[:1], body))


@FUZZ
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_x", "content-type"]
            )
            | header_values,
            st.binary(max_size=40),
        ),
        max_size=8,
    ),
    key=st.none() | st.binary(max_size=20),
    value=st.none() | st.binary(max_size=300),
)
def test_kafka_reader_of_random_records(
    headers: list[tuple[str, bytes]], key: bytes | None, value: bytes | None
) -> None:
    read_or_refuse(lambda: from_kafka(headers, key, value))


# Integers of any size (around the 64-bit edges most), digit strings, floats, in nested values.
_EDGES = [2**63, 2**64, -(2**63), -(2**63) - 1, 2**64 - 1]
_NUMBERS = st.integers() | st.sampled_from(_EDGES).flatmap(
    lambda edge: st.integers(edge - 2, edge + 2)
)
_JSON = st.recursive(
    _NUMBERS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet="0123456789-.e ")
    | st.booleans()
    | st.none(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


def _has_long_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, list):
        return any(_has_long_integer(item) for item in value)
    if isinstance(value, dict):
        return any(_has_long_integer(item) for item in value.values())
    return False


@FUZZ
@given(value=_JSON, spaced=st.booleans())
def test_json_reader_refuses_exactly_the_integers_beyond_64_bits(value: Any, spaced: bool) -> None:
    # What orjson would turn into a float is refused; everything else reads as the standard
    # parser reads it (the check looks for long digit runs in the text, strings included).
    body = json.dumps(value, separators=(", ", ": ") if spaced else (",", ":")).encode()
    if _has_long_integer(value):
        with pytest.raises(CloudEventError, match="beyond 64 bits"):
            load_json(body)
    else:
        assert load_json(body) == json.loads(body)
