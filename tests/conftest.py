"""Shared fixtures: each real server (NATS, Kafka/Tansu, PostgreSQL, a function endpoint) lives
in its own plugin module under ``tests/fixtures`` and is started once per session, on a free
loopback port, and stopped at the end."""

import asyncio
import inspect
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from eventbus._tasks import cancel_and_wait, report_stuck

pytest_plugins = [
    "tests.fixtures.nats",
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.postgres_tls",
    "tests.fixtures.receiver",
    "tests.fixtures.service",
    "tests.fixtures.browser",
]


@pytest_asyncio.fixture
async def _report_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test that will hit pytest-timeout logs, shortly before, where each of its asyncio
    tasks waits (pytest-timeout's own dump shows threads only: the event loop's selector)."""
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else request.config.getini("timeout")
    watchdog = asyncio.create_task(report_stuck("test", max(1.0, float(timeout) - 20)))
    try:
        yield
    finally:
        await cancel_and_wait(watchdog)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "obj", None)):
            item.fixturenames.append("_report_stuck")  # type: ignore[attr-defined]
