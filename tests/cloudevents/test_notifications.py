"""Bucket notification mapping (pure): S3/MinIO and OSS bodies to CloudEvents, and bad bodies."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import orjson
import pytest

from eventbus._errors import CloudEventError
from eventbus.cloudevents import notification_to_events, oss_records_to_events, s3_records_to_events

S3_RECORD: dict[str, Any] = {
    "eventVersion": "2.1",
    "eventSource": "aws:s3",
    "awsRegion": "us-west-2",
    "eventTime": "2026-11-28T12:00:00.000Z",
    "eventName": "ObjectCreated:Put",
    "userIdentity": {"principalId": "AWS:EXAMPLE"},
    "requestParameters": {"sourceIPAddress": "127.0.0.1"},
    "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8"},
    "s3": {
        "s3SchemaVersion": "1.0",
        "configurationId": "uploads",
        "bucket": {"name": "photos", "arn": "arn:aws:s3:::photos"},
        "object": {"key": "2026/cat+1.jpg", "size": 1024, "eTag": "d41d8cd9", "sequencer": "0A1"},
    },
}

OSS_RECORD: dict[str, Any] = {
    "eventName": "ObjectCreated:PutObject",
    "eventSource": "acs:oss",
    "eventTime": "2026-11-28T12:00:00.000Z",
    "eventVersion": "1.0",
    "oss": {
        "bucket": {"arn": "acs:oss:cn-hangzhou:123:photos", "name": "photos"},
        "object": {"deltaSize": 10, "eTag": "ABC", "key": "a/b.png", "size": 10},
        "ossSchemaVersion": "1.0",
        "ruleId": "r1",
    },
    "region": "cn-hangzhou",
    "requestParameters": {"sourceIPAddress": "127.0.0.1"},
    "responseElements": {"requestId": "5F8D1"},
    "userIdentity": {"principalId": "123"},
}


def test_s3_record_maps_as_the_adapter_specifies() -> None:
    [event] = s3_records_to_events({"Records": [S3_RECORD]})
    assert event == {
        "specversion": "1.0",
        # the adapter's id, and which object of the request (a digest of key and sequencer)
        "id": f"C3D13FE58DE4C810.FMyUVURIY8.{_which('2026/cat+1.jpg', '0A1')}",
        "source": "aws:s3.us-west-2.photos",
        "type": "com.amazonaws.s3.ObjectCreated:Put",
        "subject": "2026/cat+1.jpg",
        "time": "2026-11-28T12:00:00.000Z",
        "datacontenttype": "application/json",
        "data": S3_RECORD,
    }


def test_minio_event_name_prefix_is_dropped() -> None:
    record = copy.deepcopy(S3_RECORD)
    record["eventName"] = "s3:ObjectRemoved:Delete"
    record["eventSource"] = "minio:s3"
    record["awsRegion"] = ""
    body = {"EventName": "s3:ObjectRemoved:Delete", "Key": "photos/x", "Records": [record]}
    [event] = notification_to_events(orjson.dumps(body))
    assert event["type"] == "com.amazonaws.s3.ObjectRemoved:Delete"
    assert event["source"] == "minio:s3.photos"


@pytest.mark.parametrize(
    ("record", "region_key", "expected"),
    [
        ("s3", "awsRegion", "minio:s3.photos"),
        ("oss", "region", "acs:oss.photos"),
    ],
)
@pytest.mark.parametrize("region", ["", None, 7, "absent"])
def test_a_notification_without_a_region_has_no_empty_part_in_its_source(
    record: str, region_key: str, expected: str, region: object
) -> None:
    body = copy.deepcopy(S3_RECORD if record == "s3" else OSS_RECORD)
    if record == "s3":
        body["eventSource"] = "minio:s3"
    if region == "absent":
        del body[region_key]
    else:
        body[region_key] = region
    [event] = notification_to_events({"Records" if record == "s3" else "events": [body]})
    assert event["source"] == expected
    assert ".." not in event["source"] and not event["source"].endswith(".")


def test_oss_record_maps_in_the_same_spirit() -> None:
    [event] = notification_to_events({"events": [OSS_RECORD]})
    assert event == {
        "specversion": "1.0",
        "id": "5F8D1.0",
        "source": "acs:oss.cn-hangzhou.photos",
        "type": "com.aliyun.oss.ObjectCreated:PutObject",
        "subject": "a/b.png",
        "time": "2026-11-28T12:00:00.000Z",
        "datacontenttype": "application/json",
        "data": OSS_RECORD,
    }
    assert oss_records_to_events({"events": [OSS_RECORD, OSS_RECORD]})[1]["id"] == "5F8D1.1"


def test_s3_test_event_and_empty_records_give_no_events() -> None:
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"}
    assert notification_to_events(orjson.dumps(test_event)) == []
    assert notification_to_events(b'{"Records": []}') == []


def _without(path: str) -> dict[str, Any]:
    record = copy.deepcopy(S3_RECORD)
    *parents, last = path.split(".")
    node = record
    for part in parents:
        node = node[part]
    del node[last]
    return {"Records": [record]}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'{"hello": 1}', "not a bucket notification"),
        (b'{"Records": {}}', "'Records' must be a list"),
        (b'{"Records": [3]}', r"Records\[0\]: must be an object"),
        (_without("s3.bucket.name"), r"Records\[0\]: missing field 's3.bucket.name'"),
        (_without("eventTime"), "missing field 'eventTime'"),
        ({"events": [{"eventName": "x"}]}, r"events\[0\]: missing field"),
        ({"Records": [{**S3_RECORD, "eventName": 7}]}, "'eventName' must be a non-empty string"),
    ],
)
def test_bad_notifications_raise_400_with_detail(body: Any, fragment: str) -> None:
    with pytest.raises(CloudEventError, match=fragment) as info:
        notification_to_events(body)
    assert info.value.status == 400
    assert info.value.title == "Invalid bucket notification"


def _with(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(record)
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return out


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            {"Records": [S3_RECORD, _with(S3_RECORD, "eventTime", "0001-01-01T00:00:00+23:59")]},
            "Records[1]: attribute 'time' must fall within years 0001-9999",
        ),
        (
            {"events": [_with(OSS_RECORD, "oss.object.key", "a\nb")]},
            "events[0]: attribute 'subject' contains a control character",
        ),
    ],
)
def test_mapped_events_are_validated(body: Any, fragment: str) -> None:
    with pytest.raises(CloudEventError) as info:
        notification_to_events(orjson.dumps(body))
    assert info.value.status == 400
    assert fragment in info.value.detail


def test_records_are_capped_before_mapping() -> None:
    body = {"Records": [S3_RECORD] * 3}
    assert len(notification_to_events(body, max_records=3)) == 3
    with pytest.raises(CloudEventError, match="3 events, more than the limit of 2") as info:
        notification_to_events({"Records": [{}] * 3}, max_records=2)
    assert info.value.status == 413


def test_the_event_size_limit_is_the_callers() -> None:
    # /notifications checked every record against the default 256 KiB, whatever the service's
    # max_event_size: a lowered limit was bypassed, a raised one refused
    body = {"Records": [S3_RECORD]}
    [event] = notification_to_events(body, max_size=64 * 1024)
    size = len(orjson.dumps(event))
    with pytest.raises(CloudEventError) as info:
        notification_to_events(body, max_size=size - 1)
    assert info.value.status == 413
    assert notification_to_events(body, max_size=size) == [event]


def _which(key: str, sequencer: str) -> str:
    return hashlib.sha256(f"{key}\n{sequencer}".encode()).hexdigest()[:16]


def test_s3_records_of_one_request_get_ids_of_their_own() -> None:
    # They share x-amz-request-id and x-amz-id-2: with those alone the second record had the
    # first's source and id and was answered as its duplicate, never delivered; so had the
    # second of two messages of one record each (MinIO sends a multi-object delete so).
    other = copy.deepcopy(S3_RECORD)
    other["s3"]["object"].update(key="2026/dog.jpg", sequencer="0A2")
    first, second = s3_records_to_events({"Records": [S3_RECORD, other]})
    assert first["id"] == f"C3D13FE58DE4C810.FMyUVURIY8.{_which('2026/cat+1.jpg', '0A1')}"
    assert second["id"] == f"C3D13FE58DE4C810.FMyUVURIY8.{_which('2026/dog.jpg', '0A2')}"
    assert (first["subject"], second["subject"]) == ("2026/cat+1.jpg", "2026/dog.jpg")
    [alone] = s3_records_to_events({"Records": [other]})
    assert alone["id"] == second["id"]  # one message each: the same ids
    # the same notification sent again keeps its id (the bus drops it as a duplicate)
    assert s3_records_to_events({"Records": [S3_RECORD]})[0]["id"] == first["id"]


def test_minios_own_deletions_without_request_ids_get_ids_of_their_own() -> None:
    # MinIO's lifecycle expiry (and replication) notifies with empty request ids, older
    # releases with an empty x-amz-id-2 on every event: each was refused (400) for good, and
    # MinIO retried it.
    expiry = _with(S3_RECORD, "responseElements", {"x-amz-request-id": "", "x-amz-id-2": ""})
    expiry["eventName"] = "s3:ObjectRemoved:Delete"
    [first] = s3_records_to_events({"Records": [expiry]})
    assert first["id"].startswith("internal.") and len(first["id"]) == len("internal.") + 32
    assert s3_records_to_events({"Records": [expiry]})[0]["id"] == first["id"]  # sent again
    later = _with(expiry, "eventTime", "2026-02-01T00:00:00.000Z")
    assert s3_records_to_events({"Records": [later]})[0]["id"] != first["id"]
    # two versions of one key expired at once, a store sending no sequencer
    unsequenced = _with(expiry, "s3.object.sequencer", "")
    versions = [_with(unsequenced, "s3.object.versionId", v) for v in ("v1", "v2")]
    ids = {e["id"] for e in s3_records_to_events({"Records": versions})}
    assert len(ids) == 2
    no_host = _with(S3_RECORD, "responseElements.x-amz-id-2", "")
    assert s3_records_to_events({"Records": [no_host]})[0]["id"].startswith("C3D13FE58DE4C810.")
    for gone in ("responseElements.x-amz-id-2", "responseElements"):
        assert s3_records_to_events(_without(gone))[0]["id"]


def test_an_integer_beyond_64_bits_in_a_notification_is_refused_not_rounded() -> None:
    body = orjson.dumps({"Records": [S3_RECORD]}).replace(
        b'"size":1024', b'"size":123456789012345678901234567890'
    )
    with pytest.raises(CloudEventError) as caught:
        notification_to_events(body)
    assert caught.value.status == 400 and "64 bits" in caught.value.detail
