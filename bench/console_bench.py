"""What the console's live stream costs the pipeline: one ``eventbus serve`` process (JetStream
and PostgreSQL embedded, audit on) behind HTTP ingest, an aiohttp function endpoint, and the
same load run with no live-stream client and with ``--clients`` of them (each one
``GET /events/live`` read to the end and parsed, as the page does): a closed loop (as fast as the
service takes events: does watching slow ingest?) and a fixed rate (``--rate``, 2,000 events/s by
default: what do the clients receive, and what CPU does serving them add?). With ``--workers N`` the
service runs N workers and each client, on whichever worker took its connection, must see the
rows of every worker's events (``eventbus.router.PeerFeed``).

Reported per phase: events accepted per second, the service's CPU per event, rows per second
each client received, and rows the clients lost by reading too slowly (``dropped``). The
question it answers: does watching slow ingest (the live feed never waits, so it should cost
only the CPU of serializing rows)?

    python bench/console_bench.py [--clients 5] [--duration 10] [--rounds 2] [--workers 1]
                                  [--rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h

SECTION = "Console live stream"
CONCURRENCY = 64
WARMUP = 3.0
DRAIN_BOUND = 120.0
RULES = """
- name: orders
  match: {type: [com.example.order.created]}
  targets: [fn]
"""
EVENT = {
    "specversion": "1.0",
    "source": "bench/console",
    "type": "com.example.order.created",
    "subject": "order",
    "data": {"total": 150},
}


@dataclass
class Phase:
    rate: int | None  # None: closed loop
    clients: int
    accepted_per_s: float
    cpu_ms_per_event: float
    rows_per_s: float  # per client
    dropped: int  # summed over the clients


class Client:
    """One live-stream reader: counts the rows it parsed and the last ``dropped`` it was told."""

    def __init__(self) -> None:
        self.rows = 0
        self.dropped = 0

    async def run(self, http: aiohttp.ClientSession, url: str, ready: asyncio.Event) -> None:
        async with http.get(url) as resp:
            resp.raise_for_status()
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    ready.set()
                    kind, _, data = block.partition(b"\ndata: ")
                    if kind == b"event: rows":
                        self.rows += len(orjson.loads(data))
                    elif kind == b"event: dropped":
                        self.dropped = orjson.loads(data)["dropped"]


async def _phase(
    procs: h.Processes,
    receiver: h.Receiver,
    pid: int,
    url: str,
    clients: int,
    run: str,
    duration: float,
    rate: int | None,
) -> Phase:
    live = url.removesuffix("/events") + "/events/live"
    readers = [Client() for _ in range(clients)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
        started = [asyncio.Event() for _ in readers]
        tasks = [
            asyncio.create_task(c.run(http, live, e)) for c, e in zip(readers, started, strict=True)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
            cpu = h.python_cpu([pid])
            load = await h.run_load(
                procs,
                h.load_command(
                    url, [EVENT], run, concurrency=CONCURRENCY, duration=duration, rate=rate
                ),
            )
            await receiver.wait_delivered(run, load["accepted"], bound=DRAIN_BOUND)
            cpu_s = h.python_cpu([pid]) - cpu
            await asyncio.sleep(0.5)  # the last rows' message (gathered over 0.1 s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    span = max(load["ended_at"] - load["started_at"], 1e-9)
    accepted = load["accepted"]
    return Phase(
        rate,
        clients,
        accepted / span,
        cpu_s * 1000 / max(accepted, 1),
        sum(c.rows for c in readers) / max(clients, 1) / span,
        sum(c.dropped for c in readers),
    )


async def main(args: argparse.Namespace) -> str:
    h.environment()  # refuse an environment that would make the figures wrong, first
    before = h.load_average()
    work = Path(tempfile.mkdtemp(prefix="eventbus-console-"))
    phases: list[Phase] = []
    try:
        with h.Processes(work) as procs:
            receiver = h.start_receiver(procs)
            await receiver.ready()
            target = {"name": "fn", "type": "http", "url": receiver.url("/fn")}
            url, proc = await h.start_eventbus(
                procs, work, workers=args.workers, rules=RULES, targets=[target]
            )
            warm = await h.run_load(procs, h.load_command(url, [EVENT], "warm", duration=WARMUP))
            await receiver.wait_delivered("warm", warm["accepted"], bound=DRAIN_BOUND)
            for n in range(args.rounds):  # alternate, so drift over time hits both alike
                for rate in (None, args.rate):
                    for clients in (0, args.clients):
                        run = f"r{n}q{rate or 0}c{clients}"
                        phase = await _phase(
                            procs, receiver, proc.pid, url, clients, run, args.duration, rate
                        )
                        phases.append(phase)
                        print(f"  {phase}", file=sys.stderr, flush=True)
            procs.stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return render(phases, args, (before, h.load_average()))


def render(phases: list[Phase], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    def mean(rate: int | None, clients: int, field: str) -> float:
        values = [getattr(p, field) for p in phases if p.rate == rate and p.clients == clients]
        return sum(values) / len(values)

    base, watched = mean(None, 0, "accepted_per_s"), mean(None, args.clients, "accepted_per_s")
    cpu_base = mean(args.rate, 0, "cpu_ms_per_event")
    cpu_watched = mean(args.rate, args.clients, "cpu_ms_per_event")
    rate_watched = mean(args.rate, args.clients, "accepted_per_s")
    rows = mean(args.rate, args.clients, "rows_per_s")
    lines = [
        f"`python bench/console_bench.py --clients {args.clients} --duration {args.duration:g}"
        f" --rounds {args.rounds} --workers {args.workers} --rate {args.rate}` on"
        f" {h.machine()}; load average (1/5/15 min) {loads[0]} before, {loads[1]} after.",
        "",
        f"{args.workers} worker process(es), one rule; load: a closed loop of {CONCURRENCY}"
        f" requests, or {args.rate:,} events/s offered; the clients run in the benchmark's"
        " process on the same two cores, as browsers would. Each event makes two rows (routed,"
        " then settled), so a client seeing every worker's events receives about twice the"
        " accepted rate.",
        "",
        "| load | clients | accepted/s | CPU ms/event | rows/s per client | rows dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        load = "closed loop" if p.rate is None else f"{p.rate:,}/s"
        lines.append(
            f"| {load} | {p.clients} | {p.accepted_per_s:,.0f} | {p.cpu_ms_per_event:.3f} |"
            f" {p.rows_per_s:,.0f} | {p.dropped:,} |"
        )
    added = (cpu_watched - cpu_base) * rate_watched / 1000
    lines += [
        "",
        f"Closed loop: ingest with {args.clients} clients is {watched / base:.1%} of the rate"
        f" without (mean of {args.rounds} rounds each; the line: no less than 90 %).",
        f"At {args.rate:,} events/s offered ({rate_watched:,.0f} accepted): each client received"
        f" {rows:,.0f} rows/s; serving {args.clients} clients cost"
        f" {cpu_watched - cpu_base:+.3f} ms CPU per event ({cpu_watched / cpu_base - 1:+.1%}),"
        f" {added:+.2f} of a core.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5, help="live-stream clients")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="phases of each kind")
    parser.add_argument("--workers", type=int, default=1, help="eventbus serve --workers N")
    parser.add_argument("--rate", type=int, default=2000, help="events/s of the fixed-rate phases")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    table = asyncio.run(main(args))
    print(table)
    if args.write_results:
        h.write_section(
            SECTION if args.workers == 1 else f"{SECTION}, {args.workers} workers", table
        )
