"""The router's live feed on its own: publishing never waits, a watcher that falls behind
loses items (counted) while the others get everything, the number of watchers is bounded, and
a watcher that leaves is forgotten."""

from __future__ import annotations

import pytest

from eventbus.router import LiveFeed, Routed


def _item(i: int) -> Routed:
    return Routed({"id": str(i), "source": "s"}, "2026-01-01T00:00:00+00:00", (), "unmatched")


async def test_a_slow_watcher_loses_items_the_others_do_not() -> None:
    feed = LiveFeed(per_watcher=10)
    assert not feed.watched
    with feed.watch() as slow, feed.watch() as fast:
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
