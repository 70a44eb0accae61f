"""Shared fixtures: each real server (NATS, Kafka/Tansu, PostgreSQL, a function endpoint) lives
in its own plugin module under ``tests/fixtures`` and is started once per session, on a free
loopback port, and stopped at the end."""

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from eventbus._tasks import cancel_and_wait, report_stuck

pytest_plugins = [
    "tests.fixtures.nats",
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.postgres_tls",
    "tests.fixtures.rabbitmq_tls",
    "tests.fixtures.receiver",
    "tests.fixtures.service",
    "tests.fixtures.browser",
]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening, held for the whole test: it refuses every
    connection, and no server started meanwhile by another test can take it over (a port
    freed by stopping a server can be)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def _timeout(request: pytest.FixtureRequest) -> float | None:
    """The test's pytest-timeout limit in seconds (marker, --timeout, then the ini file), or
    None when it has none (0, or pytest-timeout not loaded)."""
    marker = request.node.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    else:
        value = request.config.getoption("timeout", default=None)
        if value is None:
            try:
                value = request.config.getini("timeout")
            except ValueError:  # -p no:timeout
                return None
    return float(value) if value else None


@pytest_asyncio.fixture
async def _report_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test that will hit pytest-timeout logs, shortly before, where each of its asyncio
    tasks waits (pytest-timeout's own dump shows threads only: the event loop's selector).
    Set up before the test's other fixtures and torn down after them, so a hang in their
    teardown is reported too."""
    timeout = _timeout(request)
    if timeout is None:
        yield
        return
    watchdog = asyncio.create_task(report_stuck("test", max(1.0, timeout - 20)))
    try:
        yield
    finally:
        await cancel_and_wait(watchdog)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names: list[str] = item.fixturenames  # type: ignore[attr-defined]
        if inspect.iscoroutinefunction(getattr(item, "obj", None)) and "_report_stuck" not in names:
            names.insert(0, "_report_stuck")
