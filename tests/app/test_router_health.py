"""The router's own health (readiness reads it): a bus consumer that fails again and again turns
it red, since events are still taken and answered 202 while none is routed; one that runs, idle
or not, turns it green again. The bus here is a stand-in: the state machine is the router's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from eventbus.router import _router
from eventbus.router._router import Router
from tests.fixtures.wait import eventually


class _Consumer:
    """``messages()`` fails while ``failing``, else waits, as an idle consumer does."""

    def __init__(self) -> None:
        self.failing = True
        self.attempts = 0

    async def messages(self) -> AsyncIterator[Any]:
        self.attempts += 1
        if self.failing:
            raise RuntimeError("consumer creation refused: permissions violation")
        await asyncio.Event().wait()
        yield None  # never reached: an idle consumer


async def test_a_consumer_failing_again_and_again_turns_the_router_red(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_router, "_HEALTHY_AFTER", 0.5)
    bus = _Consumer()
    router = Router(bus, None, None, None, None)  # type: ignore[arg-type]
    assert router.health() == (True, "ok")
    running = asyncio.create_task(router._run())
    try:
        await eventually(lambda: bus.attempts >= 3, within=30)  # one attempt a second
        healthy, why = router.health(stall_after=1.0)
        assert not healthy
        assert why.startswith("the bus consumer failing for") and "permissions violation" in why
        assert router.health(stall_after=60.0) == (True, "ok")  # not yet for that long
        bus.failing = False  # the next attempt runs, idle
        await eventually(lambda: bus.attempts >= 4, within=30)
        await asyncio.sleep(0.7)  # past _HEALTHY_AFTER without failing
        assert router.health(stall_after=1.0) == (True, "ok")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
