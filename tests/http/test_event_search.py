"""``GET /events``, the search of accepted events, on a real service (NATS, PostgreSQL, a
receiving function): newest first, by source, type and time, page after page, every bad
parameter a 400 naming it. The store's side (ties, the indexes) is ``tests/store``."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import orjson

from eventbus.http._schemas import EventPage
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService

RULES = """
- name: orders
  match:
    type: [order.created]
  targets: [fn]
"""


def _event(i: int, source: str, type_: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"s-{i}", "source": source, "type": type_, "data": i}


async def _start(eventbus: StartService, receiver: Receiver) -> RunningService:
    return await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )


async def _search(svc: RunningService, **params: Any) -> dict[str, Any]:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    status, headers, body = await svc.request("GET", f"/events?{query}")
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    EventPage.model_validate(body)  # the documented body, nothing more (extra="forbid")
    return dict(body)


def _ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


async def test_search_by_source_type_and_time_newest_first_bad_parameters_refused(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    kinds = [("shop/orders", "order.created"), ("shop/orders", "order.paid"), ("iot/x", "ping")]
    for i in range(9):  # one at a time: each is stored after the one before
        source, type_ = kinds[i % 3]
        assert (await svc.post_event(_event(i, source, type_)))[0] == 202
        await svc.drained()

    everything = await _search(svc)
    assert _ids(everything) == [f"s-{i}" for i in reversed(range(9))]
    assert everything["next_after"] is None
    newest = everything["items"][0]
    assert newest["source"] == "iot/x" and newest["type"] == "ping" and newest["via"] == "http"
    assert newest["subject"] is None and newest["time"] is None and newest["size"] > 0
    times = [item["received_at"] for item in everything["items"]]
    assert times == sorted(times, reverse=True)

    assert _ids(await _search(svc, type="order.created")) == ["s-6", "s-3", "s-0"]
    assert _ids(await _search(svc, source="shop/orders")) == [
        "s-7",
        "s-6",
        "s-4",
        "s-3",
        "s-1",
        "s-0",
    ]
    assert _ids(await _search(svc, source="shop/orders", type="order.paid")) == [
        "s-7",
        "s-4",
        "s-1",
    ]
    assert _ids(await _search(svc, source="iot/x", type="order.paid")) == []
    # since: at or after; until: before (received_at, as the answer gives it)
    since, until = times[5], times[2]  # s-3 and s-6
    assert _ids(await _search(svc, since=since)) == [f"s-{i}" for i in range(8, 2, -1)]
    assert _ids(await _search(svc, until=until)) == [f"s-{i}" for i in range(5, -1, -1)]
    assert _ids(await _search(svc, since=since, until=until)) == ["s-5", "s-4", "s-3"]
    assert _ids(await _search(svc, since=since, until=since)) == []
    # a time without a zone is UTC
    zoneless = since.replace("+00:00", "")
    assert _ids(await _search(svc, since=zoneless, type="ping")) == ["s-8", "s-5"]

    # page after page: each event once, in the same order
    seen: list[str] = []
    after = None
    for _ in range(5):
        page = await _search(svc, limit=2, after=after)
        seen += _ids(page)
        after = page["next_after"]
        if after is None:
            break
    assert seen == _ids(everything)
    page = await _search(svc, type="order.created", limit=1)
    page = await _search(svc, type="order.created", limit=5, after=page["next_after"])
    assert _ids(page) == ["s-3", "s-0"] and page["next_after"] is None
    # a last page exactly full is the last: its next page was offered, and empty
    page = await _search(svc, type="order.created", limit=1)
    page = await _search(svc, type="order.created", limit=2, after=page["next_after"])
    assert _ids(page) == ["s-3", "s-0"] and page["next_after"] is None

    # each item opens its trail
    item = everything["items"][-1]
    trail = f"/events/trail?source={quote(item['source'], safe='')}&id={item['id']}"
    status, _, body = await svc.request("GET", trail)
    assert status == 200 and body["event"]["data"] == 0, body

    await _refuses_bad_parameters(svc)  # on the same service: one start less for the suite


BAD = [
    (
        "since=yesterday",
        "since must be an ISO 8601 time or a duration ago (30m, 6h, 7d), got 'yesterday'",
    ),
    ("since=1y", "since must be an ISO 8601 time or a duration ago"),
    ("since=-1h", "since must be an ISO 8601 time or a duration ago"),
    ("since=%EF%BC%97d", "since must be an ISO 8601 time or a duration ago"),  # a fullwidth 7
    ("until=3651d", "until must be at most 3650d ago, got '3651d'"),
    ("since=0h&until=1h", "since ("),
    ("until=2026-13-01", "until must be an ISO 8601 time"),
    ("since=10000-01-01", "since must be an ISO 8601 time"),
    ("until=0001-01-01T00:00:00%2B01:00", "until must fall within years 0001-9999"),
    (
        "since=2026-02-01T00:00:00Z&until=2026-01-01",
        "since (2026-02-01T00:00:00+00:00) is later than until (2026-01-01T00:00:00+00:00)",
    ),
    ("limit=0", "limit must be an integer from 1 to 1000, got '0'"),
    ("limit=1001", "limit must be an integer from 1 to 1000"),
    ("limit=-1", "limit must be an integer from 1 to 1000"),
    ("limit=1.5", "limit must be an integer from 1 to 1000"),
    ("limit=ten", "limit must be an integer from 1 to 1000"),
    ("limit=", "limit must be an integer from 1 to 1000"),
    ("limit=%C2%B2", "limit must be an integer from 1 to 1000, got '²'"),
    ("limit=%D9%A3", "limit must be an integer from 1 to 1000"),
    ("after=abc", "after must be the next_after of a previous page, got 'abc'"),
    ("after=1", "after must be the next_after of a previous page"),
    ("after=1-99999999999999999999", "after must be the next_after of a previous page"),
    ("after=999999999999999999-1", "after must be the next_after of a previous page"),
    ("source=a%00", "source must not contain the character U+0000"),
    ("type=%00", "type must not contain the character U+0000"),
    # a misspelt filter was dropped, and every event listed
    (
        "sorce=iot/x",
        "sorce is not a parameter of GET /events; its parameters are source, type, since",
    ),
]


async def _refuses_bad_parameters(svc: RunningService) -> None:
    """Every bad parameter is a 400 saying which and why; the extremes that remain are fine."""
    for query, detail in BAD:
        status, headers, problem = await svc.request("GET", f"/events?{query}")
        assert status == 400, (query, problem)
        assert headers["Content-Type"].startswith("application/problem+json"), query
        assert problem["detail"].startswith(detail), (query, problem["detail"])
    for query, found in (
        ("limit=1", 1),
        ("limit=1000", 9),
        ("since=0001-01-01T00:00:00-01:00&until=9999-12-31T23:59:59%2B01:00", 9),
        ("since=2026-01-01&until=2026-01-01", 0),
        ("since=1h", 9),  # a duration ago, by the server's clock
        ("since=3650d&until=0s", 9),
        ("until=1h", 0),
        ("since=1.5d&type=ping", 3),
        ("source=&type=", 0),
        (f"after={-(6 * 10**16)}-0", 0),  # the year 68
        (f"after=1-{2**63 - 1}", 0),
    ):
        status, _, body = await svc.request("GET", f"/events?{query}")
        assert status == 200 and len(body["items"]) == found, (query, body)
    # publishing is untouched; other methods are told which two there are
    status, headers, problem = await svc.request("PUT", "/events", b"{}")
    assert (status, headers["Allow"]) == (405, "GET, HEAD, POST"), problem
    event = orjson.dumps(_event(1, "a", "b"))
    status, _, body = await svc.request(
        "POST", "/events", event, {"Content-Type": "application/cloudevents+json"}
    )
    assert status == 202, body
