"""Property test of the whole HTTP edge against its own OpenAPI document (``/openapi.json``),
with schemathesis: requests generated from the document, valid and invalid, sent to one running
service (real NATS and PostgreSQL).

The property: no request, valid or not (schemathesis's positive and negative modes), is
answered 5xx, and every answer conforms to the document (a documented status, content type,
headers and body schema). The requests go out through
schemathesis's own HTTP client in a worker thread, so the service keeps running on the test's
event loop meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks

from eventbus.bus._nats_server import free_port
from tests.fixtures.service import RunningService, StartService
from tests.fuzz._inputs import FUZZ

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture
async def service(eventbus: StartService) -> AsyncIterator[tuple[RunningService, Any]]:
    """A service with dead letters in it, and its OpenAPI document loaded by schemathesis."""
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    svc = await eventbus(
        rules="- name: all\n  targets: [dead]\n",
        targets=[{"name": "dead", "type": "http", "url": dead, "delivery": {"retry": "none"}}],
    )
    for i in range(3):
        event = {"specversion": "1.0", "id": f"oa-{i}", "source": "tests/fuzz", "type": "t"}
        status, _ = await svc.post_event(event)
        assert status == 202
    _, _, document = await svc.request("GET", "/openapi.json")
    # The live stream answers a valid request with a stream that never ends: its own fuzz
    # test (test_console_fuzz.py) opens it and reads the first message instead.
    schema = schemathesis.openapi.from_dict(document).exclude(path="/events/live")
    yield svc, schema
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body


def _call(case: Any, base_url: str) -> Any:
    response = case.call(base_url=base_url, timeout=30)
    case.validate_response(response, checks=CHECKS)
    return response


@pytest.mark.slow
@FUZZ
@given(data=st.data())
async def test_every_answer_conforms_to_the_document(
    service: tuple[RunningService, Any], data: st.DataObject
) -> None:
    svc, schema = service
    case = data.draw(
        st.one_of(
            schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
            schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        ),
        label="request",
    )
    await asyncio.to_thread(_call, case, svc.url)
