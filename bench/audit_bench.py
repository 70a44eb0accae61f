"""Benchmark of the audit trail: rows/s through ``AuditWriter`` (COPY batches) into an embedded
PostgreSQL, printed as a markdown table (the section "Audit writes" of bench/RESULTS.md).

Each accepted event produces the rows the router writes for it: one ``events`` row (a ~1 KiB
CloudEvent), one ``matches`` row and one ``attempts`` row. ``--producers`` tasks record
``--events`` events in total; the clock runs from the first row to the return of ``flush()``,
so the figure is rows committed per second, end to end. The server lives in a temporary
directory and is stopped and removed at the end.

    python bench/audit_bench.py                        # 30,000 events = 90,000 rows, batch 1000
    python bench/audit_bench.py --events 60000 --batch 5000
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.store import Attempt, AttemptOutcome, EmbeddedPostgres, Store

FLUSH_BOUND = 300.0  # seconds: the run is abandoned rather than left hanging


def make_event(n: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "source": "/bench/uploads",
        "id": f"evt-{n:09d}",
        "type": "com.example.object.created",
        "subject": f"photos/{n % 1000}/image-{n}.jpg",
        "time": "2026-11-28T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {"bucket": "photos", "key": f"image-{n}.jpg", "size": n, "pad": "x" * 700},
    }


async def run(events: int, producers: int, batch: int, buffer: int) -> tuple[int, float]:
    root = Path(tempfile.mkdtemp(prefix="eventbus-bench-pg-"))
    try:
        async with (
            EmbeddedPostgres(root / "data") as pg,
            await Store.open(pg.dsn, audit_batch=batch, audit_buffer=buffer) as store,
        ):
            audit = store.audit
            pool = [make_event(n) for n in range(events)]

            async def produce(part: int) -> None:
                for event in pool[part::producers]:
                    await audit.event_accepted(event, via="http")
                    await audit.rule_matched(event, "thumbnails", "resize-fn")
                    await audit.attempt(
                        Attempt(
                            event=event,
                            rule="thumbnails",
                            target="resize-fn",
                            number=1,
                            outcome=AttemptOutcome.DELIVERED,
                            status=200,
                            duration_ms=4.2,
                        )
                    )

            started = time.perf_counter()
            await asyncio.gather(*(produce(p) for p in range(producers)))
            await asyncio.wait_for(audit.flush(), FLUSH_BOUND)
            elapsed = time.perf_counter() - started
            rows = 0
            for table in ("events", "matches", "attempts"):
                rows += await store.pool.fetchval(f"SELECT count(*) FROM {table}")
            return rows, elapsed
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--buffer", type=int, default=50_000)
    args = parser.parse_args()
    rows, elapsed = asyncio.run(run(args.events, args.producers, args.batch, args.buffer))
    print(h.machine())
    print("| rows | batch | buffer | producers | seconds | rows/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {rows:,} | {args.batch:,} | {args.buffer:,} | {args.producers} "
        f"| {elapsed:.2f} | {rows / elapsed:,.0f} |"
    )


if __name__ == "__main__":
    main()
