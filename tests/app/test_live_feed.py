"""The router's live feed on its own: publishing never waits, a watcher that falls behind
loses items (counted) while the others get everything, the number of watchers is bounded, and
a watcher that leaves is forgotten. And the feeds of several workers joined over their Unix
sockets (``PeerFeed``, real sockets in a temporary directory): a watcher of one sees what the
others route, a worker nobody watches sends nothing, a worker that restarts is found again, a
killed one's socket is cleared, shutting down tells watchers to leave."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventbus.router import LiveFeed, PeerFeed, Routed
from tests.fixtures.wait import eventually


def _item(i: int) -> Routed:
    return Routed({"id": str(i), "source": "s"}, "2026-01-01T00:00:00+00:00", (), "unmatched")


async def test_a_slow_watcher_loses_items_the_others_do_not() -> None:
    feed = LiveFeed(per_watcher=10)
    assert not feed.watched
    # a narrow filter's watcher, as slow: what it does not take never fills its queue
    narrow = feed.watch(lambda event: event["id"] in {"3", "24"})
    with feed.watch() as slow, feed.watch() as fast, narrow as picky:
        assert feed.watched
        got = []
        for i in range(25):
            feed.publish(_item(i))  # synchronous: there is nothing to wait on
            got.extend(fast.pending(100))
        assert [r.event["id"] for r in got] == [str(i) for i in range(25)]
        assert fast.dropped == 0
        kept = slow.pending(100)
        assert [r.event["id"] for r in kept] == [str(i) for i in range(10)]
        assert slow.dropped == 15
        assert slow.pending(100) == []
        assert [r.event["id"] for r in picky.pending(100)] == ["3", "24"]
        assert picky.dropped == 0
    assert not feed.watched


async def test_pending_takes_at_most_limit() -> None:
    feed = LiveFeed(per_watcher=10)
    with feed.watch() as watcher:
        for i in range(5):
            feed.publish(_item(i))
        assert len(watcher.pending(3)) == 3
        assert (await watcher.get()).event["id"] == "3"
        assert len(watcher.pending(3)) == 1


async def test_watchers_are_bounded() -> None:
    feed = LiveFeed(max_watchers=2)
    with (
        feed.watch(),
        feed.watch(),
        pytest.raises(OverflowError, match="2 watchers already"),
        feed.watch(),
    ):
        pass
    with feed.watch():
        pass  # room again once they left


@contextlib.asynccontextmanager
async def _worker(directory: Path, name: str) -> AsyncIterator[tuple[LiveFeed, PeerFeed]]:
    feed = LiveFeed()
    async with PeerFeed(feed, directory, name=name, rescan=0.05) as peers:
        yield feed, peers


async def test_a_watcher_of_one_worker_sees_what_every_worker_routes(tmp_path: Path) -> None:
    async with _worker(tmp_path, "1") as (a, a_peers), _worker(tmp_path, "2") as (b, _):
        assert not a.watched and not b.watched  # nobody watches: nothing is sent anywhere
        with a.watch() as watcher:
            await a_peers.joined()
            assert b.watched and not b._watchers  # a subscription from a, no watcher of b's
            big = {"id": "big", "source": "s", "data": "x" * 300_000}
            each = (("r1", "fn", "delivered"), ("r2", "fn", "retrying"))
            routed = Routed(big, "2026-01-01T00:00:00+00:00", ("r1", "r2"), "retrying", each)
            b.publish(routed)
            # a delivery from b's retry schedule that ended: an update, without a time
            retried = Routed(big, None, ("r2",), "delivered", (("r2", "fn", "delivered"),))
            b.publish(retried)
            a.publish(_item(1))
            for i in range(2, 500):
                b.publish(_item(i))
            got = [await asyncio.wait_for(watcher.get(), 5) for _ in range(501)]
        assert sorted(r.event["id"] for r in got) == sorted(
            ["big", "big", *(str(i) for i in range(1, 500))]
        )
        assert [r for r in got if r.event["id"] == "big"] == [routed, retried]
        # the last watcher of a left: b stops sending
        await eventually(lambda: not b.watched, within=5, what="b's sink gone")


async def test_a_restarted_worker_is_found_again(tmp_path: Path) -> None:
    async with _worker(tmp_path, "1") as (a, a_peers):
        with a.watch() as watcher:
            await a_peers.joined()
            for _ in range(2):  # two lives of worker 2 under one name
                async with _worker(tmp_path, "2") as (b, _):
                    await eventually(lambda: b.watched, within=5, what="a subscribed to b")
                    b.publish(_item(7))
                    assert (await asyncio.wait_for(watcher.get(), 5)).event["id"] == "7"
        assert os.listdir(tmp_path) == ["1"]  # each removed its socket


async def test_a_killed_workers_socket_is_cleared(tmp_path: Path) -> None:
    # a worker that listens at its pid's name and is killed: the socket file stays behind
    code = (
        "import os, socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(os.path.join(sys.argv[1], str(os.getpid())))\n"
        "s.listen()\n"
        "print('listening', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and await proc.stdout.readline() == b"listening\n"
    finally:
        proc.kill()
        await proc.wait()
    left = tmp_path / str(proc.pid)
    assert left.exists()
    async with _worker(tmp_path, "1") as (a, a_peers):
        with a.watch():
            await a_peers.joined()
            await eventually(lambda: not left.exists(), within=5, what="its socket cleared")


async def test_shutting_down_tells_watchers_to_leave() -> None:
    feed = LiveFeed()
    with feed.watch() as early:
        feed.close()
        assert early.closed.is_set()
        with feed.watch() as late:
            assert late.closed.is_set()


async def test_a_watcher_arriving_as_the_last_leaves_still_sees_every_worker(
    tmp_path: Path,
) -> None:
    async with _worker(tmp_path, "1") as (a, a_peers), _worker(tmp_path, "2") as (b, _):
        with a.watch():
            await a_peers.joined()
        with a.watch() as watcher:  # in the same turn of the loop as the last one left
            await a_peers.joined()
            await eventually(lambda: b.watched, within=5, what="a subscribed to b again")
            b.publish(_item(1))
            assert (await asyncio.wait_for(watcher.get(), 5)).event["id"] == "1"
