"""The router's glue, with stand-ins for the rules, the dispatcher and the audit, and for the
bus but in the last test (the state machines here are the router's own; tests/app/test_router.py
runs it whole on a real bus):

- its health (readiness reads it): a bus consumer that fails again and again turns it red,
  since events are still taken and answered 202 while none is routed; one that runs, idle or
  not, turns it green again;
- an event with several routes is settled only once every route has ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from eventbus._errors import StoreError
from eventbus.bus import NatsBusConfig, open_bus
from eventbus.config import NatsSettings
from eventbus.router import _router
from eventbus.router._router import Router
from eventbus.rules import Route
from tests.fixtures.nats import configured_nats_server, unique_name
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


class _Message:
    def __init__(self) -> None:
        self.event = {"specversion": "1.0", "id": "e1", "source": "tests/glue", "type": "t"}
        self.rejected = None
        self.via = "http"
        self.published_at = datetime.now(UTC)
        self.ref = "ref-1"
        self.payload = b"{}"
        self.deliveries = 1
        self.settled: list[tuple[str, float]] = []

    async def ack(self) -> None:
        self.settled.append(("ack", time.monotonic()))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", time.monotonic()))

    async def in_progress(self) -> None:
        pass


class _TwoRoutes:
    class current:  # the holder's attribute
        macros = False  # (every event routed on the loop: see eventbus.rules.routing)

        @staticmethod
        def route(event: dict[str, Any]) -> list[Route]:
            return [Route("r1", "a", event, True, None), Route("r2", "b", event, True, None)]


class _Audit:
    async def event_accepted(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def rule_matched(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def flush(self, **kwargs: Any) -> None:
        pass


class _Dispatcher:
    """Route "a" fails at once (its retry row could not be written); "b" takes a while."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, float]] = []

    async def dispatch(
        self, event: dict[str, Any], route: Route, acceptance: str | None = None
    ) -> None:
        if route.target == "a":
            raise StoreError("could not record a retry")
        await asyncio.sleep(0.3)
        self.ended.append((route.target, time.monotonic()))


async def test_an_event_is_settled_only_once_every_route_has_ended() -> None:
    async def set_aside(*args: Any) -> None:
        pass

    dispatcher = _Dispatcher()
    router = Router(None, _TwoRoutes(), dispatcher, _Audit(), set_aside)  # type: ignore[arg-type]
    msg = _Message()
    await router.handle(msg)  # type: ignore[arg-type]
    # the failing route naks the message (redelivered later), but only after "b" ended: it
    # had been left running, untracked, past the nak and past a shutdown's grace
    [(settled, at)] = msg.settled
    assert settled == "nak"
    [(target, ended)] = dispatcher.ended
    assert target == "b" and ended <= at


async def test_a_consumer_the_nats_user_may_not_create_turns_the_router_red(
    tmp_path: Path,
) -> None:
    # The same on a real nats-server: a user allowed everything but creating consumers. The
    # service took events (answered 202) and routed none while /readyz said ok.
    config = """
jetstream { store_dir: "{store}" }
authorization { users: [
  {user: router, password: "router-password-01",
   permissions: {
     publish: {allow: [">"],
               deny: ["$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>"]},
     subscribe: {allow: [">"]}}}
] }
"""
    async with configured_nats_server(tmp_path / "nats", config) as port:
        stream = unique_name("S")
        url = f"nats://127.0.0.1:{port}"
        bus_config = NatsBusConfig(
            url=url,
            stream=stream,
            subject=f"{stream}.events",
            durable=unique_name("d"),
            connect_timeout=3.0,
            auth=NatsSettings.model_validate(
                {"url": url, "user": "router", "password": "router-password-01"}
            ),
        )
        async with open_bus(bus_config) as bus:
            router = Router(bus, None, None, None, None)  # type: ignore[arg-type]
            running = asyncio.create_task(router._run())
            try:
                await eventually(
                    lambda: not router.health(stall_after=1.0)[0], within=60, every=0.2
                )
                _, why = router.health(stall_after=1.0)
                assert why.startswith("the bus consumer failing for"), why
                # the server's own words, not a timeout: it answers such a request with an
                # error on the connection, and the request itself times out
                assert "create consumer" in why and "permissions violation" in why.lower(), why
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
