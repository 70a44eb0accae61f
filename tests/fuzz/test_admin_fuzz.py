"""Fuzzing the admin API's query and path parameters on one running service (real NATS and
PostgreSQL, with dead letters in it): the event trail, the dead letters (list, show, replay,
purge, by one id or several and by filter), the sources' dead letters and the pending retries
(by event, by target).

The property: no parameter value is a 5xx, every 4xx is problem+json, and the service is ready
afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus.bus._nats_server import free_port
from tests.fixtures.service import RunningService, StartService
from tests.fuzz._checks import check_answer
from tests.fuzz._inputs import FUZZ, query_values, url_part

FILTERS = ("id", "rule", "target", "status", "reason", "since", "until", "source")


@pytest.fixture
async def service(eventbus: StartService) -> AsyncIterator[RunningService]:
    """A service with a few dead letters, shared by a test's examples; ready after the last."""
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    svc = await eventbus(
        rules="- name: all\n  targets: [dead]\n",
        targets=[{"name": "dead", "type": "http", "url": dead, "delivery": {"retry": "none"}}],
    )
    for i in range(3):
        event = {"specversion": "1.0", "id": f"dl-{i}", "source": "tests/fuzz", "type": "t"}
        status, _ = await svc.post_event(event)
        assert status == 202
    yield svc
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body


def _query(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{url_part(name)}={url_part(value)}" for name, value in params)


parameters = st.lists(
    st.tuples(st.sampled_from((*FILTERS, "limit", "after", "all")), query_values), max_size=5
)


@FUZZ
@given(
    method_path=st.sampled_from(
        [("GET", "/dead-letters"), ("POST", "/dead-letters/replay"), ("DELETE", "/dead-letters")]
    ),
    params=parameters,
)
async def test_dead_letter_filters(
    service: RunningService, method_path: tuple[str, str], params: list[tuple[str, str]]
) -> None:
    method, path = method_path
    await check_answer(service, method, f"{path}?{_query(params)}", None, {})


@FUZZ
@given(
    template=st.sampled_from(
        [
            ("GET", "/dead-letters/{}"),
            ("DELETE", "/dead-letters/{}"),
            ("POST", "/dead-letters/{}/replay"),
            ("POST", "/targets/{}/enable"),
        ]
    ),
    value=query_values,
)
async def test_path_parameters(
    service: RunningService, template: tuple[str, str], value: str
) -> None:
    method, path = template
    await check_answer(service, method, path.format(url_part(value) or "%20"), None, {})


@FUZZ
@given(
    path=st.sampled_from(["/events/trail", "/sources/dead-letters", "/retries"]),
    params=st.lists(
        st.tuples(
            st.sampled_from(["source", "id", "limit", "payload_bytes", "target"]), query_values
        ),
        max_size=4,
    ),
)
async def test_read_parameters(
    service: RunningService, path: str, params: list[tuple[str, str]]
) -> None:
    await check_answer(service, "GET", f"{path}?{_query(params)}", None, {})
