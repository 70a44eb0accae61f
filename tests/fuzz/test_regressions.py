"""Plain regression tests for what the fuzz tests found, one per defect, each the smallest
example hypothesis reported (the defect's fix is named in each test)."""

from __future__ import annotations

import pytest

from eventbus._errors import CloudEventError
from eventbus.cloudevents import from_http, parse_http, to_http

STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BASE = b'{"specversion":"1.0","id":"fuzz-1","source":"tests/fuzz","type":"com.example.fuzz"'


def _parse(extra: str) -> list[object]:
    return parse_http(STRUCTURED, BASE + extra.encode() + b"}").events


def test_non_ascii_datacontenttype_is_refused() -> None:
    # was accepted, then written raw as the Content-Type header of every binary delivery
    with pytest.raises(CloudEventError, match="'datacontenttype' must be a media type"):
        _parse(',"datacontenttype":"a/b; x=é"')


@pytest.mark.parametrize("charset", ["nope", "base64", "rot13", ""])
def test_a_charset_eventbus_cannot_use_is_refused(charset: str) -> None:
    # was accepted, then the binary delivery could not encode the data (or eventbus's own
    # reader could not decode it): dead-lettered as "cannot build the request"
    with pytest.raises(CloudEventError, match="unknown charset"):
        _parse(f',"datacontenttype":"text/plain; charset={charset}","data":null')


def test_text_data_its_charset_cannot_encode_is_refused() -> None:
    with pytest.raises(CloudEventError, match="cannot be encoded as ascii"):
        _parse(',"datacontenttype":"text/plain; charset=ascii","data":"€"')


def test_text_data_in_its_charset_round_trips_in_binary_mode() -> None:
    [event] = _parse(',"datacontenttype":"text/plain; charset=latin-1","data":"café"')
    assert isinstance(event, dict)
    headers, body = to_http(event)
    assert body == "café".encode("latin-1")
    assert from_http(headers, body) == [event]
