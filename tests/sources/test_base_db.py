"""The framework against a real PostgreSQL: checkpoints and source dead letters."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from eventbus._errors import BusUnavailable, StoreUnavailable
from eventbus.sources import Checkpoints, list_dead_letters
from eventbus.sources import _base as base_module
from eventbus.sources import _checkpoints as checkpoints_module
from eventbus.sources._base import MAX_SET_ASIDE
from tests.fixtures.wait import eventually
from tests.sources._harness import Recorder, make_context, source_pool


async def test_checkpoints_are_scoped_per_source_and_upserted(database_dsn: str) -> None:
    async with source_pool(database_dsn) as pool:
        a, b = Checkpoints(pool, "a"), Checkpoints(pool, "b")
        assert await a.get("offset") is None
        await a.put("offset", {"pos": 1, "path": "/x"})
        await a.put("offset", {"pos": 2, "path": "/x"})
        await b.put("offset", 99)
        await a.put_many({"o:k1": "e1", "o:k2": ["e2", 3]})
        assert await a.get("offset") == {"pos": 2, "path": "/x"}
        assert await b.get("offset") == 99
        assert await a.items("o:") == {"o:k1": "e1", "o:k2": ["e2", 3]}
        assert await b.items("o:") == {}
        # starts_with, not LIKE: a prefix containing LIKE wildcards is taken literally.
        await a.put("o_x", 1)
        assert set(await a.items("o:")) == {"o:k1", "o:k2"}


async def test_a_key_with_nul_is_kept_as_it_is(database_dsn: str) -> None:
    # An S3 object key may hold NUL, which PostgreSQL's text refuses: its checkpoint failed to
    # write at every scan and the source stopped there, every newer object waiting.
    async with source_pool(database_dsn) as pool:
        cp = Checkpoints(pool, "s3")
        odd = ["o:a\x00b", "o:\x1b0\x00", "o:\x1b\x1b\x00\x1b", "o:\x1b0 plain"]
        await cp.put_many({key: i for i, key in enumerate(odd)})
        assert await cp.items("o:") == {key: i for i, key in enumerate(odd)}
        assert await cp.get("o:a\x00b") == 0
        await cp.delete_many(["o:a\x00b"])
        assert set(await cp.items("o:")) == set(odd[1:])


async def test_dead_letters_keep_payload_error_and_meta(database_dsn: str) -> None:
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "logs", Recorder())
        await ctx.dead_letter("<34>garbage", "no PRI", {"peer": "127.0.0.1"})
        await ctx.dead_letter(b"\xff\xfe", "binary junk")
        other = make_context(pool, "other", Recorder())
        await other.dead_letter("x", "other source")

        listed = await list_dead_letters(pool, source="logs")
        assert [d["error"] for d in listed] == ["binary junk", "no PRI"]
        assert listed[0]["payload_base64"] == "//4="
        assert listed[1]["payload"] == "<34>garbage"
        assert listed[1]["meta"] == {"peer": "127.0.0.1"}
        assert len(await list_dead_letters(pool)) == 3
        assert ctx.status.errors == 2
        assert ctx.status.last_error == "binary junk"
        with pytest.raises(ValueError, match="limit"):
            await list_dead_letters(pool, limit=0)


async def test_dead_letters_are_written_at_a_bounded_rate_and_said_in_summary(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Garbage sent to a syslog port wrote 1,700 rows and as many warnings a second, for as
    # long as it came.
    monkeypatch.setattr(base_module, "SET_ASIDE_RATE", 40.0)
    monkeypatch.setattr(base_module, "SET_ASIDE_BURST", 5.0)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "flood", Recorder())
        began = time.monotonic()
        for n in range(25):
            await ctx.dead_letter(f"junk {n}", "no PRI")
        took = time.monotonic() - began
        assert len(await list_dead_letters(pool, source="flood")) == 25
    # 20 past the burst at 40 a second: half a second at least (a lower bound: a slow
    # machine only adds to it)
    assert took >= 0.45, took
    said = [r.getMessage() for r in caplog.records if "source flood" in r.getMessage()]
    assert said == ["source flood: dead-lettered input: no PRI"], said
    assert ctx.status.errors == 25


async def test_the_dead_letters_after_a_warning_are_told_at_the_end_of_its_period(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # After a burst the one warning was all: "(and 1499 more)" came only with a later dead
    # letter, and never if none came.
    monkeypatch.setattr(base_module, "SET_ASIDE_SAID_EVERY", 0.5)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "burst", Recorder())
        for n in range(6):
            await ctx.dead_letter(f"junk {n}", "no PRI" if n < 5 else "last one")

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if "source burst" in r.getMessage()]

        await eventually(lambda: len(said()) == 2, what="the summary warning")
        assert said() == [
            "source burst: dead-lettered input: no PRI",
            "source burst: dead-lettered input: last one (and 4 more since the last warning)",
        ]
        await asyncio.sleep(0.7)
        assert len(said()) == 2  # nothing more to tell, nothing more told
        # the source stopping within a period: what it counted is told then (it was lost)
        for n in range(3):
            await ctx.dead_letter(f"late {n}", "stopping")
        ctx.flush_warnings()
        assert said()[2:] == [
            "source burst: dead-lettered input: stopping",
            "source burst: dead-lettered input: stopping (and 1 more since the last warning)",
        ]


async def test_a_dead_letter_written_ends_a_backoff(database_dsn: str) -> None:
    # A source whose dead letter could not be written (the database held) showed backoff, its
    # error, until its next event: minutes or hours for a quiet one, though it was working.
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "hiccup", Recorder())
        ctx.report_error(StoreUnavailable("the database did not answer"))
        assert ctx.status.state == "backoff"
        await ctx.dead_letter("junk", "not JSON")
        assert ctx.status.state == "running"
        assert ctx.status.last_error == "not JSON"
        # backing off from the bus: a dead letter written says nothing of it
        ctx.report_error(BusUnavailable("the bus is down"))
        await ctx.dead_letter("junk", "not JSON")
        assert ctx.status.state == "backoff"


async def test_connected_again_clears_a_broker_failure_not_the_buss(database_dsn: str) -> None:
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "broker", Recorder())
        ctx.report_error(ConnectionError("nats: no servers available for connection"))
        ctx.connected()
        assert (ctx.status.state, ctx.status.last_error) == ("running", None)
        for failure in (BusUnavailable("the bus is down"), StoreUnavailable("no answer")):
            ctx.report_error(failure)
            ctx.connected()  # its broker took it again: the bus or database may still be down
            assert (ctx.status.last_error or "").endswith(str(failure))


async def test_lossy_input_past_the_rate_is_counted_not_waited_for(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Datagrams: waiting for a dead letter's place held up every other sender's messages
    # behind one sender's garbage. Past the rate they are counted and not kept.
    monkeypatch.setattr(base_module, "SET_ASIDE_RATE", 2.0)
    monkeypatch.setattr(base_module, "SET_ASIDE_BURST", 5.0)
    monkeypatch.setattr(base_module, "SET_ASIDE_SAID_EVERY", 0.0)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "udp", Recorder())
        for n in range(25):
            await ctx.dead_letter(f"junk {n}", "no PRI", lossy=True)
        kept = await list_dead_letters(pool, source="udp")
    assert 5 <= len(kept) < 25, len(kept)
    assert ctx.status.errors == 25
    said = [r.getMessage() for r in caplog.records if "source udp" in r.getMessage()]
    assert any("not kept: over 2 a second" in line for line in said), said


async def test_a_listing_reads_only_the_start_of_each_payload_when_asked(
    database_dsn: str,
) -> None:
    # Fifty set-aside messages of 5 MB made the console read 262 MB every 5 s to show 200
    # characters of each.
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "big", Recorder())
        # 6 MB of two-byte characters, of which the first 256 KiB are kept
        await ctx.dead_letter("é" * 3_000_000, "too big")
        await ctx.dead_letter(b"\xff" * 1000, "binary")
        binary, text = await list_dead_letters(pool, source="big", payload_bytes=201)
        # cut inside a character: the half is left out, the text stays text
        assert text["payload"] == "é" * 100 and text["payload_size"] == MAX_SET_ASIDE
        assert (text["meta"]["size"], text["meta"]["kept"]) == (6_000_000, MAX_SET_ASIDE)
        assert binary["payload_base64"] == "/" * 268 and binary["payload_size"] == 1000
        whole, _ = await list_dead_letters(pool, source="big", limit=2)
        assert whole["payload_size"] == 1000 and len(whole["payload_base64"]) == 1336


async def test_a_checkpoint_the_database_does_not_answer_for_fails_in_time(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpoint reads and writes waited as long as PostgreSQL did: a frozen one held an s3
    # poll (showing running) until its lease ran out, a source without a lease for ever.
    monkeypatch.setattr(checkpoints_module, "CHECKPOINT_TIMEOUT", 0.5)
    monkeypatch.setattr(checkpoints_module, "READ_ALL_TIMEOUT", 0.5)
    async with source_pool(database_dsn) as pool:
        cp = Checkpoints(pool, "held")
        await cp.put("k", 1)
        blocker = await asyncpg.connect(database_dsn)
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE source_checkpoints IN ACCESS EXCLUSIVE MODE")
                for operation in (cp.get("k"), cp.items(), cp.put("k", 2), cp.delete_many(["k"])):
                    # without the deadline: the wait_for's TimeoutError, the lock held for ever
                    with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5\d* s"):
                        await asyncio.wait_for(operation, 10)
        finally:
            await blocker.close()
        assert await cp.get("k") == 1
