"""Fuzzing ``/hooks/<name>`` of one running service (real NATS JetStream, PostgreSQL and a
function endpoint): random bodies, content types, methods, query strings and headers, sent
unsigned, signed right, or signed and then changed, to triggers whose event type, id, subject
and extensions come from those headers, the query and the body.

The property: never a 5xx, every 4xx is problem+json; a signed request whose body was changed
is refused; every 202 has a readable trail (the event is on the bus and was routed); the
service is ready afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fuzz._checks import check_answer
from tests.fuzz._inputs import FUZZ, header_names, header_values, json_values, text, token

SECRET = "fuzz-secret-0123456789"
_ids = itertools.count()
# The answers a test's examples got: a run that never reached a 202 (or never a refusal)
# tested less than it claims.
_answered: set[int] = set()

SOURCES = [
    {
        "name": "mapped",
        "type": "webhook",
        "methods": ["POST", "PUT", "PATCH"],
        "event_type": "com.example.{header:X-Kind}",
        "event_id": "{header:X-Id}",
        "subject": "{body:$.a[0].b}",
        "extensions": {"tenant": "{query:tenant}", "kind": "{body:$.kind}"},
        "max_body": 4096,
    },
    {"name": "github", "type": "webhook", "verify": {"kind": "github", "secret": SECRET}},
]


@pytest.fixture
async def service(
    eventbus: StartService, receiver: Receiver, request: pytest.FixtureRequest
) -> AsyncIterator[RunningService]:
    svc = await eventbus(
        rules="- name: all\n  targets: [fn]\n",
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=SOURCES,
    )
    _answered.clear()
    yield svc
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body
    expected = {"test_mapped_hook": {202, 400, 405}, "test_github_hook": {202, 400, 401}}
    assert expected[request.node.originalname] <= _answered, _answered


content_types = (
    st.sampled_from(
        [
            "application/json",
            "application/cloudevents+json",
            "application/x-www-form-urlencoded",
            "text/plain; charset=utf-8",
            "application/octet-stream",
            "multipart/form-data; boundary=x",
        ]
    )
    | header_values
)
bodies = (
    st.binary(max_size=5_000)
    | json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode())
    | st.dictionaries(text, text, max_size=4).map(
        lambda d: "&".join(f"{quote(k)}={quote(v)}" for k, v in d.items()).encode()
    )
)
queries = st.dictionaries(st.sampled_from(["tenant", "x", "", "é"]), text, max_size=3).map(
    lambda q: "&".join(f"{quote(k)}={quote(v)}" for k, v in q.items())
)


@st.composite
def mapped_headers(draw: st.DrawFn) -> dict[str, str]:
    headers = draw(st.dictionaries(header_names, header_values, max_size=4))
    if draw(st.booleans()):
        headers["X-Kind"] = draw(header_values | token)
    if draw(st.booleans()):
        headers["X-Id"] = draw(header_values | token.map(lambda t: f"{t}-{next(_ids)}"))
    if draw(st.booleans()):
        headers["Content-Type"] = draw(content_types)
    return headers


async def _check(
    svc: RunningService, method: str, path: str, body: bytes, headers: dict[str, str]
) -> int:
    status, answer = await check_answer(svc, method, path, body, headers)
    _answered.add(status)
    if status == 202:
        await svc.trail(answer["source"], answer["id"])
    return status


@pytest.mark.slow
@FUZZ
@given(
    method=st.sampled_from(["POST", "PUT", "PATCH", "GET", "DELETE"]),
    query=queries,
    headers=mapped_headers(),
    body=bodies,
)
async def test_mapped_hook(
    service: RunningService, method: str, query: str, headers: dict[str, str], body: bytes
) -> None:
    await _check(service, method, f"/hooks/mapped?{query}", body, headers)


@pytest.mark.slow
@FUZZ
@given(
    body=bodies,
    signed=st.sampled_from(["right", "changed", "none", "random"]),
    event=st.sampled_from(["push", "issues"]) | header_values,
    content_type=content_types,
)
async def test_github_hook(
    service: RunningService, body: bytes, signed: str, event: str, content_type: str
) -> None:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": f"d-{next(_ids)}",
    }
    sent = body
    if signed != "none":
        headers["X-Hub-Signature-256"] = "sha256=" + digest if signed != "random" else digest[:7]
    if signed == "changed":
        sent = body + b" "
    status = await _check(service, "POST", "/hooks/github", sent, headers)
    if signed != "right":
        assert status == 401
