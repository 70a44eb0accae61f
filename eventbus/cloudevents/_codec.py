"""Binary content mode, shared by the HTTP, Kafka and NATS bindings in ``_bindings``.

In binary mode the attributes travel as protocol headers and the payload as the raw message
body. This module maps between the two halves and the JSON form of an event: header values back
to attribute strings (undoing the percent-encoding the HTTP and NATS bindings require; writing
them is ``_event.header_value``, as validation measures the headers an event will need), and
the body to and from ``data`` / ``data_base64`` according to the content type.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode, b64encode
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from eventbus._errors import CloudEventError
from eventbus.cloudevents._event import (
    charset_of,
    check_size,
    is_json,
    is_text,
    json_body,
    json_bytes,
    load_json,
    media_type,
    validate,
    without_charset,
)

_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_DATA_ATTRIBUTES = ("data", "data_base64")


def decode_header(name: str, value: str) -> str:
    """Undo a header value's quoted-string form, then one round of percent-decoding.

    Raises :class:`CloudEventError` (400) when the percent-escapes are not valid UTF-8. A ``%``
    not followed by two hex digits is kept literally, as senders of older spec versions did not
    escape it.
    """
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    if "%" not in value:
        return value
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CloudEventError(f"header {name!r} is not percent-encoded UTF-8: {exc}") from exc


def _attach_data(event: dict[str, Any], content_type: str | None, body: bytes) -> None:
    if not content_type:
        # Some senders (the Python SDK among them) omit the type of a JSON body; anything that
        # does not parse as JSON stays opaque bytes.
        try:
            event["data"] = load_json(body)
        except orjson.JSONDecodeError:
            event["data_base64"] = b64encode(body).decode("ascii")
        return
    media = media_type(content_type)
    if is_json(media):
        try:
            event["data"], event["datacontenttype"] = json_body(body, content_type)
        except orjson.JSONDecodeError as exc:
            raise CloudEventError(f"malformed JSON in the {content_type} body: {exc}") from exc
    elif is_text(media):
        charset = charset_of(content_type)
        try:
            event["data"] = body.decode(charset)
        except UnicodeError:
            # Bytes the type's charset does not read (Latin-1 text/csv without a charset, XML
            # whose prolog names its encoding): kept as they came, as an API gateway passes a
            # body (refused, an event structured mode carries as data_base64 could not cross
            # binary mode, eventbus's own targets included)
            event["data_base64"] = b64encode(body).decode("ascii")
    else:
        event["data_base64"] = b64encode(body).decode("ascii")


def _charset_or_none(content_type: str) -> str | None:
    try:
        return charset_of(content_type)
    except CloudEventError:  # an unknown one (an event an older release accepted)
        return None


def event_from_binary(
    attributes: dict[str, str],
    content_type: str | None,
    body: bytes | None,
    *,
    header_size: int,
    max_size: int,
) -> dict[str, Any]:
    """Assemble and validate an event from decoded binary-mode attributes and the raw body.

    ``content_type`` becomes ``datacontenttype`` and decides how the body is read: JSON types
    become ``data`` as a JSON value, textual types (``text/*``, XML) a string, anything else
    ``data_base64``. Without a content type, a body that parses as JSON is ``data`` and any
    other body ``data_base64``. An empty body means no data. ``header_size`` is the
    attributes' wire size, counted with the body against ``max_size``. Raises
    :class:`CloudEventError` as :func:`validate` does, or 400 for an unreadable body or a
    ``data`` / ``data_base64`` attribute among the headers.
    """
    size = header_size + (len(body) if body else 0)
    check_size(size, max_size)
    for name in _DATA_ATTRIBUTES:
        if name in attributes:
            raise CloudEventError(
                f"attribute {name!r} cannot travel as a header: in binary mode the data is the "
                "message body"
            )
    event: dict[str, Any] = dict(attributes)
    event.pop("datacontenttype", None)
    if content_type:
        event["datacontenttype"] = content_type
    if body:
        _attach_data(event, content_type, body)
    return validate(event, max_size=max_size, size=size)


def body_of(event: dict[str, Any]) -> tuple[str | None, bytes | None]:
    """The binary-mode content type and body of an event; ``(…, None)`` when it has no data.

    Without a ``datacontenttype``, JSON data is declared ``application/json`` (as the JSON
    format asks of re-serialized events) and binary data ``application/octet-stream`` (so no
    reader takes it for JSON). String data under a non-JSON type is encoded
    with the type's charset (UTF-8 by default). Raises :class:`CloudEventError` (400) when the
    data cannot be encoded.
    """
    content_type: str | None = event.get("datacontenttype")
    if "data_base64" in event:
        try:
            body = b64decode(event["data_base64"], validate=True)
        except binascii.Error as exc:
            raise CloudEventError(f"'data_base64' is not valid base64: {exc}") from exc
        return content_type or "application/octet-stream", body
    if "data" not in event:
        return content_type, None
    data = event["data"]
    if content_type is None:
        return "application/json", json_bytes(data)
    if is_json(media_type(content_type)):
        # written in UTF-8, whatever charset it came with (labelled UTF-16, say, a reader
        # that follows the label read other characters)
        if "charset" in content_type.lower() and _charset_or_none(content_type) != "utf-8":
            content_type = without_charset(content_type)
        return content_type, json_bytes(data)
    if isinstance(data, str):
        charset = charset_of(content_type)
        try:
            return content_type, data.encode(charset)
        except UnicodeError as exc:
            raise CloudEventError(f"data cannot be encoded as {charset}: {exc}") from exc
    return content_type, json_bytes(data)
