"""Sources under the SourceRunner: a queue source whose broker is unreachable backs off and
keeps retrying while the other sources go on delivering; a directory (log file, bucket) runs in
one instance at a time, under a lease another instance takes over."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
import pytest

from eventbus.app import _installation_id
from eventbus.bus._nats_server import free_port
from eventbus.sources import SourceRunner, build_source
from eventbus.sources._checkpoints import Lease
from tests.fixtures.nats import unique_name
from tests.fixtures.wait import eventually
from tests.sources._harness import source_pool
from tests.sources.test_queue_support import bus_tap


async def test_unreachable_brokers_back_off_while_other_sources_deliver(
    nats_url: str, database_dsn: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    sources = [
        build_source({"name": "k", "type": "kafka", "bootstrap_servers": dead, "topics": ["t"]}),
        build_source(
            {"name": "r", "type": "rabbitmq", "url": f"amqp://guest:guest@{dead}/", "queue": "q"}
        ),
        build_source({"name": "m", "type": "mqtt", "port": free_port(), "topics": ["a"]}),
        build_source({"name": "n", "type": "jetstream", "url": f"nats://{dead}", "stream": "S"}),
    ]
    stream, subject = unique_name("LIVE"), unique_name("live")
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[subject])
        sources.append(
            build_source({"name": "live", "type": "jetstream", "url": nats_url, "stream": stream})
        )
        async with (
            source_pool(database_dsn) as pool,
            bus_tap(nats_url) as tap,
            SourceRunner(sources, pool=pool, publish=tap.publish) as runner,
        ):
            event = {"specversion": "1.0", "id": "alive", "source": "/s", "type": "t"}
            await nc.jetstream().publish(subject, orjson.dumps(event))
            assert [e["id"] for e in await tap.take(1)] == ["alive"]

            async def broken_ones_back_off() -> bool:
                states = {s.name: s.state for s in runner.statuses()}
                return all(states[n] == "backoff" for n in "krmn")

            await eventually(broken_ones_back_off)
            status = {s.name: s for s in runner.statuses()}
            assert status["live"].state == "running"
            assert all(status[n].last_error for n in "krmn")
    finally:
        await nc.close()


async def test_a_directory_runs_in_one_instance_and_the_other_takes_over(
    database_dsn: str, tmp_path: Path
) -> None:
    # Two instances on one directory announced every file twice (and each deleted the other's
    # checkpoints); now one holds the source's lease and the other stands by.
    folder = tmp_path / "drop"
    folder.mkdir()
    spec = {"name": "drop", "type": "directory", "path": str(folder), "interval": 0.1}
    published: dict[str, list[str]] = {"a": [], "b": []}

    def publisher(instance: str) -> Callable[..., Awaitable[bool]]:
        async def publish(event: dict[str, Any], *, via: str) -> bool:
            published[instance].append(event["subject"])
            return False

        return publish

    def runner(instance: str, pool: asyncpg.Pool) -> SourceRunner:
        return SourceRunner(
            [build_source(spec)],
            pool=pool,
            publish=publisher(instance),
            instance_id=instance,
            lease=1.5,
        )

    def announced() -> list[str]:
        return sorted(published["a"] + published["b"])

    async with source_pool(database_dsn) as pool, contextlib.AsyncExitStack() as first:
        a = await first.enter_async_context(runner("a", pool))
        await eventually(lambda: a.statuses()[0].state == "running")
        async with runner("b", pool) as b:
            await eventually(lambda: b.statuses()[0].state == "standby")
            (folder / "one.txt").write_text("1")
            (folder / "two.txt").write_text("2")
            await eventually(lambda: len(announced()) >= 2)
            await asyncio.sleep(0.5)  # b's turn to look, if it were looking
            assert published["b"] == []
            assert announced() == ["one.txt", "two.txt"]
            assert a.statuses()[0].state == "running"
            await first.aclose()  # a stops: its lease is given up
            await eventually(lambda: b.statuses()[0].state == "running", within=5)
            (folder / "three.txt").write_text("3")
            await eventually(lambda: "three.txt" in published["b"])
            await asyncio.sleep(0.3)
            # from the checkpoints a left: the files it announced are not announced again
            assert announced() == ["one.txt", "three.txt", "two.txt"]


async def test_a_lease_not_renewed_is_taken_over(database_dsn: str) -> None:
    async with source_pool(database_dsn) as pool:
        frozen = Lease(pool, "logs", "frozen")
        waiting = Lease(pool, "logs", "waiting")
        assert await frozen.take(0.5)
        assert await frozen.take(0.5)  # renewed by its holder
        assert not await waiting.take(0.5)
        assert await waiting.holder() == "frozen"
        await asyncio.sleep(0.6)
        assert await waiting.take(30)
        assert not await frozen.take(0.5)  # back from its pause: it must stop
        await frozen.release()  # releases nothing it does not hold
        assert await waiting.holder() == "waiting"


async def test_a_holder_that_cannot_renew_stops_before_its_lease_runs_out(
    database_dsn: str, tmp_path: Path
) -> None:
    # Each renewal could hang 5 s and the check came only after it: the holder ran on past the
    # lease's end in the database, beside the instance taking over.
    spec = {"name": "held", "type": "directory", "path": str(tmp_path), "interval": 0.1}

    async def publish(event: dict[str, Any], *, via: str) -> bool:
        return False

    async with source_pool(database_dsn) as pool:
        runner = SourceRunner(
            [build_source(spec)], pool=pool, publish=publish, instance_id="a", lease=2.0
        )
        async with runner:
            await eventually(lambda: runner.statuses()[0].state == "running")
            blocker = await asyncpg.connect(database_dsn)
            try:
                async with blocker.transaction():
                    # renewals wait (writes), readers do not
                    await blocker.execute("LOCK TABLE source_leases IN EXCLUSIVE MODE")
                    await eventually(lambda: runner.statuses()[0].state == "standby", within=10)
                    stopped_early = await pool.fetchval(
                        "SELECT now() < expires_at FROM source_leases WHERE source = 'held'"
                    )
                    assert stopped_early
            finally:
                await blocker.close()


def test_the_lease_owner_is_one_per_installation_and_kept(tmp_path: Path) -> None:
    # The host's name and the data directory's path: two machines cloned from one image had
    # the same, and both would have held every lease.
    first = _installation_id(tmp_path / "a")
    assert _installation_id(tmp_path / "a") == first  # kept across restarts
    assert _installation_id(tmp_path / "b") != first  # same host, another installation
    assert (tmp_path / "a" / "installation-id").read_text().strip() == first


async def test_a_core_nats_source_without_a_queue_group_runs_in_one_instance(
    database_dsn: str, nats_url: str
) -> None:
    # Each instance subscribed, and every message reached the targets once per instance (a
    # raw one under another id each time). With a queue group the server hands each message to
    # one member: those run everywhere. MQTT sources run under a lease too.
    subject = unique_name("lone")
    got: dict[str, list[str]] = {"a": [], "b": []}

    def runner(instance: str, pool: asyncpg.Pool, **spec: Any) -> SourceRunner:
        async def publish(event: dict[str, Any], *, via: str) -> bool:
            got[instance].append(event["data"])
            return False

        source = build_source({"name": f"n-{subject}", "type": "nats", "url": nats_url, **spec})
        return SourceRunner([source], pool=pool, publish=publish, instance_id=instance, lease=1.5)

    mqtt = build_source({"name": "m", "type": "mqtt", "topics": ["t/#"]})
    assert getattr(mqtt, "one_instance", False) is True
    async with (
        source_pool(database_dsn) as pool,
        runner("a", pool, subjects=[subject], format="raw", event_type="t", event_source="/n") as a,
        runner("b", pool, subjects=[subject], format="raw", event_type="t", event_source="/n") as b,
    ):
        await eventually(
            lambda: {a.statuses()[0].state, b.statuses()[0].state} == {"running", "standby"}
        )
        nc = await nats.connect(nats_url)
        try:
            await nc.publish(subject, b"one")
            await nc.flush()
            await eventually(lambda: len(got["a"]) + len(got["b"]) >= 1)
            await asyncio.sleep(0.3)  # the other instance's copy, were it subscribed
        finally:
            await nc.close()
    assert sorted(got["a"] + got["b"]) == ["one"]
    grouped = build_source(
        {"name": "g", "type": "nats", "url": nats_url, "subjects": ["x"], "queue_group": "q"}
    )
    assert getattr(grouped, "one_instance", True) is False


async def test_a_connecting_source_shows_starting_then_backoff_until_it_reads(
    database_dsn: str,
) -> None:
    # The runner showed every source running as it started it: an MQTT source still
    # connecting showed running, and a message published meanwhile, taken for received, was
    # lost (the broker keeps nothing for a topic not yet subscribed to).
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the CONNECT: the source is connecting; it gets no CONNACK
        accepted.put_nowait(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = build_source({"name": "m", "type": "mqtt", "port": port, "topics": ["a/#"]})

    async def publish(event: dict[str, Any], *, via: str) -> bool:
        return True

    try:
        async with (
            source_pool(database_dsn) as pool,
            SourceRunner([source], pool=pool, publish=publish) as runner,
        ):
            first = await asyncio.wait_for(accepted.get(), 10)
            assert runner.statuses()[0].state == "starting"
            first.write(b"\x20\x02\x00\x03")  # CONNACK: server unavailable; it backs off
            second = await asyncio.wait_for(accepted.get(), 10)
            status = runner.statuses()[0]
            assert (status.state, status.errors) == ("backoff", 1)
            second.transport.abort()
    finally:
        server.close()


async def test_a_port_taken_is_one_line_per_restart_not_a_traceback(
    database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A syslog source on a port another process held logged "crashed" with a whole
    # traceback at every restart (12 in 30 s); the status said it well already.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        source = build_source({"name": "s", "type": "syslog", "port": port})
        async with (
            source_pool(database_dsn) as pool,
            SourceRunner(
                [source], pool=pool, publish=_refuse, backoff_initial=0.01, backoff_max=0.05
            ) as runner,
        ):

            def restarted() -> bool:
                (status,) = runner.statuses()
                return status.state == "backoff" and status.errors >= 3

            await eventually(restarted, what="three restarts")
            (status,) = runner.statuses()
            assert "in use" in (status.last_error or ""), status.last_error
    mine = [r for r in caplog.records if "source s" in r.getMessage()]
    assert mine and all(r.exc_info is None for r in mine), [r.getMessage() for r in mine]


async def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("nothing is published")
