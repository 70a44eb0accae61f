"""Fuzzing ``POST /targets/{name}/invoke`` and the synchronous ``POST /events`` on one running
service (real NATS JetStream, PostgreSQL and a function endpoint): near-valid structured
events, binary ``ce-*`` headers, raw bytes of any type wrapped with any ``type``/``source``/
``subject``, any invocation type and target name.

The property: no input is a 5xx (the function answers 204) and every 4xx is problem+json; a
sync invocation answered 204 reached the function exactly once, with the event the answer
names; an async one answered 202 has a trail; the service is ready afterwards.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fuzz._checks import check_answer
from tests.fuzz._inputs import (
    BASE,
    FUZZ,
    binary_headers,
    header_values,
    json_values,
    near_valid_events,
    query_values,
    url_part,
)

_ids = itertools.count()


@pytest.fixture
async def service(eventbus: StartService, receiver: Receiver) -> AsyncIterator[RunningService]:
    svc = await eventbus(
        # answers a synchronous POST /events; an invocation is never routed by the rules
        rules="- name: sync-all\n  sync: true\n  targets: [fn]\n",
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
    )
    yield svc
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body


async def check_invoke(
    svc: RunningService,
    receiver: Receiver,
    body: bytes,
    headers: dict[str, str],
    *,
    target: str = "fn",
    query: str = "",
) -> None:
    before = len(receiver.requests)
    path = f"/targets/{url_part(target) or '%20'}/invoke{query}"
    status, answer = await check_answer(svc, "POST", path, body, headers)
    mode = headers.get("X-Eventbus-Invocation-Type", "sync").strip().lower()
    if status == 202:
        assert mode == "async" and target == "fn", answer
        await svc.trail(answer["source"], answer["id"])
    elif status < 400:
        assert (status, mode, target) == (204, "sync", "fn"), answer
        assert len(receiver.requests) == before + 1
    else:
        assert len(receiver.requests) == before


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _fresh(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("id") == BASE["id"]:
        return {**event, "id": f"fuzz-{next(_ids)}"}
    return event


modes = st.none() | st.sampled_from(["sync", "async", "ASYNC", " sync ", "", "later"])


def _with_mode(headers: dict[str, str], mode: str | None) -> dict[str, str]:
    return headers if mode is None else {**headers, "X-Eventbus-Invocation-Type": mode}


@pytest.mark.slow
@FUZZ
@given(event=near_valid_events().map(_fresh), mode=modes)
async def test_structured_events(
    service: RunningService, receiver: Receiver, event: dict[str, Any], mode: str | None
) -> None:
    headers = _with_mode({"Content-Type": "application/cloudevents+json"}, mode)
    await check_invoke(service, receiver, _json(event), headers)


@pytest.mark.slow
@FUZZ
@given(headers=binary_headers(), body=st.binary(max_size=500), mode=modes)
async def test_binary_events(
    service: RunningService,
    receiver: Receiver,
    headers: dict[str, str],
    body: bytes,
    mode: str | None,
) -> None:
    if headers.get("ce-id") == BASE["id"]:
        headers["ce-id"] = f"fuzz-{next(_ids)}"
    await check_invoke(service, receiver, body, _with_mode(headers, mode))


@pytest.mark.slow
@FUZZ
@given(
    body=json_values.map(_json) | st.binary(max_size=500),
    content_type=st.none()
    | st.sampled_from(["application/json", "text/plain; charset=utf-8", "image/png"])
    | header_values,
    attributes=st.lists(
        st.tuples(st.sampled_from(["type", "source", "subject", "other"]), query_values),
        max_size=3,
    ),
    mode=modes,
    target=st.just("fn") | query_values,
)
async def test_raw_data_and_parameters(
    service: RunningService,
    receiver: Receiver,
    body: bytes,
    content_type: str | None,
    attributes: list[tuple[str, str]],
    mode: str | None,
    target: str,
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    query = "?" + "&".join(f"{name}={url_part(value)}" for name, value in attributes)
    if unquote(url_part(target)) != target:
        target = "fn"
    await check_invoke(
        service, receiver, body, _with_mode(headers, mode), target=target, query=query
    )


@pytest.mark.slow
@FUZZ
@given(event=near_valid_events().map(_fresh), batch=st.booleans())
async def test_synchronous_publish(
    service: RunningService, receiver: Receiver, event: dict[str, Any], batch: bool
) -> None:
    """``POST /events`` with ``X-Eventbus-Invocation-Type: sync``: answered by the rule marked
    sync (the function's 204) or refused with a problem, a batch always (400)."""
    before = len(receiver.requests)
    media = "application/cloudevents-batch+json" if batch else "application/cloudevents+json"
    body = _json([event] if batch else event)
    headers = {"Content-Type": media, "X-Eventbus-Invocation-Type": "sync"}
    status, answer = await check_answer(service, "POST", "/events", body, headers)
    if status < 400:
        assert (status, batch) == (204, False), answer
        assert len(receiver.requests) == before + 1
    else:
        assert len(receiver.requests) == before
