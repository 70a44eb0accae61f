"""Fuzzing what a worker reads from another worker's live feed (``PeerFeed``, over real Unix
sockets): whatever bytes a peer sends after its greeting (garbage, cut frames, huge lengths,
JSON of the wrong shape, valid frames between them), the reading worker raises nothing, its
watchers get only well-formed items, and a real peer's items still reach them afterwards.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.router import LiveFeed, PeerFeed, Routed
from tests.fixtures.wait import eventually
from tests.fuzz._inputs import FUZZ, json_values


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


_GOOD = _frame(
    orjson.dumps(
        ["2026-01-01T00:00:00+00:00", ["r"], "delivered", {"id": "ok"}, [["r", "t", "delivered"]]]
    )
)

_chunks = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: _frame(json.dumps(v).encode())),
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
    st.just(_GOOD),
)


async def _fake_peer(path: Path, sent: bytes) -> asyncio.AbstractServer:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x01" + sent)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(greet, path=str(path))


@settings(FUZZ, max_examples=40)
@given(chunks=st.lists(_chunks, max_size=6))
def test_any_bytes_from_a_peer(chunks: list[bytes]) -> None:
    asyncio.run(_check(b"".join(chunks)))


async def _check(sent: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        fake = await _fake_peer(directory / "2", sent)
        feed = LiveFeed()
        try:
            async with PeerFeed(feed, directory, name="1", rescan=0.02) as peers:
                with feed.watch() as watcher:
                    await peers.joined()
                    fake.close()
                    (directory / "2").unlink()  # not found again by the next scan
                    await eventually(
                        lambda: "2" not in peers._peers, within=5, what="the fake peer read"
                    )
                    items = watcher.pending(1000)
                    assert all(isinstance(i, Routed) for i in items)
                    assert all(isinstance(i.event, dict) for i in items)
                    # a real worker joins afterwards: its items arrive
                    other = LiveFeed()
                    async with PeerFeed(other, directory, name="3"):
                        await eventually(lambda: other.watched, within=5, what="subscribed")
                        other.publish(Routed({"id": "real"}, "t", (), "unmatched"))
                        got = await asyncio.wait_for(watcher.get(), 5)
                        while got.event.get("id") != "real":
                            got = await asyncio.wait_for(watcher.get(), 5)
        finally:
            fake.close()
