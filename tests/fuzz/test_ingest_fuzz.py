"""Fuzzing every HTTP ingest binding of one running service (real NATS JetStream, PostgreSQL and
a function endpoint): structured, binary and batch ``POST /events`` and ``POST
/notifications``, with random bytes and near-valid events.

The property: bad input is never a 5xx and every 4xx is problem+json; every event answered 202
has a readable trail and is delivered (in binary mode, to a real aiohttp server); the service
is ready afterwards.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually
from tests.fuzz._checks import check_answer
from tests.fuzz._inputs import (
    BASE,
    FUZZ,
    binary_headers,
    json_values,
    near_valid_events,
    text,
)

STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
# Each example gets ids of its own: the bus drops a repeated (source, id) as a duplicate.
_ids = itertools.count()


@pytest.fixture
async def service(eventbus: StartService, receiver: Receiver) -> AsyncIterator[RunningService]:
    """One service for all of a test's examples, routing every event to ``receiver``."""
    svc = await eventbus(
        rules="- name: all\n  targets: [fn]\n",
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
    )
    yield svc
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body
    await _check_every_delivery(svc)


async def _check_every_delivery(svc: RunningService) -> None:
    """Every routed event was delivered: no attempt failed, none is missing."""
    pool = svc.service.store.pool

    async def none_missing() -> bool:
        await svc.service.store.audit.flush()
        missing = await pool.fetchval(
            "SELECT count(*) FROM matches m WHERE NOT EXISTS (SELECT 1 FROM attempts a"
            " WHERE a.source = m.source AND a.id = m.id)"
        )
        return bool(missing == 0)

    await eventually(none_missing, within=60, every=0.2, what="an attempt for every match")
    failed = await pool.fetch(
        "SELECT id, outcome, status, error FROM attempts WHERE outcome <> 'delivered' LIMIT 5"
    )
    assert not failed, [dict(row) for row in failed]


async def check_ingest(
    svc: RunningService, path: str, body: bytes, headers: dict[str, str]
) -> None:
    """Publish, check the answer, and read the trail of every event it accepted."""
    status, answer = await check_answer(svc, "POST", path, body, headers)
    if status == 202 and "entries" not in answer:
        accepted = [answer]
    elif status in (202, 207):
        accepted = [entry for entry in answer["entries"] if entry["status"] == 202]
    else:
        return
    # The router records acceptance when it takes the event off the bus: the trail appears
    # shortly after the 202 (bounded: an audit row that cannot be written fails the test).
    for event in accepted:
        await svc.trail(event["source"], event["id"])


def _json(value: Any) -> bytes:
    # json, not orjson: it writes what orjson refuses to (integers past 64 bits, NaN, 300
    # levels), which is the point of fuzz input
    return json.dumps(value, ensure_ascii=False).encode()


def _fresh(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("id") == BASE["id"]:
        return {**event, "id": f"fuzz-{next(_ids)}"}
    return event


bodies = st.binary(max_size=2_000)
events = near_valid_events().map(_fresh)


@pytest.mark.slow
@FUZZ
@given(body=events.map(_json) | bodies)
async def test_structured_mode(service: RunningService, body: bytes) -> None:
    await check_ingest(service, "/events", body, STRUCTURED)


@pytest.mark.slow
@FUZZ
@given(headers=binary_headers(), body=json_values.map(_json) | bodies)
async def test_binary_mode(service: RunningService, headers: dict[str, str], body: bytes) -> None:
    if headers.get("ce-id") == BASE["id"]:
        headers["ce-id"] = f"fuzz-{next(_ids)}"
    await check_ingest(service, "/events", body, headers)


@pytest.mark.slow
@FUZZ
@given(
    body=st.lists(events | json_values, max_size=12).map(_json)
    | st.integers(990, 1_100).map(lambda n: b"[" + b",".join([b"{}"] * n) + b"]")
    | bodies
)
async def test_batch_mode(service: RunningService, body: bytes) -> None:
    await check_ingest(service, "/events", body, BATCH)


S3_RECORD: dict[str, Any] = {
    "eventSource": "aws:s3",
    "awsRegion": "us-east-1",
    "eventTime": "2026-01-01T00:00:00.000Z",
    "eventName": "ObjectCreated:Put",
    "responseElements": {"x-amz-request-id": "R", "x-amz-id-2": "H"},
    "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}},
}


@st.composite
def notifications(draw: st.DrawFn) -> bytes:
    """An S3 notification with one record field replaced, or any JSON, or any bytes."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        record = orjson.loads(orjson.dumps(S3_RECORD))
        record["responseElements"]["x-amz-request-id"] = f"R{next(_ids)}"
        field = draw(st.sampled_from(["eventSource", "eventTime", "eventName", "awsRegion", "s3"]))
        record[field] = draw(json_values | text)
        return _json({"Records": [record]})
    if kind == 1:
        keys = st.sampled_from(["Records", "events", "Event"])
        return _json(draw(st.dictionaries(keys, json_values)))
    return draw(bodies)


@pytest.mark.slow
@FUZZ
@given(body=notifications())
async def test_notifications(service: RunningService, body: bytes) -> None:
    await check_ingest(service, "/notifications", body, {"Content-Type": "application/json"})
