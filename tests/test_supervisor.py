"""The supervisor's state machine on scripted servers (no processes): restart what died, back
off while a restart fails, fail liveness after enough failures, recover when it comes back."""

from __future__ import annotations

import asyncio

import pytest

from eventbus import _supervisor as supervisor_module
from eventbus._supervisor import Supervisor
from tests.fixtures.wait import eventually


class Scripted:
    """A server that is dead until restarted, and whose restarts fail ``failures`` times."""

    def __init__(self, name: str, failures: int = 0) -> None:
        self.name = name
        self.failures = failures
        self.up = True
        self.restarts = 0
        self.restarted = asyncio.Event()

    def alive(self) -> bool:
        return self.up

    async def restart(self) -> None:
        self.restarts += 1
        if self.failures:
            self.failures -= 1
            raise OSError(f"{self.name} will not start")
        self.up = True
        self.restarted.set()


async def test_a_dead_server_is_restarted_and_a_live_one_left_alone() -> None:
    dead, fine = Scripted("a"), Scripted("b")
    sup = Supervisor([dead, fine], check_every=0.01)
    sup.start()
    try:
        dead.up = False
        async with asyncio.timeout(10):
            await dead.restarted.wait()
        assert (dead.restarts, fine.restarts) == (1, 0)
        assert sup.failed is None
    finally:
        await sup.stop()


async def test_liveness_fails_after_repeated_failures_and_recovers() -> None:
    server = Scripted("nats-server", failures=4)
    sup = Supervisor(
        [server], check_every=0.01, backoff_first=0.01, backoff_max=0.02, give_up_after=3
    )
    sup.start()
    try:
        server.up = False
        await eventually(lambda: sup.failed is not None, within=10, every=0.005)
        assert sup.failed is not None
        assert "nats-server" in sup.failed and "will not start" in sup.failed
        async with asyncio.timeout(10):
            await server.restarted.wait()
        assert server.restarts == 5
        assert sup.failed is None
    finally:
        await sup.stop()


async def test_one_server_failing_to_come_back_does_not_hold_the_others() -> None:
    # One task watched both: while the nats-server's restarts failed (a read-only store), the
    # database died and was not seen until the nats-server was back.
    stuck, other = Scripted("nats-server", failures=10**6), Scripted("postgresql")
    sup = Supervisor([stuck, other], check_every=0.01, backoff_first=0.05, backoff_max=0.05)
    sup.start()
    try:
        stuck.up = False
        await eventually(lambda: stuck.restarts >= 2, within=10, every=0.01)
        other.up = False
        async with asyncio.timeout(10):
            await other.restarted.wait()
        assert not stuck.up
    finally:
        await sup.stop()


async def test_stop_is_idempotent_and_nothing_to_watch_is_fine() -> None:
    sup = Supervisor([])
    sup.start()
    await sup.stop()
    await sup.stop()
    assert sup.failed is None


class Unreadable(Scripted):
    """A server whose check raises (as reading /proc does out of file descriptors) ``times``
    times before it answers."""

    def __init__(self, name: str, times: int) -> None:
        super().__init__(name)
        self.times = times

    def alive(self) -> bool:
        if self.times:
            self.times -= 1
            raise OSError(24, "Too many open files")
        return self.up


async def test_a_check_that_raises_does_not_end_the_watching() -> None:
    # Out of file descriptors once, the check of /proc raised: the supervisor's task ended
    # silently, and a server killed afterwards was never restarted (liveness stayed green).
    server = Unreadable("postgres", times=3)
    sup = Supervisor([server], check_every=0.01)
    sup.start()
    try:
        await eventually(lambda: server.times == 0, within=10, every=0.005)
        assert sup.failed is None
        server.up = False
        async with asyncio.timeout(10):
            await server.restarted.wait()
        assert server.restarts == 1 and sup.failed is None
    finally:
        await sup.stop()


async def test_a_server_that_runs_but_is_stuck_is_restarted_and_not_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A nats-server whose store hit a full disk answered everything and stored nothing, and
    # stayed so after the space was freed: alive, so never restarted (by hand only).
    monkeypatch.setattr(supervisor_module, "STUCK_RETRY_FIRST", 0.3)
    server = Scripted("nats-server")
    stuck = ["no publish acknowledged for 30 s"]
    asked = 0

    async def probe() -> str | None:
        nonlocal asked
        asked += 1
        return stuck[0] if stuck else None

    sup = Supervisor([server], check_every=0.01)
    sup.restart_when_stuck("nats-server", probe)
    sup.start()
    try:
        async with asyncio.timeout(10):
            await server.restarted.wait()
        assert server.restarts == 1
        server.restarted.clear()
        await asyncio.sleep(0.1)  # still stuck, but restarted moments ago: not again yet
        assert server.restarts == 1
        async with asyncio.timeout(10):
            await server.restarted.wait()  # after the wait
        assert server.restarts == 2
        stuck.clear()  # unstuck: no more restarts
        seen = asked
        await eventually(lambda: asked > seen + 5, within=10, every=0.01)
        assert server.restarts == 2 and sup.failed is None
    finally:
        await sup.stop()
