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


@pytest.mark.parametrize(
    "charset", ["nope", "base64", "rot13", "", "punycode", "idna", "utf-7", "unicode_escape"]
)
def test_a_charset_eventbus_cannot_use_is_refused(charset: str) -> None:
    # was accepted, then the binary delivery could not encode the data (or eventbus's own
    # reader could not decode it): dead-lettered as "cannot build the request"
    # (punycode and idna take time quadratic in the text: 24 KB stalled the event loop for
    # seconds; idna also failed with a plain UnicodeError, a 500; utf-7 yields lone surrogates)
    with pytest.raises(CloudEventError, match="unknown or unsupported charset"):
        _parse(f',"datacontenttype":"text/plain; charset={charset}","data":"a..b"')


@pytest.mark.parametrize("charset", ["punycode", "idna", "utf-7"])
def test_a_text_body_in_a_charset_eventbus_cannot_use_is_refused(charset: str) -> None:
    # binary mode: the body was decoded with it (`+2AA-` in utf-7 is a lone surrogate)
    headers = {"Content-Type": f"text/plain; charset={charset}", "ce-specversion": "1.0"}
    headers |= {"ce-id": "1", "ce-source": "tests/fuzz", "ce-type": "t"}
    with pytest.raises(CloudEventError, match="unknown or unsupported charset"):
        parse_http(headers, b"+2AA-")


@pytest.mark.parametrize(
    ("charset", "codec"),
    [("UTF-8", "utf-8"), ("us-ascii", "ascii"), ("windows-1252", "cp1252"), ("utf-16", "utf-16")],
)
def test_common_charsets_are_read_by_their_names(charset: str, codec: str) -> None:
    text = "héllo" if codec != "ascii" else "hello"
    headers = {"Content-Type": f"text/plain; charset={charset}", "ce-specversion": "1.0"}
    headers |= {"ce-id": "1", "ce-source": "tests/fuzz", "ce-type": "t"}
    [event] = parse_http(headers, text.encode(codec)).events
    assert isinstance(event, dict) and event["data"] == text
    assert to_http(event)[1] == text.encode(codec)


def test_text_data_its_charset_cannot_encode_is_refused() -> None:
    with pytest.raises(CloudEventError, match="cannot be encoded as ascii"):
        _parse(',"datacontenttype":"text/plain; charset=ascii","data":"€"')


def test_text_data_in_its_charset_round_trips_in_binary_mode() -> None:
    [event] = _parse(',"datacontenttype":"text/plain; charset=latin-1","data":"café"')
    assert isinstance(event, dict)
    headers, body = to_http(event)
    assert body == "café".encode("latin-1")
    assert from_http(headers, body) == [event]


@pytest.mark.parametrize(
    "number",
    ["123456789012345678901234567890", "18446744073709551616", "-9223372036854775809", "9" * 300],
    ids=["30-digits", "2**64", "-2**63-1", "300-digits"],
)
def test_an_integer_beyond_64_bits_is_refused_not_changed(number: str) -> None:
    # orjson reads it as a float: it was accepted and delivered as 1.2345678901234568e+29
    with pytest.raises(CloudEventError, match="beyond 64 bits"):
        _parse(f',"data":{{"n":{number}}}')
    headers = {"Content-Type": "application/json", "ce-specversion": "1.0", "ce-id": "1"}
    headers |= {"ce-source": "tests/fuzz", "ce-type": "t"}
    with pytest.raises(CloudEventError, match="beyond 64 bits"):
        parse_http(headers, f"[{number}]".encode())


def test_integers_within_64_bits_and_long_digit_strings_are_kept() -> None:
    extra = ',"data":{"u":18446744073709551615,"i":-9223372036854775808,"s":"' + "1" * 30 + '"}'
    [event] = _parse(extra)
    assert isinstance(event, dict)
    assert event["data"] == {"u": 2**64 - 1, "i": -(2**63), "s": "1" * 30}
