"""The CloudEvent itself: validation, JSON event format, construction and the dedup key.

Every event enters the pipeline through :func:`validate` (directly, or via a protocol binding in
``_bindings``), so the rule engine, the bus and the targets only ever see dicts that follow
CloudEvents 1.0 in its JSON form. Validation is a hand-written pass over the attributes rather
than a schema model because it runs once per ingested event on the hot path.

Beyond the spec, validation refuses what eventbus could accept but not carry to the end: a
``time`` whose instant in UTC falls outside years 1-9999 (Python and the audit trail cannot
hold it), ``id``, ``source`` or ``type`` over :data:`MAX_IDENTITY_BYTES` (the audit trail indexes
them), ``data`` nested deeper than :data:`MAX_DATA_DEPTH` (the JSON views that wrap an event
must stay serializable), more than :data:`MAX_EXTENSIONS` extension attributes, and attributes
whose binary-mode headers exceed :data:`MAX_HEADER_BYTES` (HTTP servers refuse such requests, so
the event could never be delivered in binary mode).
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import hashlib
import json
import re
import uuid
from base64 import b64encode
from datetime import UTC, datetime
from typing import Any, NoReturn, cast
from urllib.parse import quote

import orjson

from eventbus._errors import CloudEventError
from eventbus._rfc3339 import read_time

DEFAULT_MAX_EVENT_SIZE = 256 * 1024
SPEC_VERSION = "1.0"

REQUIRED_ATTRIBUTES = ("id", "source", "specversion", "type")

MAX_DATA_DEPTH = 64
"""Levels of objects and arrays ``data`` may nest (``{"a": [1]}`` is two). The JSON serializer
stops at 254 levels, and the audit trail and dead-letter views wrap an event a few levels
deeper; 64 leaves room for that and for transform templates, and no real payload needs more."""
MAX_STORED_DEPTH = 200
"""The nesting a ``stored`` event's ``data`` may have: one accepted before MAX_DATA_DEPTH was
a rule is delivered as it was accepted, within what the serializer and the audit's wrapping
still take."""
MAX_EXTENSIONS = 50
"""Extension attributes per event: with the context attributes and a delivery's own headers a
binary-mode request stays under the 100 header fields that Apache httpd, for one, accepts."""
MAX_IDENTITY_BYTES = 1024
"""``id``, ``source`` and ``type`` may take this many bytes (UTF-8) each. They identify and
index the event in the audit trail, whose indexes hold at most about 2.7 KB per entry: a longer
``source`` and ``id`` made its row unwritable. Far above what identifiers need (EventBridge
allows 256 characters of source and 128 of detail type)."""
MAX_HEADER_BYTES = 8192
"""The attributes written as binary-mode headers (``ce-name: value``, percent-encoded, one line
each) may take this many bytes: the size of the one header line (or the whole header block)
that common HTTP servers accept."""

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

_NOT_HEADERS = frozenset({"data", "data_base64"})
# Every header character takes at most 12 once percent-encoded (4 UTF-8 bytes, 3 characters
# each), so attributes this short need no exact count.
_HEADER_EXPANSION = 12
# The bytes a header line adds to its attribute's name and value: "ce-", ": " and CRLF.
_HEADER_LINE = 7

_EXTENSION_NAME = re.compile(r"[a-z0-9]+\Z", re.ASCII)
# Control characters are forbidden in every CloudEvents string; rejecting them here also keeps
# CR/LF out of the protocol headers that binary mode writes.
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:([0-9]{2})(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:([0-9]{2}))\Z",
    re.ASCII,
)
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S*\Z")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}\s*(?:;.*)?\Z", re.ASCII | re.DOTALL)
# Everything printable in ASCII except the three characters the bindings single out: space is
# outside the range already, and '"' and '%' must be escaped too.
_PERCENT_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def _plain(text: str) -> bool:
    """True when ``text`` needs no percent-encoding: printable ASCII without space, ``"`` or
    ``%`` (the characters 0x21-0x7E but those two). Four C-level scans (``isascii`` is a
    flag), about a third of the cost of a regular expression search on an attribute's few
    dozen characters."""
    return (
        text.isascii()
        and text.isprintable()
        and " " not in text
        and '"' not in text
        and "%" not in text
    )


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def attribute_text(text: str) -> str:
    """``text`` as a valid string attribute: each control character (which CloudEvents
    disallows in attributes: U+0000-U+001F, U+007F-U+009F) replaced by a space. For values
    eventbus writes from text it did not choose, such as a function's error answer."""
    return text if text.isprintable() else _FORBIDDEN_CHARS.sub(" ", text)


def as_attribute(text: str | None) -> str | None:
    """``text`` when it is a valid string attribute as it is (non-empty, no control
    character), else None: for an optional attribute taken from input (a key, a routing key, a
    host name) that is left out rather than fail the event."""
    return text if text and attribute_text(text) == text else None


def _string(name: str, value: object) -> str:
    if type(value) is not str:
        raise CloudEventError(
            f"attribute {_clip(name)} must be a string, got {type(value).__name__}"
        )
    # isprintable() is a cheap C pass that clears almost every string; only the rest (with
    # non-ASCII spaces, say) need the exact search.
    if not value.isprintable() and _FORBIDDEN_CHARS.search(value) is not None:
        raise CloudEventError(f"attribute {_clip(name)} contains a control character")
    return value


def _non_empty(name: str, value: object) -> None:
    if not _string(name, value):
        raise CloudEventError(f"attribute {name!r} must be a non-empty string")


def _identifying(name: str, value: object) -> None:
    _non_empty(name, value)
    text = cast(str, value)
    # 4 bytes per character at most: a short one needs no encoding to be measured
    size = len(text) * 4
    if size > MAX_IDENTITY_BYTES:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_IDENTITY_BYTES:
        raise CloudEventError(
            f"attribute {name!r} takes {size} bytes, more than the {MAX_IDENTITY_BYTES}-byte limit"
        )


def _specversion(name: str, value: object) -> None:
    if _string(name, value) != SPEC_VERSION:
        raise CloudEventError(
            f"attribute 'specversion' must be {SPEC_VERSION!r}, got {_clip(value)}"
        )


def _time(name: str, value: object) -> None:
    text = _string(name, value)
    match = _TIMESTAMP.match(text)
    # The offset's minutes are checked here: the C parser below would read "+05:75" as 6:15.
    if match is None or (match[2] is not None and match[2] >= "60"):
        _bad_time(value)
    try:
        # Python, and so the audit trail, holds years 1-9999 only: "0001-01-01T00:00:00+01:00"
        # parses, but the instant it names in UTC does not.
        read_time(text).astimezone(UTC)
    except ValueError:
        _bad_time(value)
    except OverflowError:
        raise CloudEventError(
            f"attribute 'time' must fall within years 0001-9999 in UTC, got {_clip(value)}"
        ) from None


def _bad_time(value: object) -> NoReturn:
    raise CloudEventError(f"attribute 'time' must be an RFC 3339 timestamp, got {_clip(value)}")


def _dataschema(name: str, value: object) -> None:
    if _ABSOLUTE_URI.match(_string(name, value)) is None:
        raise CloudEventError(f"attribute 'dataschema' must be an absolute URI, got {_clip(value)}")


# Content types seen valid: a service sees a handful, checked with a set lookup instead of
# the regular expression (bounded: once full, the rest are checked every time).
_VALID_MEDIA_TYPES: set[str] = set()
_MAX_REMEMBERED_MEDIA_TYPES = 256


def _datacontenttype(name: str, value: object) -> None:
    text = _string(name, value)
    if text in _VALID_MEDIA_TYPES:
        return
    # ASCII as media types are (RFC 2045): binary mode sends it as the Content-Type header.
    if not text.isascii() or _MEDIA_TYPE.match(text) is None:
        raise CloudEventError(
            f"attribute 'datacontenttype' must be a media type like 'application/json', "
            f"got {_clip(value)}"
        )
    if len(_VALID_MEDIA_TYPES) < _MAX_REMEMBERED_MEDIA_TYPES:
        _VALID_MEDIA_TYPES.add(text)


def media_type(content_type: str) -> str:
    """The bare, lowercased media type of a Content-Type value (parameters dropped)."""
    return content_type.partition(";")[0].strip().lower()


def is_json(media: str) -> bool:
    """True for ``*/json`` and ``*/*+json``: the JSON format's test for JSON data."""
    return media.endswith("/json") or media.endswith("+json")


def is_text(media: str) -> bool:
    """True for ``text/*`` and XML: binary mode reads such a body as text in its charset."""
    return media.startswith("text/") or media.endswith("/xml") or media.endswith("+xml")


def without_charset(content_type: str) -> str:
    """``content_type`` without its ``charset`` parameter (the other parameters kept)."""
    media, *params = content_type.split(";")
    kept = [p for p in params if p.partition("=")[0].strip().lower() != "charset"]
    return ";".join([media, *kept])


# The charsets text data may be in: Python's codecs for these take time in proportion to the
# text. Others are refused: punycode and idna (names, not text) take time quadratic in it (24 KB
# stalled the event loop for seconds), utf-7 and the escape codecs yield lone surrogates, and
# base64 or rot13 are not charsets at all.
TEXT_CHARSETS = frozenset(
    {
        "ascii", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
        "utf-32-le", "utf-32-be", "koi8-r", "koi8-u", "mac-roman", "shift_jis", "cp932",
        "euc_jp", "iso2022_jp", "gb2312", "gbk", "gb18030", "big5", "cp950", "euc_kr", "cp949",
        *(f"iso8859-{n}" for n in range(1, 17) if n != 12),
        *(f"cp{n}" for n in range(1250, 1259)),
    }
)  # fmt: skip


def charset_of(content_type: str) -> str:
    """The codec of a Content-Type value's ``charset`` parameter; UTF-8 when it has none.
    Raises CloudEventError (400) for a charset that is unknown or not in TEXT_CHARSETS."""
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"')
            break
    try:
        codec = codecs.lookup(charset).name
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        codec = ""
    if codec not in TEXT_CHARSETS:
        raise CloudEventError(f"unknown or unsupported charset {_clip(charset)}")
    return codec


def json_body(body: bytes, content_type: str) -> tuple[Any, str]:
    """A JSON body in the encoding its bytes show (a byte order mark, or the zero bytes of
    UTF-16 or UTF-32 around its first two characters, which are ASCII: RFC 4627, 3), else as
    UTF-8 when it is that, else in the charset ``content_type`` declares: its value, and
    ``content_type`` without a charset other than UTF-8, as eventbus writes JSON in UTF-8 (a
    UTF-8 body declared UTF-16 went out as UTF-8 bytes labelled UTF-16; a UTF-16 one was
    refused; one in UTF-16LE without a mark, zero bytes being valid UTF-8, was read as UTF-8
    and refused as malformed). Raises CloudEventError (400) for an unknown charset or a body
    in none of these, ``orjson.JSONDecodeError`` for malformed JSON."""
    charset = charset_of(content_type)
    shown = _json_encoding(body)
    if shown is None and charset == "utf-8":  # as eventbus writes it: the type as it came
        return load_json(body), content_type
    try:
        if shown is not None:
            body = body.decode(shown).encode()
        else:
            # UTF-8 whatever the label when it is that (RFC 8259: JSON between systems is
            # UTF-8, and many clients label it ISO-8859-1: read in that, "Zoë" became "ZoÃ«")
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                body = body.decode(charset).encode()
    except UnicodeError:
        raise CloudEventError(
            f"the body is neither UTF-8 nor {shown or charset} text"
            + ("" if shown else ", its declared charset")
        ) from None
    return load_json(body), without_charset(content_type)


_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16's, which it starts with
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _json_encoding(body: bytes) -> str | None:
    """The encoding a JSON text's first bytes show (a mark, or where its first two characters,
    ASCII, have zero bytes), None when they show none (UTF-8 or a one-byte charset: a raw zero
    byte is never in a JSON text)."""
    for mark, name in _MARKS:
        if body.startswith(mark):
            return name
    if len(body) >= 4 and body[:3] == b"\0\0\0":
        return "utf-32-be"
    if len(body) >= 4 and body[1:4] == b"\0\0\0":
        return "utf-32-le"
    if len(body) >= 2 and body[0] == 0:
        return "utf-16-be"
    if len(body) >= 2 and body[1] == 0:
        return "utf-16-le"
    return None


def _check_charset(content_type: str, data: object) -> None:
    # Binary mode writes string data in this charset (and reads text bodies with it): an
    # event eventbus could not encode would be accepted but never delivered.
    try:
        charset = charset_of(content_type)
    except CloudEventError as exc:
        raise CloudEventError(f"attribute 'datacontenttype' names an {exc.detail}") from None
    text = data if type(data) is str and not is_json(media_type(content_type)) else ""
    try:
        text.encode(charset)
    except UnicodeEncodeError as exc:
        raise CloudEventError(
            f"'data' cannot be encoded as {charset}, the charset of its datacontenttype: "
            f"{exc.reason} at position {exc.start}"
        ) from None


def _data_base64(value: object) -> None:
    if type(value) is not str:
        raise CloudEventError(f"'data_base64' must be a base64 string, got {type(value).__name__}")
    if not value.isascii():
        raise CloudEventError("'data_base64' is not valid base64: it holds non-ASCII characters")
    try:
        binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error as exc:
        raise CloudEventError(f"'data_base64' is not valid base64: {exc}") from exc


def _check_json_bytes(content_type: str, encoded: str) -> None:
    """Bytes declared JSON must be JSON text: sent as they are in binary mode, they are the
    body of that type, which a reader (this service's own bindings among them) parses; binary
    mode's ingest refuses such a body too."""
    try:
        orjson.loads(binascii.a2b_base64(encoded))
    except orjson.JSONDecodeError as exc:
        raise CloudEventError(
            f"'data_base64' under datacontenttype {_clip(content_type)} must hold JSON text: "
            f"{exc}; declare the bytes' own type (application/octet-stream)"
        ) from None


_CHECKS = {
    "id": _identifying,
    "source": _identifying,
    "type": _identifying,
    "subject": _non_empty,
    "specversion": _specversion,
    "time": _time,
    "dataschema": _dataschema,
    "datacontenttype": _datacontenttype,
}


def _extension(name: str, value: object) -> None:
    if _EXTENSION_NAME.match(name) is None:
        raise CloudEventError(
            f"extension attribute name {_clip(name)} is invalid: "
            "use only lowercase letters a-z and digits 0-9"
        )
    if isinstance(value, str):
        _string(name, value)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not _INT32_MIN <= value <= _INT32_MAX:
            raise CloudEventError(f"extension attribute {_clip(name)} is outside the 32-bit range")
    else:
        raise CloudEventError(
            f"extension attribute {_clip(name)} has unsupported type {type(value).__name__}: "
            "use a string, an integer or a boolean"
        )


def header_value(value: str | int | bool, *, percent: bool) -> str:
    """The canonical string of an attribute value, percent-encoded when ``percent`` is set."""
    if type(value) is str:  # nearly every attribute: no conversion to try
        text = value
    elif value is True or value is False:
        return "true" if value else "false"
    elif type(value) is int:
        return str(value)
    else:
        text = str(value)
    if percent and not _plain(text):
        return quote(text, safe=_PERCENT_SAFE)
    return text


def _check_headers(event: dict[str, Any]) -> None:
    size = sum(
        len(name) + _HEADER_LINE + len(header_value(value, percent=True))
        for name, value in event.items()
        if name not in _NOT_HEADERS
    )
    if size > MAX_HEADER_BYTES:
        raise CloudEventError(
            f"the attributes take {size} bytes as binary-mode headers, more than the "
            f"{MAX_HEADER_BYTES}-byte limit: carry large values in 'data'"
        )


def _check_depth(data: object, limit: int = MAX_DATA_DEPTH) -> None:
    # Depth first with a budget, stopping at the first branch too deep: a typical event's
    # few containers cost a call each (the level-by-level walk built a list per level, most of
    # a small event's validation). Exact types, not isinstance: parsed JSON holds no
    # subclasses, and this is the hot path. Recursion stays within ``limit`` frames.
    kind = type(data)
    if (kind is dict or kind is list or kind is tuple) and _too_deep(data, limit):
        raise CloudEventError(f"'data' nests objects and arrays more than {limit} levels deep")


def _too_deep(container: Any, budget: int) -> bool:
    """True when ``container`` holds containers more than ``budget`` levels deep (itself
    counting as one)."""
    if budget == 0:
        return True
    budget -= 1
    for child in container.values() if type(container) is dict else container:
        kind = type(child)
        if (kind is dict or kind is list or kind is tuple) and _too_deep(child, budget):
            return True
    return False


def validate(
    event: object,
    *,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
    size: int | None = None,
    stored: bool = False,
) -> dict[str, Any]:
    """Check that ``event`` is a CloudEvents 1.0 event in JSON form and return it.

    ``size`` is the event's encoded length when the caller already knows it (the request body);
    otherwise the event is serialized once to measure it. Attributes whose value is ``null``
    count as absent, as the JSON format requires: they are left out of the returned dict (a new
    dict, only in that case). ``data`` may be ``null``; it is the payload, not an attribute.

    Raises :class:`CloudEventError` naming the offending attribute: status 400 for a missing or
    malformed attribute, an unknown value type, both ``data`` and ``data_base64``, a ``time``
    outside years 1-9999 in UTC, ``data`` nested deeper than :data:`MAX_DATA_DEPTH`, more than
    :data:`MAX_EXTENSIONS` extensions or attributes over :data:`MAX_HEADER_BYTES` as headers;
    413 when the event is larger than ``max_size`` bytes. Data that is not a string under a
    ``datacontenttype`` that is not JSON is refused too; so is ``data_base64`` under a JSON
    ``datacontenttype`` whose bytes are not JSON text, and data its ``charset`` cannot encode.

    A ``stored`` event (one the bus holds) is checked only against what every release has
    refused: one accepted by an older release, before the rules on extensions, headers,
    charsets, non-string data and ``data_base64`` came, and with data nested up to
    :data:`MAX_STORED_DEPTH`, is delivered as it was accepted (such events waiting on the bus
    through an upgrade were set aside, never delivered). A target that cannot take it fails
    the delivery, which the audit and the dead letters show.
    """
    if type(event) is not dict:
        raise CloudEventError(f"an event must be a JSON object, got {type(event).__name__}")
    nulls = False
    extensions = 0
    header_chars = 0  # an upper bound of the header bytes, divided by _HEADER_EXPANSION
    for name, value in event.items():
        if value is None:
            nulls = nulls or name != "data"
            continue
        check = _CHECKS.get(name)
        if check is not None:
            check(name, value)
        elif name == "data":
            continue
        elif name == "data_base64":
            _data_base64(value)
            continue
        else:
            _extension(name, value)
            extensions += 1
            if extensions > MAX_EXTENSIONS and not stored:
                raise CloudEventError(
                    f"the event has more than {MAX_EXTENSIONS} extension attributes"
                )
        header_chars += len(name) + _HEADER_LINE + (len(value) if type(value) is str else 11)
    for name in REQUIRED_ATTRIBUTES:
        if event.get(name) is None:
            raise CloudEventError(f"missing required attribute {name!r}")
    if "data" in event and event.get("data_base64") is not None:
        raise CloudEventError("an event carries either 'data' or 'data_base64', not both")
    if nulls:
        event = {k: v for k, v in event.items() if v is not None or k == "data"}
    content_type = event.get("datacontenttype")
    if content_type is not None:
        data = event.get("data")
        if (
            data is not None
            and type(data) is not str
            and not stored
            and not is_json(media_type(content_type))
        ):
            # JSON format 3.1.1: such data is a string. Taken as it came, it was sent as its JSON
            # text under that type, or as bytes; read back, it was not what was published.
            raise CloudEventError(
                f"'data' under datacontenttype {_clip(content_type)} must be a string; "
                "carry bytes as 'data_base64'"
            )
        if ";" in content_type and not stored:
            _check_charset(content_type, data)
        encoded = event.get("data_base64")
        if encoded is not None and not stored and is_json(media_type(content_type)):
            _check_json_bytes(content_type, encoded)
    if header_chars * _HEADER_EXPANSION > MAX_HEADER_BYTES and not stored:
        _check_headers(event)
    _check_depth(event.get("data"), MAX_STORED_DEPTH if stored else MAX_DATA_DEPTH)
    if size is None:
        size = len(encode(event))
    check_size(size, max_size)
    return event


def parse_json(body: bytes) -> Any:
    """Parse JSON text with orjson; raises :class:`CloudEventError` (400) if it is malformed
    or holds an integer beyond 64 bits (see :func:`load_json`)."""
    try:
        return load_json(body)
    except orjson.JSONDecodeError as exc:
        raise CloudEventError(f"malformed JSON: {exc}") from exc


# Past int64 or uint64 if an integer: 20 digits in a row, or a minus and 19. Looked for in the
# body with its digits made "0" and every other byte but "-" made "." (a C translate and two
# substring searches: a sixth of a regular expression's time on an event, and it stays linear).
_DIGITS_AS_ZERO = bytes(
    byte if byte == ord("-") else ord("0") if ord("0") <= byte <= ord("9") else ord(".")
    for byte in range(256)
)
_LONG_RUN = b"0" * 20
_LONG_NEGATIVE_RUN = b"-" + b"0" * 19


def _long_integer(body: bytes) -> bool:
    shape = body.translate(_DIGITS_AS_ZERO)
    return _LONG_RUN in shape or _LONG_NEGATIVE_RUN in shape


def load_json(body: bytes) -> Any:
    """``orjson.loads``, refusing what it would change: it reads an integer beyond 64 bits as a
    float (``123456789012345678901234567890`` became ``1.2345678901234568e+29`` at the
    function). Raises ``orjson.JSONDecodeError`` for malformed JSON, :class:`CloudEventError`
    (400) for such an integer: a string carries it exactly."""
    value = orjson.loads(body)
    if _long_integer(body):  # a long run of digits: look closer
        # (unless nested deeper than the standard parser goes: then not checked)
        with contextlib.suppress(RecursionError):
            json.loads(body, parse_int=_within_64_bits)
    return value


def _within_64_bits(text: str) -> int:
    try:
        number = int(text)
    except ValueError:  # more digits than Python converts
        number = 2**64
    if not -(2**63) <= number < 2**64:
        raise CloudEventError(
            f"the integer {_clip(text)} is beyond 64 bits and would lose its value: send it "
            "as a string"
        )
    return number


def encode(event: dict[str, Any]) -> bytes:
    """Serialize an event in the JSON event format (structured mode).

    Raises :class:`CloudEventError` (400) if a value cannot be represented in JSON.
    """
    return json_bytes(event)


def json_bytes(value: Any) -> bytes:
    """Serialize any JSON value with orjson; raises :class:`CloudEventError` (400) if it is not."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise CloudEventError(f"value cannot be serialized as JSON: {exc}") from exc


def decode(payload: bytes, *, max_size: int = DEFAULT_MAX_EVENT_SIZE) -> dict[str, Any]:
    """Parse and validate one event in the JSON event format; raises as :func:`validate`.

    The size limit is checked before parsing, so an oversized payload costs no parse.
    """
    check_size(len(payload), max_size)
    return validate(parse_json(payload), max_size=max_size, size=len(payload))


def check_size(size: int, max_size: int) -> None:
    """Raise :class:`CloudEventError` (413) when ``size`` exceeds ``max_size``."""
    if size > max_size:
        raise CloudEventError(
            f"event is {size} bytes, more than the {max_size}-byte limit",
            status=413,
            title="CloudEvent too large",
        )


def event_key(event: dict[str, Any]) -> str:
    """A stable deduplication key for ``source`` + ``id``, the pair the spec makes unique.

    The key is 32 lowercase hex digits, so it is safe as a header value (``Nats-Msg-Id``) and
    as a database key whatever characters the source and id hold.
    """
    raw = f"{event['source']}\x1f{event['id']}".encode(errors="surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def format_time(moment: datetime) -> str:
    """Render ``moment`` as an RFC 3339 UTC timestamp ending in ``Z``; naive means UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_event(
    *,
    type: str,
    source: str,
    data: Any = None,
    subject: str | None = None,
    id: str | None = None,
    time: datetime | str | None = None,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
    **ext: Any,
) -> dict[str, Any]:
    """Build a validated event (at most ``max_size`` bytes): a uuid4 ``id`` and the current
    UTC ``time`` unless given.

    ``bytes`` data goes to ``data_base64``; any other non-None data goes to ``data`` and, unless
    ``datacontenttype`` is passed, is declared ``application/json``. ``ext`` holds extension
    attributes and may also set ``datacontenttype`` or ``dataschema``. Raises
    :class:`CloudEventError` as :func:`validate` does.
    """
    if time is None:
        time = datetime.now(UTC)
    event: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": str(uuid.uuid4()) if id is None else id,
        "source": source,
        "type": type,
        "time": format_time(time) if isinstance(time, datetime) else time,
    }
    if subject is not None:
        event["subject"] = subject
    event.update(ext)
    if isinstance(data, bytes):
        event["data_base64"] = b64encode(data).decode("ascii")
    elif data is not None:
        event.setdefault("datacontenttype", "application/json")
        event["data"] = data
    return validate(event, max_size=max_size)
