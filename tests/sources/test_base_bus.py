"""Sources end to end: SourceRunner publishing onto the real JetStream bus, restarted midway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from eventbus.bus import NatsBusConfig, open_bus
from eventbus.sources import Checkpoints, SourceRunner, build_source
from tests.fixtures.nats import unique_name
from tests.fixtures.wait import eventually
from tests.sources._harness import WAIT, source_pool


async def _take(bus: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        async for message in bus.messages():
            events.append(message.event)
            await message.ack()
            if len(events) == count:
                return events
    raise AssertionError("bus closed early")


async def _checkpointed(pool: Any, offset: int) -> bool:
    saved = await Checkpoints(pool, "app").items()
    return [v["offset"] for k, v in saved.items() if k != "started"] == [offset]


async def test_runner_puts_log_lines_on_the_bus_across_restart(
    tmp_path: Path, database_dsn: str, nats_url: str
) -> None:
    config = NatsBusConfig(
        url=nats_url,
        stream=unique_name("src"),
        subject=unique_name("src"),
        durable=unique_name("src"),
    )
    log = tmp_path / "app.log"
    log.write_text("one\ntwo\n")
    spec = {"name": "app", "type": "log-tail", "path": str(log), "interval": 0.02}
    async with source_pool(database_dsn) as pool, open_bus(config) as bus:
        async with SourceRunner([build_source(spec)], pool=pool, publish=bus.publish) as runner:
            first = await _take(bus, 2)
            [status] = runner.statuses()
            assert status.state == "running"
            assert status.events == 2
            await eventually(lambda: _checkpointed(pool, len("one\ntwo\n")))
        log.write_text("one\ntwo\nthree\n")
        async with SourceRunner([build_source(spec)], pool=pool, publish=bus.publish):
            second = await _take(bus, 1)
    assert [e["data"]["message"] for e in first + second] == ["one", "two", "three"]
    assert first[0]["type"] == "eventbus.log.line"
    assert first[0]["source"] == "urn:eventbus:source:app"
