"""Bucket notifications to CloudEvents: the adapter mapping every upload path shares.

    S3 / MinIO notification (``Records[]``) ──┐
    Alibaba OSS notification (``events[]``) ──┼─> notification_to_events ─> [CloudEvent, ...]
    s3-poll source (synthesized records) ─────┘

The S3 mapping follows the CloudEvents AWS S3 adapter; OSS follows it in the same spirit (see
docs/sources.md). Pure functions, no I/O. Every malformed body raises CloudEventError (HTTP
400) naming the record and the field, so the HTTP route and queue sources report it as is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from eventbus._errors import CloudEventError
from eventbus.cloudevents._bindings import check_entries
from eventbus.cloudevents._event import DEFAULT_MAX_EVENT_SIZE, load_json, validate

__all__ = [
    "notification_to_events",
    "oss_records_to_events",
    "s3_event",
    "s3_records_to_events",
]


def _invalid(detail: str) -> CloudEventError:
    return CloudEventError(detail, title="Invalid bucket notification")


def _field(record: Mapping[str, Any], path: str, where: str) -> str:
    """The non-empty string at dotted ``path`` in ``record``, or CloudEventError."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise _invalid(f"{where}: missing field {path!r}")
        value = value[part]
    if not isinstance(value, str) or not value:
        raise _invalid(f"{where}: field {path!r} must be a non-empty string")
    return value


def _optional(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key, "")
    return value if isinstance(value, str) else ""


def _source(origin: str, region: str, bucket: str) -> str:
    """``origin.region.bucket``, the adapter's source; without a region (MinIO sends an empty
    ``awsRegion`` unless one is configured) ``origin.bucket``, never an empty part (``..``)."""
    return ".".join(part for part in (origin, region, bucket) if part)


def _records(body: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    records = body.get(key)
    if not isinstance(records, list):
        raise _invalid(f"notification field {key!r} must be a list")
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise _invalid(f"{key}[{i}]: must be an object")
    return records


def s3_event(record: Mapping[str, Any], event_id: str, where: str = "record") -> dict[str, Any]:
    """One S3 notification record as a CloudEvent with the given ``id`` (adapter mapping).

    ``eventName`` loses a leading ``s3:`` (MinIO writes ``s3:ObjectCreated:Put``, AWS
    ``ObjectCreated:Put``) so both give type ``com.amazonaws.s3.ObjectCreated:Put``. Raises
    CloudEventError when a mapped field is missing.
    """
    name = _field(record, "eventName", where).removeprefix("s3:")
    bucket = _field(record, "s3.bucket.name", where)
    origin = _field(record, "eventSource", where)
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": _source(origin, _optional(record, "awsRegion"), bucket),
        "type": f"com.amazonaws.s3.{name}",
        "subject": _field(record, "s3.object.key", where),
        "time": _field(record, "eventTime", where),
        "datacontenttype": "application/json",
        "data": dict(record),
    }


def s3_records_to_events(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Map an S3 or MinIO notification body (``{"Records": [...]}``) to CloudEvents.

    ``id`` = ``x-amz-request-id`` + "." + ``x-amz-id-2`` (the adapter's mapping) + "." + 16 hex
    digits of a digest of the object's key and ``sequencer``: one request notifies each object
    it touched (a multi-object delete), in one body or one message each, all under the
    request's ids, and the bus dropped all but the first as duplicates; a notification sent
    again keeps its id. Without both request ids (MinIO's lifecycle expiry, replication):
    ``x-amz-request-id`` or ``internal``, "." and 32 hex digits of a digest of eventName,
    eventTime, key, sequencer and versionId. ``source`` = eventSource + "." +
    awsRegion + "." + bucket (without the region when it is empty); ``type`` =
    "com.amazonaws.s3." + eventName; ``subject`` = object key (URL-encoded, as S3 sends it);
    ``time`` = eventTime; ``data`` = the record. An S3 ``s3:TestEvent`` body maps to no events.
    Raises CloudEventError naming the bad record.
    """
    if body.get("Event") == "s3:TestEvent" and "Records" not in body:
        return []
    events = []
    records = _records(body, "Records")
    for i, record in enumerate(records):
        where = f"Records[{i}]"
        key = _field(record, "s3.object.key", where)
        s3_object = record["s3"]["object"]  # there: _field found its key
        sequencer = _optional(s3_object, "sequencer")
        which = hashlib.sha256(f"{key}\n{sequencer}".encode()).hexdigest()[:16]
        answered = record.get("responseElements")
        request_id, host_id = (
            (_optional(answered, "x-amz-request-id"), _optional(answered, "x-amz-id-2"))
            if isinstance(answered, Mapping)
            else ("", "")
        )
        if request_id and host_id:
            event_id = f"{request_id}.{host_id}.{which}"
        else:
            # No request made it: MinIO's own deletions (lifecycle expiry), replication and
            # transitions carry empty request ids (older MinIO releases an empty
            # x-amz-id-2 on every event), and each was refused for good, MinIO retrying it.
            # Named by what it did to which object version, when: the same when sent again.
            name, at = _field(record, "eventName", where), _field(record, "eventTime", where)
            version = _optional(s3_object, "versionId")
            made = hashlib.sha256(
                f"{name}\n{at}\n{key}\n{sequencer}\n{version}".encode()
            ).hexdigest()
            event_id = f"{request_id or 'internal'}.{made[:32]}"
        events.append(s3_event(record, event_id, where))
    return events


def oss_records_to_events(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Map an Alibaba Cloud OSS notification body (``{"events": [...]}``) to CloudEvents.

    ``id`` = responseElements.requestId + "." + index (one request may notify several
    objects); ``source`` = eventSource + "." + region + "." + bucket (region left out when
    empty); ``type`` =
    "com.aliyun.oss." + eventName; ``subject`` = object key; ``time`` = eventTime; ``data`` =
    the record. Raises CloudEventError naming the bad record.
    """
    events = []
    for i, record in enumerate(_records(body, "events")):
        where = f"events[{i}]"
        request_id = _field(record, "responseElements.requestId", where)
        bucket = _field(record, "oss.bucket.name", where)
        origin = _field(record, "eventSource", where)
        events.append(
            {
                "specversion": "1.0",
                "id": f"{request_id}.{i}",
                "source": _source(origin, _optional(record, "region"), bucket),
                "type": f"com.aliyun.oss.{_field(record, 'eventName', where)}",
                "subject": _field(record, "oss.object.key", where),
                "time": _field(record, "eventTime", where),
                "datacontenttype": "application/json",
                "data": dict(record),
            }
        )
    return events


def notification_to_events(
    body: bytes | Mapping[str, Any],
    *,
    max_records: int | None = None,
    max_size: int = DEFAULT_MAX_EVENT_SIZE,
) -> list[dict[str, Any]]:
    """Detect the notification format (S3/MinIO or OSS) and map it to valid CloudEvents.

    Accepts raw JSON bytes or an already-parsed object. Raises CloudEventError naming the
    record: 400 for invalid JSON, an unknown format, a malformed record or one whose event is
    not valid (see :func:`validate`), 413 for more than ``max_records``
    records or an event over ``max_size`` bytes.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        try:
            parsed = load_json(body)  # an integer beyond 64 bits is refused, not rounded
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"notification is not valid JSON: {exc}") from exc
    else:
        parsed = body
    if not isinstance(parsed, Mapping):
        raise _invalid(f"notification must be a JSON object, got {type(parsed).__name__}")
    if "Records" in parsed or parsed.get("Event") == "s3:TestEvent":
        key, convert = "Records", s3_records_to_events
    elif "events" in parsed:
        key, convert = "events", oss_records_to_events
    else:
        raise _invalid(
            "not a bucket notification: expected an S3/MinIO 'Records' list or an OSS 'events' list"
        )
    records = parsed.get(key)
    if max_records is not None and isinstance(records, list):
        check_entries(len(records), max_records)
    events = convert(parsed)
    for i, event in enumerate(events):
        try:
            validate(event, max_size=max_size)
        except CloudEventError as exc:
            raise CloudEventError(
                f"{key}[{i}]: {exc.detail}", status=exc.status, title="Invalid bucket notification"
            ) from exc
    return events
