"""The source framework without servers: registry, config errors, clock, runner supervision."""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
import pytest

from eventbus._errors import ConfigError
from eventbus.config import SourceSpec
from eventbus.sources import (
    SourceContext,
    SourceRunner,
    SourceStatus,
    build_source,
    register_source,
)
from tests.sources._harness import ManualClock


class _EchoSpec(SourceSpec):
    count: int = 1
    fail_times: int = 0


class _Echo:
    """Fails ``fail_times`` runs, then emits ``count`` events and waits to be cancelled."""

    runs = 0

    def __init__(self, config: _EchoSpec) -> None:
        self.name = config.name
        self.type = config.type
        self.config = config

    async def run(self, ctx: SourceContext) -> None:
        type(self).runs += 1
        if type(self).runs <= self.config.fail_times:
            raise RuntimeError(f"boom {type(self).runs}")
        for i in range(self.config.count):
            await ctx.emit({"id": str(i)})
        await asyncio.Event().wait()


register_source("test-echo", _EchoSpec, _Echo)


class _BrokenSpec(SourceSpec):
    pass


class _Broken:
    def __init__(self, config: _BrokenSpec) -> None:
        self.name = config.name
        self.type = config.type

    async def run(self, ctx: SourceContext) -> None:
        raise ConfigError("directory does not exist")


register_source("test-broken", _BrokenSpec, _Broken)


def test_build_source_validates_settings() -> None:
    src = build_source({"name": "a", "type": "test-echo", "count": 3})
    assert isinstance(src, _Echo)
    assert src.name == "a"
    assert src.type == "test-echo"  # from the registration, written nowhere else
    assert src.config.count == 3


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"name": "a", "type": "nope"}, r"unknown source type 'nope' \(known: .*test-echo"),
        ({"type": "test-echo"}, "non-empty string 'name'"),
        ({"name": "a", "type": "test-echo", "cuont": 1}, "field 'cuont'"),
        ({"name": "a", "type": "test-echo", "count": "many"}, "field 'count'"),
        ({"name": "a b", "type": "test-echo"}, "field 'name'"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_build_source_rejects_bad_specs(spec: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_source(spec)


def test_register_requires_a_forbidding_source_spec_and_unique_names() -> None:
    class Loose(SourceSpec):
        model_config = pydantic.ConfigDict(extra="allow")

    class NotASource(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

    class Again(SourceSpec):
        pass

    with pytest.raises(ValueError, match="extra='forbid'"):
        register_source("test-loose", Loose, _Echo)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must derive from SourceSpec"):
        register_source("test-plain", NotASource, _Echo)  # type: ignore[arg-type, type-var]
    with pytest.raises(ValueError, match="already registered"):
        register_source("test-echo", Again, _Echo)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered as source type 'test-echo'"):
        register_source("test-echo-again", _EchoSpec, _Echo)


def test_status_to_dict() -> None:
    status = SourceStatus(name="a", type="t")
    assert status.to_dict() == {
        "name": "a",
        "type": "t",
        "state": "starting",
        "events": 0,
        "errors": 0,
        "last_event_at": None,
        "last_error": None,
        "lag": None,
    }


async def test_manual_clock_wakes_sleepers_in_order() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def sleeper(label: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(label)

    tasks = [asyncio.create_task(sleeper("late", 10)), asyncio.create_task(sleeper("early", 5))]
    async with asyncio.timeout(5):
        await clock.wait_for_sleepers(2)
    clock.advance(4)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(6)
    await asyncio.gather(*tasks)
    assert woke == ["early", "late"]


async def test_runner_restarts_failing_source_with_backoff_and_isolates_others() -> None:
    _Echo.runs = 0
    clock = ManualClock()
    published: list[dict[str, Any]] = []
    two_published = asyncio.Event()

    async def publish(event: dict[str, Any], *, via: str) -> None:
        assert via == "source:flaky"
        published.append(event)
        if len(published) == 2:
            two_published.set()

    flaky = build_source({"name": "flaky", "type": "test-echo", "count": 2, "fail_times": 2})
    broken = build_source({"name": "broken", "type": "test-broken"})
    runner = SourceRunner(
        [flaky, broken], pool=None, publish=publish, clock=clock, backoff_initial=1.0
    )  # type: ignore[arg-type]
    async with asyncio.timeout(5), runner:
        await clock.wait_for_sleepers(1)
        flaky_status, broken_status = runner.statuses()
        assert flaky_status.state == "backoff"
        assert flaky_status.last_error == "RuntimeError: boom 1"
        assert broken_status.state == "failed"
        clock.advance(1.0)
        await clock.wait_for_sleepers(1)  # second failure: now waiting 2 s
        clock.advance(1.0)
        await asyncio.sleep(0)
        assert published == []
        clock.advance(1.0)
        await two_published.wait()
        assert flaky_status.state == "running"
        assert flaky_status.errors == 2
        assert flaky_status.events == 2
    assert [s.state for s in runner.statuses()] == ["stopped", "failed"]


def test_runner_rejects_duplicate_names() -> None:
    a = build_source({"name": "same", "type": "test-echo"})
    b = build_source({"name": "same", "type": "test-echo"})
    with pytest.raises(ConfigError, match="duplicate source names: same"):
        SourceRunner([a, b], pool=None, publish=None)  # type: ignore[arg-type]
