"""LazyClient: one background start shared by concurrent callers, retried after a failure."""

from __future__ import annotations

import asyncio
import logging

import pytest

from eventbus.targets import _lazy as lazy_module
from eventbus.targets._lazy import LazyClient

log = logging.getLogger("tests.targets.lazy")


class _Conn:
    def __init__(self, number: int) -> None:
        self.number = number
        self.alive = True


class _Starter:
    """Starts numbered connections; fails while ``failures`` is positive; waits for ``gate``."""

    def __init__(self, failures: int = 0) -> None:
        self.calls = 0
        self.failures = failures
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> _Conn:
        self.calls += 1
        await self.gate.wait()
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionRefusedError("refused")
        return _Conn(self.calls)


def _lazy(starter: _Starter) -> LazyClient[_Conn]:
    return LazyClient(
        starter,
        owner="test client",
        usable=lambda conn: conn.alive,
        log=log,
        failed="test client: cannot start",
        task_name="test-start",
    )


async def test_concurrent_callers_share_one_start() -> None:
    starter = _Starter()
    starter.gate.clear()
    client = _lazy(starter)
    client.open()
    waiting = [asyncio.create_task(client.get()) for _ in range(5)]
    await asyncio.sleep(0)
    starter.gate.set()
    conns = await asyncio.gather(*waiting)
    assert starter.calls == 1
    assert {conn.number for conn in conns} == {1}
    assert await client.close() is conns[0]


async def test_failed_start_is_logged_and_retried_by_the_next_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    starter = _Starter(failures=1)
    client = _lazy(starter)
    with caplog.at_level(logging.WARNING, logger=log.name), pytest.raises(ConnectionRefusedError):
        await client.get()
    assert "test client: cannot start: ConnectionRefusedError" in caplog.text
    conn = await client.get()
    assert (starter.calls, conn.number) == (2, 2)
    assert await client.close() is conn


async def test_failed_starts_are_warned_of_once_a_period_with_how_many_more(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each call while the broker was down began a start, and each failed start a warning:
    # a line per synchronous invocation.
    monkeypatch.setattr(lazy_module, "FAILED_SAID_EVERY", 0.3)
    starter = _Starter(failures=6)
    client = _lazy(starter)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(5):
            with pytest.raises(ConnectionRefusedError):
                await client.get()
        await asyncio.sleep(0.35)
        with pytest.raises(ConnectionRefusedError):
            await client.get()
        await client.close()  # tells what it counted since
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    failed = "test client: cannot start: ConnectionRefusedError('refused')"
    assert said == [
        failed,
        f"{failed} (3 more failed starts not shown)",  # the period's end tells the other 4
        failed,  # the sixth, told at the close
    ], said


async def test_unusable_client_is_replaced() -> None:
    starter = _Starter()
    client = _lazy(starter)
    first = await client.get()
    assert await client.get() is first
    first.alive = False
    second = await client.get()
    assert (first.number, second.number) == (1, 2)
    assert await client.close() is second


async def test_cancelled_caller_does_not_cancel_the_start() -> None:
    starter = _Starter()
    starter.gate.clear()
    client = _lazy(starter)
    impatient = asyncio.create_task(client.get())
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    starter.gate.set()
    conn = await client.get()
    assert (starter.calls, conn.number) == (1, 1)
    await client.close()


async def test_close_cancels_a_pending_start_and_returns_nothing() -> None:
    starter = _Starter()
    starter.gate.clear()
    client = _lazy(starter)
    client.open()
    await asyncio.sleep(0)
    assert await client.close() is None
    assert await client.close() is None


async def test_open_twice_and_use_before_open_are_errors() -> None:
    client = _lazy(_Starter())
    with pytest.raises(RuntimeError, match="test client is not open"):
        client.check_open()
    client.open()
    client.check_open()
    with pytest.raises(RuntimeError, match="test client is already open"):
        client.open()
    await client.close()
    with pytest.raises(RuntimeError, match="not open"):
        client.check_open()
