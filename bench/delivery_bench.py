"""Benchmark of delivery under failures: events/s delivered when 10 % of requests fail and are
retried, and the rate at which a backlog of scheduled retries drains from PostgreSQL. Prints a
markdown table; with ``--write-results`` it also replaces the section "Delivery: retries and
backlog drain" of bench/RESULTS.md.

The benchmark starts its own nats-server and PostgreSQL (eventbus.bus.NatsServer,
eventbus.store.EmbeddedPostgres) and gives ``eventbus serve --workers N`` their URLs, so it can
watch the ``delivery_retries`` table with asyncpg; the load generator and the function endpoint
are processes of bench/_harness.py. Two rules route to the same endpoint (circuit breaker off,
so every event follows its retry policy alone):

1. ``retry-fast`` (fixed 100 ms, no jitter): ``--events`` events are sent (closed loop) while
   the endpoint answers 204, then again while it answers 503 to a seeded 10 % of requests;
   throughput = distinct events answered 2xx / (last 2xx - first send), once all have arrived.
2. ``retry-slow`` (fixed 1 h): ``--backlog`` events are sent while the endpoint answers 503 to
   everything, so each first attempt fails and leaves one row in ``delivery_retries``. Once
   all rows are there the endpoint switches to 204 and the benchmark sets every row due now
   (``UPDATE delivery_retries SET due_at = now()``): with a short delay instead the rows would
   fall due at the rate they were written, and the drain would measure that rate, not the
   retry workers'. Drain rate = rows / (table empty - rows made due).

    python bench/delivery_bench.py [--events 10000] [--backlog 5000] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.bus import NatsServer
from eventbus.store import EmbeddedPostgres

SECTION = "Delivery: retries and backlog drain"
CONCURRENCY = 64
TARGET_CONCURRENCY = 64
FAIL_RATE = 0.10
SEED = 7
BOUND = 180.0  # seconds any one wait may take before the run is abandoned

RULES = """
- name: retry-fast
  match: {type: [bench.retry.fast]}
  targets:
    - name: fn
      delivery:
        retry: {strategy: fixed, initial_delay: 100ms, jitter: false, max_attempts: 100}
- name: retry-slow
  match: {type: [bench.retry.slow]}
  targets:
    - name: fn
      delivery:
        retry:
          strategy: fixed
          initial_delay: 1h
          max_delay: 1h
          jitter: false
          max_attempts: 100
          max_age: 1d
"""


def _event(type_: str) -> list[dict[str, Any]]:
    return [{"specversion": "1.0", "source": "bench/delivery", "type": type_, "data": {}}]


async def _rows(db: asyncpg.Connection, expected: int) -> int:
    """The row count of ``delivery_retries`` once it equals ``expected`` (or after BOUND s)."""
    deadline = time.monotonic() + BOUND
    while True:
        count: int = await db.fetchval("SELECT count(*) FROM delivery_retries")
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


async def _retrying(
    procs: h.Processes, receiver: h.Receiver, url: str, events: int, fail: float
) -> list[str]:
    run = f"fast-{fail:g}"
    await receiver.fail(fail, SEED)
    cmd = h.load_command(
        url, _event("bench.retry.fast"), run, concurrency=CONCURRENCY, count=events
    )
    load = await h.run_load(procs, cmd)
    got = await receiver.wait_delivered(run, load["accepted"], bound=BOUND, stall=BOUND)
    span = got["last_at"] - load["started_at"]
    return [
        f"{fail:.0%} answered 503 (retry fixed 100 ms)",
        f"{load['accepted']:,}",
        f"{load['accepted'] / (load['ended_at'] - load['started_at']):,.0f}",
        f"{got['delivered']:,}",
        f"{got['answered_fail']:,}",
        f"{span:.2f}",
        f"{got['delivered'] / span:,.0f}",
    ]


async def _draining(
    procs: h.Processes, receiver: h.Receiver, url: str, db: asyncpg.Connection, backlog: int
) -> list[str]:
    await receiver.fail(1.0, SEED)
    cmd = h.load_command(url, _event("bench.retry.slow"), "slow", count=backlog)
    load = await h.run_load(procs, cmd, bound=BOUND)
    queued = await _rows(db, load["accepted"])
    if queued != load["accepted"]:
        raise RuntimeError(f"{queued} rows in delivery_retries, expected {load['accepted']}")
    await receiver.fail(0.0, SEED)
    await db.execute("UPDATE delivery_retries SET due_at = now()")
    due = time.time()
    left = await _rows(db, 0)
    empty = time.time()
    got = await receiver.wait_delivered("slow", queued, bound=BOUND)
    return [
        f"backlog drain: {queued:,} rows made due at once",
        f"{load['accepted']:,}",
        f"{load['accepted'] / (load['ended_at'] - load['started_at']):,.0f}",
        f"{got['delivered']:,}",
        f"{got['answered_fail']:,}",
        f"{empty - due:.2f}",
        f"{(queued - left) / (empty - due):,.0f} rows/s",
    ]


async def main(args: argparse.Namespace) -> str:
    h.environment()  # refuse an environment that would make the figures wrong, first
    work = Path(tempfile.mkdtemp(prefix="eventbus-delivery-bench-"))
    before = h.load_average()
    try:
        with h.Processes(work) as procs:
            async with (
                NatsServer(work / "nats") as nats,
                EmbeddedPostgres(work / "postgres") as pg,
            ):
                receiver = h.start_receiver(procs)
                await receiver.ready()
                target = {
                    "name": "fn",
                    "type": "http",
                    "url": receiver.url("/fn"),
                    "concurrency": args.target_concurrency,
                    "delivery": {"circuit_breaker": False},
                }
                url, service = await h.start_eventbus(
                    procs,
                    work / "eventbus",
                    workers=args.workers,
                    rules=RULES,
                    targets=[target],
                    bus={"backend": "nats", "nats": {"url": nats.url}},
                    database_url=pg.dsn,
                )
                db = await asyncpg.connect(pg.dsn)
                try:
                    rows = [
                        await _retrying(procs, receiver, url, args.events, 0.0),
                        await _retrying(procs, receiver, url, args.events, FAIL_RATE),
                    ]
                    if await _rows(db, 0):
                        raise RuntimeError("retries left over from the retry phase")
                    rows.append(await _draining(procs, receiver, url, db, args.backlog))
                finally:
                    await db.close()
                    procs.stop(service)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return _render(rows, args, (before, h.load_average()))


def _render(rows: list[list[str]], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    lines = [
        f"`{args.command}` on {h.machine()}; load average (1/5/15 min) {loads[0]} before the "
        f"run, {loads[1]} after (other engineers' test suites share the machine).",
        "",
        f"`eventbus serve --workers {args.workers}` on JetStream and PostgreSQL (both started "
        f"by the benchmark), one HTTP target (concurrency {args.target_concurrency} per worker, "
        f"circuit breaker off), audit on; load: closed loop, {CONCURRENCY} requests "
        "outstanding, one small CloudEvent per request. The endpoint's failures are seeded "
        f"(seed {SEED}).",
        "",
        "| phase | accepted | ingest/s | delivered (distinct) | 503s answered | seconds | "
        "delivered/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per retry phase")
    parser.add_argument("--backlog", type=int, default=5_000, help="rows in the drain phase")
    parser.add_argument("--workers", type=int, default=2, help="eventbus worker processes")
    parser.add_argument(
        "--target-concurrency",
        type=int,
        default=TARGET_CONCURRENCY,
        help="the target's concurrency cap per worker",
    )
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    args.command = "python bench/delivery_bench.py " + " ".join(sys.argv[1:])
    table = asyncio.run(main(args))
    print(table)
    if args.write_results:
        h.write_section(SECTION, table)
