"""The nats and jetstream sources against real nats-servers, real Postgres and the real bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import nats
import nats.js.errors
import orjson
import psutil
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo

from eventbus._errors import ConfigError
from eventbus.bus import NatsServer
from eventbus.sources import SourceContext, build_source
from eventbus.sources import _nats as nats_source_module
from eventbus.sources._nats import JetStreamSource, NatsSource
from tests.fixtures.nats import configured_nats_server, unique_name
from tests.fixtures.wait import eventually
from tests.sources._harness import dead_letters, running, source_pool
from tests.sources.test_queue_support import BusTap, bus_tap, context


def ce(i: int | str) -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": f"m{i}", "source": "/s", "type": "t"})


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


async def stream(nc: Client) -> tuple[str, str]:
    """A fresh stream and the subject prefix it captures."""
    name, prefix = unique_name("IN"), unique_name("in")
    await nc.jetstream().add_stream(name=name, subjects=[f"{prefix}.>"])
    return name, prefix


def jetstream(name: str, url: str, stream_name: str, **settings: Any) -> JetStreamSource:
    spec = {"name": name, "type": "jetstream", "url": url, "stream": stream_name, **settings}
    source = build_source(spec)
    assert isinstance(source, JetStreamSource)
    return source


async def consumer(nc: Client, stream_name: str, source: str) -> ConsumerInfo:
    return await nc.jetstream().consumer_info(stream_name, f"eventbus-source-{source}")


async def _backing_off(ctx: SourceContext) -> bool:
    return ctx.status.state == "backoff"


async def test_jetstream_messages_arrive_and_malformed_ones_are_kept(
    nats_url: str, database_dsn: str
) -> None:
    async with (
        client(nats_url) as nc,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        name, prefix = await stream(nc)
        js = nc.jetstream()
        await js.publish(f"{prefix}.a", ce(1))
        binary = {"ce-specversion": "1.0", "ce-id": "m2", "ce-source": "/b", "ce-type": "t.b"}
        await js.publish(f"{prefix}.b", b'{"x": 1}', headers=binary)
        await js.publish(f"{prefix}.c", b"\x00garbage", headers={"ce-type": "t.c"})
        await js.publish(f"{prefix}.a", ce(3))
        ctx = context(pool, "js", tap, type="jetstream")
        async with running(jetstream("js", nats_url, name), ctx):
            events = await tap.take(3)

            async def all_acked() -> bool:
                info = await consumer(nc, name, "js")
                return info.num_ack_pending == 0 and info.num_pending == 0

            await eventually(all_acked)
        assert [e["id"] for e in events] == ["m1", "m2", "m3"]
        assert events[1]["source"] == "/b" and events[1]["data"] == {"x": 1}
        rows = await dead_letters(pool, "js")
        assert [r["payload"] for r in rows] == [b"\x00garbage"]
        assert orjson.loads(rows[0]["meta"]) == {
            "stream": name,
            "sequence": 3,
            "subject": f"{prefix}.c",
            "headers": [{"name": "ce-type", "value": "t.c"}],  # a binary event's attributes
        }
        assert (ctx.status.events, ctx.status.errors, ctx.status.lag) == (3, 1, 0)


async def _hpub(url: str, subject: str, headers: list[bytes], payload: bytes) -> None:
    """Publish with header bytes as given, over the protocol itself (nats-py encodes header
    text as UTF-8, so it cannot send what another client may)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        await reader.readline()  # INFO
        head = b"NATS/1.0\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        options = {"headers": True, "verbose": False, "pedantic": False}
        if parts.username:
            options |= {"user": unquote(parts.username), "pass": unquote(parts.password or "")}
        writer.write(b"CONNECT " + orjson.dumps(options) + b"\r\n")
        writer.write(
            f"HPUB {subject} {len(head)} {len(head) + len(payload)}\r\n".encode()
            + head
            + payload
            + b"\r\nPING\r\n"
        )
        await writer.drain()
        assert (await reader.readline()).startswith(b"PONG"), "the server did not take it"
    finally:
        writer.close()


async def test_header_bytes_that_are_not_utf8_are_dead_lettered(
    nats_url: str, database_dsn: str
) -> None:
    # nats-py reads header values as UTF-8 with replacement: ce-id "\xff-y1" and "\xfe-y1"
    # both became "\ufffd-y1", the first was delivered under it and the bus dropped the second
    # as its duplicate, acked, with no dead letter, log line or error counted.
    async with (
        client(nats_url) as nc,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        name, prefix = await stream(nc)
        common = [b"ce-specversion: 1.0", b"ce-source: /b", b"ce-type: t"]
        for raw_id in (b"\xff-y1", b"\xfe-y1"):
            await _hpub(nats_url, f"{prefix}.a", [*common, b"ce-id: " + raw_id], b"{}")
        await nc.jetstream().publish(f"{prefix}.a", ce(3))
        ctx = context(pool, "js", tap, type="jetstream")
        async with running(jetstream("js", nats_url, name), ctx):
            events = await tap.take(1)
            await eventually(lambda: _errors_counted(ctx, 2), what="two errors counted")
        assert [e["id"] for e in events] == ["m3"]
        rows = await dead_letters(pool, "js")
        assert len(rows) == 2
        assert all("NATS header 'ce-id' is not UTF-8" in r["error"] for r in rows), rows


async def _errors_counted(ctx: SourceContext, n: int) -> bool:
    return ctx.status.errors == n


async def test_jetstream_raw_format_ids_are_stream_positions(
    nats_url: str, database_dsn: str
) -> None:
    async with (
        client(nats_url) as nc,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        name, prefix = await stream(nc)
        await nc.jetstream().publish(f"{prefix}.temp", b"21.5")
        await nc.jetstream().publish(f"{prefix}.note", b"plain words")
        source = jetstream(
            "raw", nats_url, name, format="raw", event_type="sensor", event_source="/nats"
        )
        async with running(source, context(pool, "raw", tap, type="jetstream")):
            first, second = await tap.take(2)
    # <stream>/<sequence>/<stored time, microseconds>: a stream made again numbers from 1
    assert (first["subject"], first["data"]) == (f"{prefix}.temp", 21.5)
    assert second["data"] == "plain words"
    for seq, event in enumerate((first, second), 1):
        stored = datetime.fromisoformat(event["time"])
        micros = (stored - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        assert event["id"] == f"{name}/{seq}/{micros}"
    assert first["type"] == "sensor" and first["source"] == "/nats"


@contextlib.asynccontextmanager
async def _loaded_stream(
    nats_url: str, database_dsn: str, count: int
) -> AsyncIterator[tuple[Client, asyncpg.Pool, BusTap, str, str]]:
    """A client, a source pool, a bus tap, and a fresh stream (its name and subject prefix)
    holding ``count`` CloudEvents with ids ``m0``, ``m1``..."""
    async with (
        client(nats_url) as nc,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        name, prefix = await stream(nc)
        for i in range(count):
            await nc.jetstream().publish(f"{prefix}.x", ce(i))
        yield nc, pool, tap, name, prefix


async def test_jetstream_bus_down_acks_nothing_and_restart_loses_nothing(
    nats_url: str, database_dsn: str
) -> None:
    async with _loaded_stream(nats_url, database_dsn, 3) as (nc, pool, tap, name, prefix):
        js = nc.jetstream()
        ctx = context(pool, "restart", tap, type="jetstream")
        async with running(jetstream("restart", nats_url, name), ctx):
            await tap.wait_published(3)
            tap.down = True
            for i in range(3, 6):
                await js.publish(f"{prefix}.x", ce(i))
            await tap.wait_refused(1)
            await eventually(lambda: _backing_off(ctx))
            # the three waiting (it said nothing while backing off)
            await eventually(lambda: ctx.status.lag == 3, what="the lag of a source backing off")
            info = await consumer(nc, name, "restart")
            assert info.ack_floor.stream_seq == 3  # nothing after the outage was acked
        # Stopped while the bus was down (a crash): more arrives, then the bus comes back.
        for i in range(6, 8):
            await js.publish(f"{prefix}.x", ce(i))
        tap.down = False
        async with running(jetstream("restart", nats_url, name), ctx):
            await tap.wait_published(8)

            async def all_acked() -> bool:
                return (await consumer(nc, name, "restart")).ack_floor.stream_seq == 8

            await eventually(all_acked)
        ids = [e["id"] for e in await tap.take(8)]
    assert sorted(ids) == [f"m{i}" for i in range(8)]


async def test_jetstream_batch_goes_to_the_bus_in_one_call_and_a_refused_message_comes_back(
    nats_url: str, database_dsn: str
) -> None:
    # Each message of a fetched batch waited for the bus's acknowledgement of the one before
    # it (a round trip per message). Now the batch is one call; the message the bus refused is
    # given back (nak) and comes again, the others are acknowledged.
    async with _loaded_stream(nats_url, database_dsn, 20) as (nc, pool, tap, name, _):
        ctx = context(pool, "batched", tap, type="jetstream")
        ctx.publish_many = tap.publish_many
        tap.refuse_once = {"m5"}
        async with running(jetstream("batched", nats_url, name), ctx):
            await tap.wait_published(20)

            async def all_acked() -> bool:
                info = await consumer(nc, name, "batched")
                return info.ack_floor.stream_seq == 20 and info.num_ack_pending == 0

            await eventually(all_acked)
        ids = [e["id"] for e in await tap.take(20)]
    assert sorted(ids) == sorted(f"m{i}" for i in range(20))
    assert tap.refused == 1 and max(tap.calls) > 1 and sum(tap.calls) == 21
    assert (ctx.status.events, ctx.status.errors) == (20, 1)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"ack_policy": AckPolicy.NONE}, "ack_policy none"),
        ({"deliver_subject": "push.here"}, "a push consumer"),
        ({"filter_subject": "{prefix}.a"}, "it filters {prefix}.a, the source reads {prefix}.b"),
        ({"max_deliver": 2}, "max_deliver 2"),
    ],
    ids=["acks-none", "push", "other-filter", "max-deliver"],
)
async def test_an_existing_consumer_the_source_cannot_read_by_is_refused(
    nats_url: str, database_dsn: str, settings: dict[str, Any], problem: str
) -> None:
    # A durable made beforehand was read as it was, its settings never looked at: with acks
    # none a message given back on a bus failure was lost, a push consumer read nothing, another
    # filter never read the subject asked for; the source said running.
    async with _loaded_stream(nats_url, database_dsn, 0) as (nc, pool, tap, name, prefix):
        config = {
            k: v.format(prefix=prefix) if isinstance(v, str) else v for k, v in settings.items()
        }
        await nc.jetstream().add_consumer(
            name, ConsumerConfig(durable_name="eventbus-source-premade", **config)
        )
        ctx = context(pool, "premade", tap, type="jetstream")
        source = jetstream("premade", nats_url, name, subject=f"{prefix}.b")
        async with running(source, ctx):
            await eventually(lambda: _backing_off(ctx))
        assert problem.format(prefix=prefix) in (ctx.status.last_error or ""), ctx.status


@contextlib.asynccontextmanager
async def _five_read(
    nats_url: str, database_dsn: str, source_name: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Client, BusTap, str, str]]:
    """A stream of five messages read by a running jetstream source, its consumer's ack floor
    (read every 0.1 s here) known to be 5; yields the client, the bus tap, the stream's name
    and its subject prefix."""
    monkeypatch.setattr(nats_source_module, "FLOOR_EVERY", 0.1)
    async with _loaded_stream(nats_url, database_dsn, 5) as (nc, pool, tap, name, prefix):
        ctx = context(pool, source_name, tap, type="jetstream")
        source = jetstream(source_name, nats_url, name)
        async with running(source, ctx):
            await tap.wait_published(5)
            await eventually(
                lambda: source._floor is not None and source._floor[1] == 5, what="floor read"
            )
            yield nc, tap, name, prefix


async def test_a_consumer_deleted_while_read_is_made_again_after_its_ack_floor(
    nats_url: str, database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Made again from the stream's start: every message older than the bus's duplicate window
    # reached the targets a second time (and bad ones were dead-lettered again). From the ack
    # floor as last read (every FLOOR_EVERY s), not from the last message this process acked:
    # one given back (nak) below it, or another instance's in flight, would be skipped.
    async with _five_read(nats_url, database_dsn, "deleted", monkeypatch) as (nc, tap, name, at):
        js = nc.jetstream()
        await js.delete_consumer(name, "eventbus-source-deleted")
        for i in range(5, 7):
            await js.publish(f"{at}.x", ce(i))
        await eventually(lambda: _acked_to(nc, name, "deleted", 7), what="the consumer again")
        ids = [e["id"] for e in await tap.take(7)]
    assert sorted(ids) == [f"m{i}" for i in range(7)]
    assert tap.published == 7  # the first five were not published again


async def test_a_stream_made_again_is_read_from_its_first_message(
    nats_url: str, database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its sequences start over: a consumer made again after the old stream's ack floor (5)
    # would skip the new stream's first five messages.
    async with _five_read(nats_url, database_dsn, "remade", monkeypatch) as (nc, tap, name, at):
        js = nc.jetstream()
        await js.delete_stream(name)
        await js.add_stream(name=name, subjects=[f"{at}.>"])
        for i in range(5, 8):
            await js.publish(f"{at}.x", ce(i))
        await tap.wait_published(8)
        ids = [e["id"] for e in await tap.take(8)]
    assert sorted(ids) == [f"m{i}" for i in range(8)]


async def _acked_to(nc: Client, stream_name: str, source: str, sequence: int) -> bool:
    try:
        info = await consumer(nc, stream_name, source)
    except nats.js.errors.NotFoundError:
        return False
    return info.ack_floor.stream_seq == sequence and info.num_ack_pending == 0


async def test_a_source_whose_name_has_a_dot_reads_its_stream(
    nats_url: str, database_dsn: str
) -> None:
    # Names take dots; the default durable, eventbus-source-<name>, then was no valid consumer
    # name, and the source crashed at every start. A durable given so is refused at load.
    async with _loaded_stream(nats_url, database_dsn, 2) as (nc, pool, tap, name, _):
        ctx = context(pool, "js.dot", tap, type="jetstream")
        async with running(jetstream("js.dot", nats_url, name), ctx):
            await tap.wait_published(2)
            await eventually(lambda: _acked_to(nc, name, "js_dot", 2), what="both acknowledged")
    with pytest.raises(ConfigError, match="field 'durable'"):
        jetstream("n", nats_url, "S", durable="a.b")


async def test_a_subscription_the_server_refuses_is_never_running(
    tmp_path: Path, nats_url: str, database_dsn: str
) -> None:
    # The refusal (-ERR "Permissions Violation for Subscription") could be read after the
    # flush that follows the subscriptions: in about 3 tries of 10 the source said running,
    # and every message on the refused subject was lost. Each try is now an error, whenever
    # the refusal is read; three in a row would have passed about one run in three.
    password = "bob-password-0123456789"
    permissions = '{subscribe: {deny: ["secret.>"]}}'
    config = f"authorization {{ users = [ {{user: bob, password: {password},"
    config += f" permissions: {permissions}}} ] }}"
    async with (
        configured_nats_server(tmp_path / "nats", config) as port,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        spec = {
            "name": "refused",
            "type": "nats",
            "url": f"nats://127.0.0.1:{port}",
            "user": "bob",
            "password": password,
            "subjects": ["ok.x", "secret.x"],
        }
        ctx = context(pool, "refused", tap, type="nats")
        async with running(build_source(spec), ctx):
            await eventually(lambda: ctx.status.errors >= 3, within=40, what="three refusals")
            assert ctx.status.state == "backoff"
        assert "violation for subscription" in (ctx.status.last_error or "")


async def test_core_nats_subjects_and_dead_letters(nats_url: str, database_dsn: str) -> None:
    prefix = unique_name("core")
    async with _core(nats_url, database_dsn, "core", prefix) as (nc, pool, tap, _):
        await nc.publish(f"{prefix}.a", ce("a"))
        await nc.publish(f"{prefix}.b", b"not an event")
        await nc.publish(f"{prefix}.c", ce("c"))
        await nc.flush()
        events = await tap.take(2)
        assert [e["id"] for e in events] == ["ma", "mc"]
        rows = await dead_letters(pool, "core")
        assert [r["payload"] for r in rows] == [b"not an event"]
        assert orjson.loads(rows[0]["meta"]) == {"subject": f"{prefix}.b"}


async def test_core_nats_messages_a_slow_consumer_drops_are_counted_and_said(
    tmp_path: Path, database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # While the bus held the source up, nats-py dropped what overflowed the subscription's
    # buffer (128 MiB) and said so at debug level: messages lost, the source running with
    # no error counted. A server of its own that never takes the client for slow itself (on
    # a loaded machine the shared one cut the connection first: nothing for nats-py to drop).
    config = 'jetstream { store_dir: "{store}" }\nmax_pending: 1GB\nwrite_deadline: "120s"'
    prefix = unique_name("slow")
    async with (
        configured_nats_server(tmp_path / "nats", config) as port,
        _core(f"nats://127.0.0.1:{port}", database_dsn, "slow", prefix) as (nc, _, tap, _),
    ):
        tap.down = True
        blob = "x" * 200 * 1024  # under max_event_size: held for the bus, not set aside
        for i in range(750):  # 150 MiB
            event = {"specversion": "1.0", "id": f"m{i}", "source": "/s", "type": "t"}
            await nc.publish(f"{prefix}.a", orjson.dumps({**event, "data": blob}))
        await nc.flush()

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if "source slow" in r.getMessage()]

        await eventually(
            lambda: any("slow consumer" in line for line in said()), what="the drops said"
        )
        line = next(line for line in said() if "slow consumer" in line)
        assert "was dropped" in line and line.endswith("; 0 more dropped"), line
        tap.down = False
    # stopped: those dropped after the first warning are told with their number (only a
    # later drop told them)
    *_, summary = [line for line in said() if "slow consumer" in line]
    assert summary != line and not summary.endswith("; 0 more dropped"), summary


@contextlib.asynccontextmanager
async def _core(
    nats_url: str, database_dsn: str, name: str, prefix: str
) -> AsyncIterator[tuple[Client, asyncpg.Pool, BusTap, SourceContext]]:
    """A running core ``nats`` source ``name`` on ``prefix.*``, and a client to publish."""
    async with (
        client(nats_url) as nc,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        spec = {"name": name, "type": "nats", "url": nats_url, "subjects": [f"{prefix}.*"]}
        source = build_source(spec)
        assert isinstance(source, NatsSource)
        ctx = context(pool, name, tap, type="nats")
        async with running(source, ctx):
            await eventually(lambda: _is_running(ctx))
            yield nc, pool, tap, ctx


async def _is_running(ctx: SourceContext) -> bool:
    return ctx.status.state == "running"


async def test_source_broker_outage_backs_off_and_resumes(
    tmp_path: Path, nats_url: str, database_dsn: str
) -> None:
    """The broker the source reads from goes away and comes back; the bus stays up."""
    async with (
        NatsServer(tmp_path) as server,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        async with client(server.url) as nc:
            name, prefix = await stream(nc)
            await nc.jetstream().publish(f"{prefix}.x", ce(0))
        ctx = context(pool, "outage", tap, type="jetstream")
        async with running(jetstream("outage", server.url, name), ctx):
            await tap.wait_published(1)
            await server.stop()
            await eventually(lambda: _backing_off(ctx))
            await server.start()
            # connected again, before any message: the old connection's error is gone (a
            # quiet source showed running with it until its next event)
            await eventually(
                lambda: ctx.status.state == "running" and ctx.status.last_error is None,
                what="running without the outage's error",
            )
            async with client(server.url) as nc:
                await nc.jetstream().publish(f"{prefix}.x", ce(1))
            await tap.wait_published(2)
        assert [e["id"] for e in await tap.take(2)] == ["m0", "m1"]
        assert ctx.status.errors >= 1


async def test_a_frozen_source_server_is_found_by_its_unanswered_pings(
    tmp_path: Path, nats_url: str, database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With nats-py's defaults (a ping every 2 minutes, 2 unanswered allowed) a frozen server's
    # source showed running for minutes.
    monkeypatch.setattr(nats_source_module, "PING_INTERVAL", 0.5)
    async with (
        NatsServer(tmp_path) as server,
        source_pool(database_dsn) as pool,
        bus_tap(nats_url) as tap,
    ):
        port = urlsplit(server.url).port
        (frozen,) = [
            p
            for p in psutil.Process().children(recursive=True)
            if "nats-server" in p.name() and str(port) in p.cmdline()
        ]
        source = build_source(
            {"name": "frozen", "type": "nats", "url": server.url, "subjects": ["x.>"]}
        )
        ctx = context(pool, "frozen", tap, type="nats")
        async with running(source, ctx):
            await eventually(lambda: _is_running(ctx))
            frozen.suspend()
            try:
                await eventually(lambda: _backing_off(ctx), within=10, what="backoff")
            finally:
                frozen.resume()
            await eventually(lambda: _is_running(ctx), within=30, what="running again")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"type": "nats", "url": "nats://127.0.0.1:4222", "subjects": []}, "field 'subjects'"),
        ({"type": "nats", "url": "http://x", "subjects": ["a"]}, "field 'url'"),
        ({"type": "jetstream", "url": "nats://127.0.0.1:4222"}, "field 'stream'"),
        (
            {"type": "jetstream", "url": "nats://127.0.0.1:4222", "stream": "S", "batch": 0},
            "field 'batch'",
        ),
        (
            {"type": "jetstream", "url": "nats://127.0.0.1:4222", "stream": "S", "format": "raw"},
            "needs both 'event_type' and 'event_source'",
        ),
        # refused by the server only when the source subscribed: it backed off for ever
        ({"type": "nats", "url": "nats://127.0.0.1:4222", "subjects": ["a..b"]}, "'a..b'"),
        ({"type": "nats", "url": "nats://127.0.0.1:4222", "subjects": ["ok", "a b"]}, "'a b'"),
        (
            {
                "type": "jetstream",
                "url": "nats://127.0.0.1:4222",
                "stream": "S",
                "subject": "a.>.b",
            },
            "'>' only as the last",
        ),
        (
            {"type": "jetstream", "url": "nats://127.0.0.1:4222", "stream": "BAD.NAME"},
            "field 'stream'",
        ),
    ],
)
def test_bad_nats_config_names_the_source(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=f"source 'n' \\({spec['type']}\\): .*{fragment}"):
        build_source({"name": "n", **spec})
