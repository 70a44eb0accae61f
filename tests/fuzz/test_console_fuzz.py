"""Fuzzing the console's input-taking endpoints on one running service: the live stream's
``pattern`` (``GET /events/live``), the pattern check (``POST /patterns/validate``), the
rules sandbox (``POST /rules/sandbox``) and the search of accepted events (``GET /events``).

The property: no input is a 5xx, every 4xx is problem+json, the live stream and the pattern
check agree on which patterns are valid, a stream opened with a valid pattern narrows to the
events it matches, a search answers only events its filters select, newest first, pages
that do not overlap, and the service is ready afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.rules import compile_pattern
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fuzz._checks import check_answer
from tests.fuzz._inputs import FUZZ, deep, json_values, near_valid_events, text

RULES = """
- name: all
  match: {source: [{prefix: tests/}]}
  targets: [fn]
- name: shaped
  match: {type: [com.example.fuzz]}
  transform:
    input_paths: {x: $.data.x, s: $.subject}
    template: '{"x": <x>, "s": "<s>"}'
  targets: [fn]
"""


@pytest.fixture
async def service(eventbus: StartService, receiver: Receiver) -> AsyncIterator[RunningService]:
    svc = await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    yield svc
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body


fields = st.sampled_from(["source", "type", "id", "subject", "data", "$or", "x", ""]) | text
operators = st.fixed_dictionaries(
    {},
    optional={
        "prefix": json_values,
        "suffix": json_values,
        "equals-ignore-case": json_values,
        "wildcard": json_values,
        "anything-but": json_values,
        "numeric": st.lists(st.sampled_from(["<", ">", "=", ">=", "<="]) | json_values, max_size=4),
        "exists": json_values,
        "cidr": st.sampled_from(["10.0.0.0/8", "::1/128", "300.1.1.1/40", "x"]) | json_values,
    },
)
leaves = st.lists(json_values | operators, max_size=4) | json_values
patterns = st.recursive(
    st.dictionaries(fields, leaves, max_size=3),
    lambda inner: st.dictionaries(fields, inner | st.lists(inner, max_size=3), max_size=3),
    max_leaves=10,
)
pattern_texts = (
    patterns.map(json.dumps)  # not orjson: big integers and deep nesting are valid JSON
    | deep.map(json.dumps)
    | text
    | st.sampled_from(["", " ", "{", "null", "[]", '{"a": []}', '{"$or": []}', "{}"])
)


def _valid(pattern: str) -> bool:
    try:
        compile_pattern(orjson.loads(pattern))
    except Exception:
        return False
    return True


async def _open_stream(svc: RunningService, pattern: str) -> tuple[int, Any]:
    """Open the live stream with ``pattern``: (200, the open response) or (4xx, problem)."""
    resp = await svc.session.get(f"{svc.url}/events/live?pattern={quote(pattern, safe='')}")
    if resp.status == 200:
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"retry:")
        return 200, resp
    raw = await resp.read()
    resp.release()
    assert resp.status < 500, (pattern, raw[:300])
    assert resp.headers["Content-Type"].startswith("application/problem+json"), raw[:300]
    problem = orjson.loads(raw)
    assert problem["status"] == resp.status and problem["detail"], problem
    return resp.status, problem


@FUZZ
@given(pattern=pattern_texts)
async def test_live_pattern_and_validate_agree(service: RunningService, pattern: str) -> None:
    status, stream = await _open_stream(service, pattern)
    if status == 200:
        stream.close()
    checked, _ = await check_answer(service, "POST", "/patterns/validate", pattern.encode(), {})
    if pattern.strip():
        assert (status == 200) == (checked == 200) == _valid(pattern), (pattern, status, checked)
    else:
        assert status == 200 and checked == 400  # no filter; the check wants a body


_ids = itertools.count()


def _sendable(value: Any) -> bool:
    """What the test's client can send (orjson refuses integers beyond 64 bits; how the edge
    treats those is the ingest fuzz tests' business)."""
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


@settings(FUZZ, max_examples=15)  # each example waits for its event to go through
@given(
    pattern=patterns.filter(lambda p: _valid(json.dumps(p))), event=json_values.filter(_sendable)
)
async def test_live_stream_narrows_to_matching_events(
    service: RunningService, pattern: dict[str, Any], event: Any
) -> None:
    """One event with fuzzed data and subject through a stream with a fuzzed valid pattern:
    the row comes through exactly when the pattern matches the event."""
    compiled = compile_pattern(pattern)
    subject = event if isinstance(event, str) else "s"
    ev = {
        "specversion": "1.0",
        "id": f"fz-{next(_ids)}",
        "source": "tests/fuzz",
        "type": "com.example.fuzz",
        "subject": subject,
        "data": event,
    }
    status, stream = await _open_stream(service, json.dumps(pattern))
    assert status == 200
    try:
        status, _ = await service.post_event(ev)
        if status != 202:
            return  # an invalid event (e.g. too deep) never reaches the stream
        await service.drained()
        # the row was queued before the router acked; it is written within _GATHER (0.1 s):
        # read for 0.5 s, or until it is there (only its absence needs the whole wait)
        seen = b""
        try:
            async with asyncio.timeout(0.5):
                while ev["id"].encode() not in seen:
                    seen += await stream.content.readany()
        except TimeoutError:
            pass
        assert (ev["id"].encode() in seen) == compiled.matches(ev), (pattern, ev, seen[:500])
        assert (compiled.mismatch(ev) is None) == compiled.matches(ev)
    finally:
        stream.close()


@FUZZ
@given(event=near_valid_events() | st.dictionaries(text, json_values, max_size=5))
async def test_sandbox(service: RunningService, event: dict[str, Any]) -> None:
    try:
        body = orjson.dumps(event)
    except (TypeError, orjson.JSONEncodeError):
        return
    status, answer = await check_answer(service, "POST", "/rules/sandbox", body, {})
    if status == 200:
        assert answer["rules"] == 2
        assert {r["rule"] for r in answer["routes"]} <= {"all", "shaped"}


@FUZZ
@given(body=st.binary(max_size=200))
async def test_sandbox_and_validate_random_bytes(service: RunningService, body: bytes) -> None:
    for path in ("/rules/sandbox", "/patterns/validate"):
        await check_answer(service, "POST", path, body, {})


SEARCHED = [("tests/fuzz", "com.example.fuzz"), ("tests/search", "other"), ("tests/fuzz", "other")]


@pytest.fixture
async def searched(service: RunningService) -> tuple[RunningService, datetime]:
    """The service with a few accepted events to find, and when the bus stored the middle one
    (times near it select some of them)."""
    for i in range(7):
        source, type_ = SEARCHED[i % 3]
        event = {"specversion": "1.0", "id": f"se-{i}", "source": source, "type": type_}
        assert (await service.post_event(event))[0] == 202
        await service.drained()
    status, _, page = await service.request("GET", "/events?limit=4")
    assert status == 200, page
    return service, datetime.fromisoformat(page["items"][-1]["received_at"])


moments = (
    st.datetimes(timezones=st.sampled_from([UTC, None])).map(datetime.isoformat)
    | st.sampled_from(["2026-01-01", "yesterday", "0000-01-01", "9999-12-31T23:59:59-01:00"])
    | text
)


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _mostly(valid: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four: a search with several parameters is then often valid."""
    return st.integers(0, 3).flatmap(lambda n: odd if n == 0 else valid)


search_params = st.fixed_dictionaries(
    {},
    optional={
        "source": _mostly(st.sampled_from([s for s, _ in SEARCHED]), text),
        "type": _mostly(st.sampled_from([t for _, t in SEARCHED]), text),
        # a time: milliseconds from the middle event (made text in the test), or text
        "since": _mostly(st.integers(-3000, 3000), moments),
        "until": _mostly(st.integers(-3000, 3000), moments),
        "limit": _mostly(st.integers(1, 8).map(str), st.integers(-2, 1002).map(str) | text),
        # microseconds since 1970 and a seq: within range, or not
        "after": _mostly(
            st.tuples(st.integers(0, 2 * 10**15), st.integers(0, 10**6)),
            st.tuples(st.integers(-(10**18), 10**18), st.integers(-1, 2**64)),
        ).map(lambda pair: f"{pair[0]}-{pair[1]}")
        | text,
    },
)


@settings(FUZZ, max_examples=60)
@given(drawn=search_params)
async def test_event_search(
    searched: tuple[RunningService, datetime], drawn: dict[str, str | int]
) -> None:
    svc, middle = searched
    params = {
        name: (middle + timedelta(milliseconds=v)).isoformat() if isinstance(v, int) else v
        for name, v in drawn.items()
    }
    status, page = await check_answer(svc, "GET", f"/events?{urlencode(params)}", None, {})
    if status != 200:
        return
    items = page["items"]
    limit = int(params.get("limit", 100))
    assert len(items) <= limit and (page["next_after"] is not None) == (len(items) == limit)
    times = [datetime.fromisoformat(item["received_at"]) for item in items]
    assert times == sorted(times, reverse=True)
    for item, when in zip(items, times, strict=True):
        assert params.get("source", item["source"]) == item["source"], (params, item)
        assert params.get("type", item["type"]) == item["type"], (params, item)
        assert "since" not in params or when >= _moment(params["since"])
        assert "until" not in params or when < _moment(params["until"])
    if page["next_after"] is not None:  # the next page starts where this one ended
        nxt = {**params, "after": page["next_after"]}
        status, more = await check_answer(svc, "GET", f"/events?{urlencode(nxt)}", None, {})
        assert status == 200
        ids = {(i["source"], i["id"], i["received_at"]) for i in items}
        for item in more["items"]:
            assert datetime.fromisoformat(item["received_at"]) <= times[-1]
            assert (item["source"], item["id"], item["received_at"]) not in ids
