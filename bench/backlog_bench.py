"""Benchmark of memory under a backlog: the RSS of one ``eventbus serve`` process while a large
backlog waits in the JetStream bus behind a slow function, next to the same process with a
small backlog (the reference, measured in the same run). Backpressure means the first figure
does not follow the second: the router holds at most ``bus.max_in_flight`` messages, the rest
stays on the broker's disk.

For each backlog size (``--baseline`` first, then ``--backlog``), with fresh servers:

1. a real ``nats-server`` (the bus) and ``eventbus serve`` (one process, embedded PostgreSQL,
   ``max_in_flight`` 1000) with one rule routing everything to the function endpoint, which
   answers each request after ``--delay`` seconds (so the backlog cannot drain meanwhile);
2. the backlog is published straight onto the bus's stream (pipelined JetStream publishes of
   valid ~300-byte CloudEvents), as fast as the broker takes it;
3. for ``--hold`` seconds after that, the eventbus process's RSS and the consumer's
   un-acknowledged count (``num_ack_pending``, what the process holds) are sampled.

Reported per size: RSS once started, peak RSS while publishing and holding, RSS at the end,
peak messages held, and the peak RSS ratio to the small backlog.

    python bench/backlog_bench.py [--backlog 1000000] [--baseline 10000] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.bus import NatsServer

SECTION = "Memory: a backlog waiting behind a slow function"
MAX_IN_FLIGHT = 1000
PUBLISH_WINDOW = 4000  # JetStream publishes awaiting their ack at once
RULES = """
- name: everything
  match: {source: [{prefix: "bench/"}]}
  targets: [fn]
"""


@dataclass
class Sample:
    backlog: int
    publish_s: float
    rss_start_mb: float
    rss_peak_mb: float
    rss_end_mb: float
    held_peak: int
    delivered: int


def _event(i: int) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"b-{i}",
            "source": "bench/backlog",
            "type": "com.example.backlog",
            "time": "2026-12-02T10:00:00Z",
            "datacontenttype": "application/json",
            "data": {"n": i, "run": "backlog", "sent": 0, "pad": "x" * 120},
        }
    )


async def _publish(url: str, subject: str, count: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=30)
        pending: list[asyncio.Future[object]] = []
        for i in range(count):
            pending.append(await js.publish_async(subject, _event(i), wait_stall=30))
            if len(pending) >= PUBLISH_WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await nc.close()


async def _held(url: str, stream: str, durable: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return int(info.num_ack_pending)
    finally:
        await nc.close()


async def _one(backlog: int, args: argparse.Namespace, work: Path) -> Sample:
    with h.Processes(work) as procs:
        nats_server = NatsServer(work / "nats")
        await nats_server.start()
        try:
            receiver = h.start_receiver(procs)
            await receiver.ready()
            await receiver.slow_down(args.delay)
            bus = {
                "max_in_flight": MAX_IN_FLIGHT,
                "nats": {"url": nats_server.url, "stream": "BACKLOG", "subject": "backlog.ev"},
            }
            targets = [
                {"name": "fn", "type": "http", "url": receiver.url("/fn"), "concurrency": 16}
            ]
            _, proc = await h.start_eventbus(
                procs, work / "eb", workers=1, rules=RULES, targets=targets, bus=bus
            )
            service = psutil.Process(proc.pid)
            start = service.memory_info().rss
            peak, held_peak = start, 0

            async def sample_until(done: asyncio.Future[None] | None, until: float) -> None:
                nonlocal peak, held_peak
                while (done is not None and not done.done()) or time.monotonic() < until:
                    peak = max(peak, service.memory_info().rss)
                    held_peak = max(
                        held_peak, await _held(nats_server.url, "BACKLOG", "eventbus-router")
                    )
                    await asyncio.sleep(0.5)

            began = time.monotonic()
            publishing = asyncio.ensure_future(_publish(nats_server.url, "backlog.ev", backlog))
            await sample_until(publishing, 0)
            await publishing
            publish_s = time.monotonic() - began
            await sample_until(None, time.monotonic() + args.hold)
            end = service.memory_info().rss
            delivered = (await receiver.stats("backlog"))["delivered"]
        finally:
            procs.stop_all()
            await nats_server.stop()
    mb = 1024 * 1024
    return Sample(backlog, publish_s, start / mb, peak / mb, end / mb, held_peak, delivered)


def render(samples: list[Sample], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    base = samples[0]
    lines = [
        f"`python bench/backlog_bench.py --backlog {args.backlog} --baseline {args.baseline}"
        f" --delay {args.delay} --hold {args.hold}` on {h.machine()}; load average (1/5/15 min)"
        f" {loads[0]} before the run, {loads[1]} after.",
        "",
        "One `eventbus serve` process (embedded PostgreSQL, bus on a separate nats-server,"
        f" `max_in_flight` {MAX_IN_FLIGHT}), one rule, a function answering each request after"
        f" {args.delay} s with target concurrency 16; the backlog is published straight onto the"
        " stream; RSS of the eventbus process, held = the consumer's un-acknowledged messages.",
        "",
        "| backlog | publish s | RSS at start MB | peak RSS MB | RSS at end MB | peak held |"
        " delivered meanwhile | peak RSS / small backlog |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        lines.append(
            f"| {s.backlog:,} | {s.publish_s:.1f} | {s.rss_start_mb:.0f} | {s.rss_peak_mb:.0f} |"
            f" {s.rss_end_mb:.0f} | {s.held_peak:,} | {s.delivered:,} |"
            f" {s.rss_peak_mb / base.rss_peak_mb:.2f} |"
        )
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> str:
    h.environment()  # refuse an environment that would make the figures wrong, first
    before = h.load_average()
    samples = []
    for backlog in (args.baseline, args.backlog):
        work = Path(tempfile.mkdtemp(prefix="eventbus-backlog-"))
        try:
            samples.append(await _one(backlog, args, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(samples[-1], flush=True)
    return render(samples, args, (before, h.load_average()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the function takes")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds sampled afterwards")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    table = asyncio.run(main(args))
    print(table)
    if args.write_results:
        h.write_section(SECTION, table)
