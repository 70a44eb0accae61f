"""CloudEvents protocol bindings: HTTP, Kafka and NATS messages to and from event dicts.

This is the edge of the pipeline: the ingest API, the Kafka and NATS sources and the bus
adapters read messages with ``from_*`` / ``parse_http`` and the targets write them with
``to_*``. Each binding has the same two content modes: *structured* (the JSON event format is
the whole body) and *binary* (attributes as headers, ``data`` as the raw body; see
``_codec``). HTTP adds the JSON batch format. Every reader validates what it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eventbus._errors import CloudEventError
from eventbus.cloudevents._codec import _DATA_ATTRIBUTES, body_of, decode_header, event_from_binary
from eventbus.cloudevents._event import (
    _EXTENSION_NAME,
    DEFAULT_MAX_EVENT_SIZE,
    as_attribute,
    check_size,
    decode,
    encode,
    header_value,
    json_bytes,
    media_type,
    parse_json,
    validate,
)

DEFAULT_MAX_BATCH_ENTRIES = 1000
"""Events one batch request may carry (the ``max_batch_entries`` setting)."""
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
_CLOUDEVENTS_MEDIA = "application/cloudevents"

_NOT_HEADERS = frozenset({"data", "data_base64", "datacontenttype"})
_NOT_NATS_HEADERS = frozenset({"data", "data_base64"})


@dataclass(frozen=True, slots=True)
class HttpParse:
    """What one HTTP request carried: one result per event, in request order.

    A result is the validated event or the :class:`CloudEventError` that rejected it; only a
    batch can hold errors, so one bad entry does not cost the others.
    """

    events: list[dict[str, Any] | CloudEventError]
    batch: bool


def _unsupported(media: str, *, batches: bool = True) -> CloudEventError:
    """``media``, a CloudEvents format this binding does not read; ``batches``: whether it
    reads the batch format (HTTP does; a Kafka record or a reply message carries one event,
    and "use the batch format" was the advice given for a batch)."""
    formats = f"{STRUCTURED_CONTENT_TYPE} or {BATCH_CONTENT_TYPE}" if batches else None
    return CloudEventError(
        f"unsupported event format {media!r}: use {formats or STRUCTURED_CONTENT_TYPE}"
        + ("" if batches else " (one event a message; a batch is not read here)"),
        status=415,
        title="Unsupported CloudEvent format",
    )


def _attribute_headers(
    event: dict[str, Any], prefix: str, skip: frozenset[str], *, percent: bool
) -> dict[str, str]:
    return {
        prefix + name: header_value(value, percent=percent)
        for name, value in event.items()
        if name not in skip
    }


def _from_ce_headers(
    lowered: dict[str, str],
    body: bytes,
    *,
    content_header_first: bool,
    max_size: int,
    ascii_only: bool,
) -> dict[str, Any]:
    """Binary mode with ``ce-`` headers, percent-encoded: HTTP and NATS share it.

    ``ascii_only`` refuses raw non-ASCII header values: HTTP servers hand those over decoded as
    Latin-1, so UTF-8 text would arrive garbled (``café`` as ``cafÃ©``).
    """
    if "ce-specversion" not in lowered:
        raise CloudEventError(
            "not a CloudEvent: expected Content-Type "
            f"{STRUCTURED_CONTENT_TYPE} or {BATCH_CONTENT_TYPE}, "
            "or binary mode with ce-* headers (ce-specversion is missing)"
        )
    attributes: dict[str, str] = {}
    header_size = 0
    for name, value in lowered.items():
        attribute = name.startswith("ce-")
        if ascii_only and (attribute or name == "content-type") and not value.isascii():
            raise CloudEventError(
                f"header {name[:40]!r} holds raw non-ASCII bytes: percent-encode its UTF-8 "
                "bytes (é as %C3%A9), as the CloudEvents HTTP binding requires"
            )
        if attribute:
            attributes[name[3:]] = decode_header(name, value)
            header_size += len(name) + len(value)
    content_header = lowered.get("content-type")
    declared = attributes.get("datacontenttype")
    content_type = (
        (content_header or declared) if content_header_first else (declared or content_header)
    )
    return event_from_binary(
        attributes, content_type, body, header_size=header_size, max_size=max_size
    )


def _batch(body: bytes, max_size: int, max_entries: int) -> list[dict[str, Any] | CloudEventError]:
    entries = parse_json(body)
    if type(entries) is not list:
        raise CloudEventError("a batch must be a JSON array of events")
    # Refused before any entry is validated: the answer lists every entry, so a request of
    # many tiny entries would cost far more to answer than to send.
    check_entries(len(entries), max_entries)
    results: list[dict[str, Any] | CloudEventError] = []
    for entry in entries:
        try:
            results.append(validate(entry, max_size=max_size))
        except CloudEventError as exc:
            results.append(exc)
    return results


def check_entries(count: int, max_entries: int) -> None:
    """Raise :class:`CloudEventError` (413) when a batch of ``count`` events is too many."""
    if count > max_entries:
        raise CloudEventError(
            f"the batch holds {count} events, more than the limit of {max_entries}",
            status=413,
            title="Batch too large",
        )


def parse_http(
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
    max_entries: int = DEFAULT_MAX_BATCH_ENTRIES,
) -> HttpParse:
    """Read the events of an HTTP request in any content mode, chosen by its Content-Type.

    ``application/cloudevents+json`` is one structured event, ``application/cloudevents-batch
    +json`` a batch, anything else binary mode (``ce-*`` headers, matched case-insensitively and
    percent-decoded; raw non-ASCII values are refused). Batch entries are validated one by one
    (each against ``max_size``) and a bad entry becomes a :class:`CloudEventError` in
    ``events``; bounding the whole body is the HTTP server's job. Raises
    :class:`CloudEventError` for a request that holds no usable event list: 400 (malformed
    JSON, no ``ce-specversion``, a batch that is not an array, an invalid single
    event), 413 (single event over ``max_size``, a batch of more than ``max_entries``) or 415
    (a CloudEvents format other than JSON).
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    media = media_type(lowered.get("content-type", ""))
    if media == STRUCTURED_CONTENT_TYPE:
        return HttpParse(events=[decode(body, max_size=max_size)], batch=False)
    if media == BATCH_CONTENT_TYPE:
        return HttpParse(events=_batch(body, max_size, max_entries), batch=True)
    if media.startswith(_CLOUDEVENTS_MEDIA):
        raise _unsupported(media)
    event = _from_ce_headers(
        lowered, body, content_header_first=True, max_size=max_size, ascii_only=True
    )
    return HttpParse(events=[event], batch=False)


def from_http(
    headers: Mapping[str, str], body: bytes, *, max_size: int = DEFAULT_MAX_EVENT_SIZE
) -> list[dict[str, Any]]:
    """Every event of an HTTP request, all valid, or an error for the first that is not.

    Raises :class:`CloudEventError` as :func:`parse_http` does, and for the first bad batch
    entry (its detail prefixed with the entry's index).
    """
    events: list[dict[str, Any]] = []
    for index, entry in enumerate(parse_http(headers, body, max_size=max_size).events):
        if isinstance(entry, CloudEventError):
            raise CloudEventError(
                f"batch entry {index}: {entry.detail}", status=entry.status, title=entry.title
            ) from entry
        events.append(entry)
    return events


def to_http(event: dict[str, Any], *, structured: bool = False) -> tuple[dict[str, str], bytes]:
    """Headers and body of an HTTP message carrying a valid event.

    Binary mode (the default) writes ``ce-*`` headers, percent-encoded as the binding requires,
    and the data as the body with ``Content-Type`` from ``datacontenttype`` (JSON data without
    one is declared ``application/json``; an event without data has an empty body). Structured
    mode writes the JSON event format. Raises :class:`CloudEventError` if the data cannot be
    encoded.
    """
    if structured:
        return {"Content-Type": STRUCTURED_CONTENT_TYPE}, encode(event)
    content_type, body = body_of(event)
    headers = _attribute_headers(event, "ce-", _NOT_HEADERS, percent=True)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers, body or b""


def to_http_batch(events: Iterable[dict[str, Any]]) -> tuple[dict[str, str], bytes]:
    """Headers and body of an HTTP message carrying valid events in the JSON batch format."""
    return {"Content-Type": BATCH_CONTENT_TYPE}, json_bytes(list(events))


def _kafka_text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CloudEventError(f"Kafka header {name!r} is not UTF-8: {exc}") from exc


def from_kafka(
    headers: Sequence[tuple[str, bytes | None]],
    key: bytes | None,
    value: bytes | None,
    *,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
) -> dict[str, Any]:
    """The valid event carried by a Kafka record (headers as aiokafka delivers them).

    A ``content-type`` starting with ``application/cloudevents`` means structured mode;
    otherwise ``ce_`` headers mean binary mode (a record with no value has no data); a record
    with neither is read as a structured event. A UTF-8 record key becomes the ``partitionkey``
    extension unless the event sets one, or could not stay valid with it. Raises
    :class:`CloudEventError`: 400 (invalid event, header that is not UTF-8 or repeated (names
    compared without case), structured record without value), 413, or 415 (a CloudEvents
    format other than JSON).
    """
    lowered: dict[str, str] = {}
    for name, raw in headers:
        name = name.lower()
        # a header without a value (Kafka allows it) is read as absent
        if raw is not None and (name.startswith("ce_") or name == "content-type"):
            if name in lowered:
                # as over HTTP: which of the values counts would be a guess (the last one won)
                raise CloudEventError(f"the Kafka record has more than one {name!r} header")
            lowered[name] = _kafka_text(name, raw)
    content_type = lowered.get("content-type")
    media = media_type(content_type) if content_type else ""
    partition_key = kafka_key_attribute(key)
    if media.startswith(_CLOUDEVENTS_MEDIA) or "ce_specversion" not in lowered:
        if media.startswith(_CLOUDEVENTS_MEDIA) and media != STRUCTURED_CONTENT_TYPE:
            raise _unsupported(media, batches=False)
        if value is None:
            raise CloudEventError("the Kafka record has no value and no ce_specversion header")
        check_size(len(value), max_size)
        event = parse_json(value)
        if partition_key is not None and type(event) is dict and "partitionkey" not in event:
            # The key joins the event only if the event stays valid with it: a key of 9,000
            # bytes (past the attributes' room) or one extension too many failed a valid event.
            with contextlib.suppress(CloudEventError):
                return validate(
                    {**event, "partitionkey": partition_key}, max_size=max_size, size=len(value)
                )
        return validate(event, max_size=max_size, size=len(value))
    attributes = {name[3:]: text for name, text in lowered.items() if name.startswith("ce_")}

    def binary(attributes: dict[str, str]) -> dict[str, Any]:
        return _binary_event(attributes, content_type, value, max_size)

    if partition_key is not None and "partitionkey" not in attributes:  # as above
        with contextlib.suppress(CloudEventError):
            return binary({**attributes, "partitionkey": partition_key})
    return binary(attributes)


def kafka_key_attribute(key: bytes | None) -> str | None:
    """A Kafka record key as an attribute's text (``partitionkey``, a raw record's ``subject``),
    or None when it cannot be one."""
    # Keys are often not text (Avro, integers: an 8-byte integer is valid UTF-8 full of control
    # characters); those stay out of the event rather than fail it, as does an empty key.
    if not key:
        return None
    try:
        return as_attribute(key.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def kafka_record_time(timestamp_ms: int) -> datetime | None:
    """A Kafka record's timestamp (ms) as a time, or None when no date can be that far (any
    producer may set any timestamp: ``2**62`` is year 146 million)."""
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def to_kafka(
    event: dict[str, Any], *, structured: bool = False
) -> tuple[bytes | None, list[tuple[str, bytes]], bytes]:
    """``(key, headers, value)`` of a Kafka record carrying a valid event.

    The key is the ``partitionkey`` extension, if any (the attribute still travels with the
    event). Binary mode writes ``ce_`` headers and ``content-type``; the value is the raw data.
    An event without data gets an empty value, not the binding's null value: on a compacted
    topic a null value is a tombstone that deletes the key. Structured mode writes the JSON
    event format. Raises :class:`CloudEventError` if the data cannot be encoded.
    """
    partition_key = event.get("partitionkey")
    key = None if partition_key is None else header_value(partition_key, percent=False).encode()
    if structured:
        return key, [("content-type", STRUCTURED_CONTENT_TYPE.encode())], encode(event)
    content_type, body = body_of(event)
    headers = [
        (name, text.encode())
        for name, text in _attribute_headers(event, "ce_", _NOT_HEADERS, percent=False).items()
    ]
    if content_type is not None:
        headers.append(("content-type", content_type.encode()))
    return key, headers, body or b""


def from_nats(
    headers: Mapping[str, str] | None, payload: bytes, *, max_size: int = DEFAULT_MAX_EVENT_SIZE
) -> dict[str, Any]:
    """The valid event carried by a NATS message.

    Binary mode (NATS binding 1.0.2+) when there is a ``ce-specversion`` header and the
    Content-Type is not a CloudEvents format: ``ce-`` headers, percent-decoded, with
    ``ce-datacontenttype`` (or else Content-Type) typing the payload. Otherwise the payload is
    the JSON event format. Raises :class:`CloudEventError` as :func:`from_http` does, and
    (400) for a header that was not UTF-8.
    """
    lowered = {name.lower(): value for name, value in headers.items()} if headers else {}
    if headers and len(lowered) < len(headers):
        # ce-id and CE-ID: which one was the id depended on their order (Kafka's and HTTP's
        # bindings refuse a header that comes twice)
        seen: set[str] = set()
        for name in headers:
            low = name.lower()
            if low in seen and (low.startswith("ce-") or low == "content-type"):
                raise CloudEventError(f"the NATS message has more than one {low!r} header")
            seen.add(low)
    for name, value in lowered.items():
        if "\ufffd" in value and (name.startswith("ce-") or name == "content-type"):
            # nats-py reads header values as UTF-8 with replacement: ids that differ only in
            # such bytes became one id, and the bus dropped the second as a duplicate
            raise CloudEventError(
                f"NATS header {name!r} is not UTF-8 (or holds U+FFFD, which stands for bytes "
                "that were not)"
            )
    media = media_type(lowered.get("content-type", ""))
    if media.startswith(_CLOUDEVENTS_MEDIA) or "ce-specversion" not in lowered:
        if media.startswith(_CLOUDEVENTS_MEDIA) and media != STRUCTURED_CONTENT_TYPE:
            raise _unsupported(media, batches=False)
        return decode(payload, max_size=max_size)
    return _from_ce_headers(
        lowered, payload, content_header_first=False, max_size=max_size, ascii_only=False
    )


def from_mqtt(
    content_type: str | None,
    user_properties: Sequence[tuple[str, str]],
    payload: bytes,
    *,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
) -> dict[str, Any]:
    """The valid event carried by an MQTT 5 PUBLISH (the MQTT binding).

    Structured mode when its Content Type property is a CloudEvents format, or when no user
    property is named ``specversion`` (so MQTT 3.1.1, which has no properties, is always
    structured). Otherwise binary mode: each user property named as an attribute can be
    (lowercase letters and digits) is that attribute, its value unchanged; the Content Type
    property is ``datacontenttype`` and types the payload, the data. User properties of other
    names are the application's own, not attributes. Raises :class:`CloudEventError` as
    :func:`from_http` does, and (400) for an attribute given twice.
    """
    media = media_type(content_type) if content_type else ""
    binary = any(name == "specversion" for name, _ in user_properties)
    if media.startswith(_CLOUDEVENTS_MEDIA) or not binary:
        if media.startswith(_CLOUDEVENTS_MEDIA) and media != STRUCTURED_CONTENT_TYPE:
            raise _unsupported(media, batches=False)
        return decode(payload, max_size=max_size)
    attributes: dict[str, str] = {}
    for name, value in user_properties:
        if not _EXTENSION_NAME.match(name) or name in _DATA_ATTRIBUTES:
            continue  # the application's own: the data is the payload
        if name in attributes:  # which one counts would be a guess
            raise CloudEventError(f"the MQTT message has more than one {name!r} user property")
        attributes[name] = value
    return _binary_event(attributes, content_type, payload, max_size)


def _binary_event(
    attributes: dict[str, str], content_type: str | None, body: bytes | None, max_size: int
) -> dict[str, Any]:
    """A binary-mode event of Kafka or MQTT: ``content_type`` (the message's own) types the
    body, else the ``datacontenttype`` attribute; the attributes' size counts towards
    ``max_size``."""
    header_size = sum(len(name) + len(text) for name, text in attributes.items())
    return event_from_binary(
        attributes,
        content_type or attributes.get("datacontenttype"),
        body,
        header_size=header_size,
        max_size=max_size,
    )


def to_nats(event: dict[str, Any], *, structured: bool = True) -> tuple[dict[str, str], bytes]:
    """Headers and payload of a NATS message carrying a valid event.

    Structured mode (the default) sends the JSON event format with its Content-Type; binary
    mode sends percent-encoded ``ce-`` headers, ``datacontenttype`` included, and the raw data.
    Raises :class:`CloudEventError` if the data cannot be encoded.
    """
    if structured:
        return {"Content-Type": STRUCTURED_CONTENT_TYPE}, encode(event)
    content_type, body = body_of(event)
    headers = _attribute_headers(event, "ce-", _NOT_NATS_HEADERS, percent=True)
    if content_type is not None:
        headers["ce-datacontenttype"] = content_type
    return headers, body or b""
