"""Benchmark of synchronous invocation: the latency ``POST /targets/fn/invoke`` adds to calling
the function directly, at a fixed request rate. Prints a markdown table; with
``--write-results`` it also replaces the section "Synchronous invocation overhead" of
bench/RESULTS.md.

The benchmark starts its own nats-server and PostgreSQL and runs ``eventbus serve`` (one
process) and the function endpoint (bench/_harness.py's receiver, answering 204) as processes
of their own; the load generator is this process: an open loop at ``--rate`` requests/s (a
request is sent on schedule whether or not earlier ones were answered, at most 512 outstanding)
for ``--seconds`` per phase. The phases alternate ``--rounds`` times, so load from other
processes falls on both alike:

- direct: the CloudEvent POSTed to the function in binary mode, as eventbus sends it;
- invoke: the same event POSTed to ``/targets/fn/invoke`` in structured mode (sync), which
  parses it, audits it, sends it to the function and passes the answer back.

The overhead is the difference of the two latency distributions' percentiles.

    python bench/invoke_bench.py [--rate 500] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.bus import NatsServer
from eventbus.cloudevents import to_http
from eventbus.store import EmbeddedPostgres

SECTION = "Synchronous invocation overhead"
OUTSTANDING = 512
TARGET_CONCURRENCY = 64
BOUND = 30.0  # seconds one request may take before the run is abandoned


def _event() -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "bench/invoke",
        "type": "bench.invoke",
        "datacontenttype": "application/json",
        "data": {"run": "invoke", "sent": time.time(), "pad": "x" * 200},
    }


async def _phase(
    http: aiohttp.ClientSession, url: str, *, direct: bool, rate: float, seconds: float
) -> tuple[list[float], Counter[str]]:
    """Latencies (ms) of the requests answered 2xx, and the others by status."""
    latencies: list[float] = []
    failed: Counter[str] = Counter()
    slots = asyncio.Semaphore(OUTSTANDING)

    async def one() -> None:
        event = _event()
        if direct:
            headers, body = to_http(event)
        else:
            headers, body = {"Content-Type": "application/cloudevents+json"}, orjson.dumps(event)
        start = time.perf_counter()
        status = "error"
        try:
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                status = str(resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        finally:
            slots.release()
        if status.startswith("2"):
            latencies.append((time.perf_counter() - start) * 1000)
        else:
            failed[status] += 1

    tasks: list[asyncio.Task[None]] = []
    began = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.create_task(one()))
    await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    return latencies, failed


def _statuses(failed: Counter[str]) -> str:
    return ", ".join(f"{n:,} x {status}" for status, n in sorted(failed.items())) or "0"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> str:
    h.environment()
    work = Path(tempfile.mkdtemp(prefix="eventbus-invoke-bench-"))
    before = h.load_average()
    results: dict[str, tuple[list[float], Counter[str]]] = {
        "direct": ([], Counter()),
        "invoke": ([], Counter()),
    }
    try:
        with h.Processes(work) as procs:
            async with NatsServer(work / "nats") as nats, EmbeddedPostgres(work / "pg") as pg:
                receiver = h.start_receiver(procs)
                await receiver.ready()
                target = {
                    "name": "fn",
                    "type": "http",
                    "url": receiver.url("/fn"),
                    "concurrency": TARGET_CONCURRENCY,
                }
                events_url, service = await h.start_eventbus(
                    procs,
                    work / "eventbus",
                    workers=1,
                    rules="[]",
                    targets=[target],
                    bus={"backend": "nats", "nats": {"url": nats.url}},
                    database_url=pg.dsn,
                )
                invoke_url = events_url.removesuffix("/events") + "/targets/fn/invoke"
                connector = aiohttp.TCPConnector(limit=OUTSTANDING)
                timeout = aiohttp.ClientTimeout(total=BOUND)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                    # warm-up: connections, code paths, the target's pool
                    await _phase(http, invoke_url, direct=False, rate=args.rate, seconds=1)
                    for _ in range(args.rounds):
                        for name, url in (("direct", receiver.url("/fn")), ("invoke", invoke_url)):
                            lat, failed = await _phase(
                                http,
                                url,
                                direct=name == "direct",
                                rate=args.rate,
                                seconds=args.seconds,
                            )
                            results[name][0].extend(lat)
                            results[name][1].update(failed)
                procs.stop(service)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return _render(results, args, (before, h.load_average()))


def _render(
    results: dict[str, tuple[list[float], Counter[str]]],
    args: argparse.Namespace,
    loads: tuple[str, str],
) -> str:
    lines = [
        f"`{args.command}` on {h.machine()}; load average (1/5/15 min) {loads[0]} before the "
        f"run, {loads[1]} after (other engineers' test suites share the machine).",
        "",
        f"Open loop at {args.rate:g} requests/s, {args.seconds:g} s per phase, phases "
        f"alternating {args.rounds} times; `eventbus serve` (one process) on JetStream and "
        f"PostgreSQL, audit on, target concurrency {TARGET_CONCURRENCY}; the function answers "
        "204 at once. Latency is the client's, "
        "from sending the request to reading the whole answer.",
        "",
        "| path | answered 2xx | not (by status) | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (lat, failed) in results.items():
        lines.append(
            f"| {name} | {len(lat):,} | {_statuses(failed)} | {_pct(lat, 0.5):.2f} | "
            f"{_pct(lat, 0.99):.2f} | {max(lat):.2f} |"
        )
    direct, invoke = results["direct"][0], results["invoke"][0]
    lines.append(
        f"| **added by eventbus** | | | {_pct(invoke, 0.5) - _pct(direct, 0.5):.2f} | "
        f"{_pct(invoke, 0.99) - _pct(direct, 0.99):.2f} | |"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="times the phases alternate")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    args.command = "python bench/invoke_bench.py " + " ".join(sys.argv[1:])
    table = asyncio.run(main(args))
    print(table)
    if args.write_results:
        h.write_section(SECTION, table)
