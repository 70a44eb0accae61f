"""Benchmark of the retention pruner (``eventbus.store.Pruner``): one round over audit tables
where old trails are kept because a dead letter of their event is (``dead_letters: forever``,
the default), beside old trails that go. Printed as a markdown table; ``--write-results``
replaces the section "Retention: pruning beside kept trails" of bench/RESULTS.md.

An embedded PostgreSQL in a temporary directory (removed at the end) holds ``--kept`` old
events with a dead letter each (their events, matches and attempts rows kept) and ``--pruned``
old events without (their rows deleted), interleaved in time, and as many recent events (kept
by age). The figure is the round's wall time and the rows it deleted; the kept rows must all
be there after it.

    python bench/retention_bench.py                          # 50,000 kept, 100,000 pruned
    python bench/retention_bench.py --kept 200000 --pruned 200000 --batch 5000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.store import EmbeddedPostgres, Store
from eventbus.store._retention import Pruner, RetentionPolicy

TITLE = "Retention: pruning beside kept trails"
_FILL = """
INSERT INTO events (source, id, type, received_at, via, event)
SELECT 'bench', 'e' || n, 't', now() - interval '40 days' + n * interval '1 ms', 'http', '{}'
FROM generate_series(1, $1) AS n;
"""
_FILL_RECENT = """
INSERT INTO events (source, id, type, received_at, via, event)
SELECT 'bench', 'r' || n, 't', now() - n * interval '1 ms', 'http', '{}'
FROM generate_series(1, $1) AS n;
"""
_TRAILS = """
INSERT INTO matches (source, id, rule, target, at)
SELECT source, id, 'rule', 'fn', received_at FROM events;
INSERT INTO attempts (source, id, rule, target, attempt, outcome, duration_ms, at)
SELECT source, id, 'rule', 'fn', 1, 'dead-lettered', 1.0, received_at FROM events;
"""
# interleaved: every (kept + pruned) / kept -th old event has a dead letter, the kept rows
# spread through time; kept-first: the oldest ``kept`` events have one (a backlog of dead
# letters older than the trails pruned beside them)
_DEAD = """
INSERT INTO dead_letters (event_source, event_id, event, rule, target, payload, is_cloudevent,
    attempts, history, reason, first_attempt_at)
SELECT 'bench', 'e' || n, '{}', 'rule', 'fn', '{}', true, 1, '[]', 'attempts-exhausted', now()
FROM generate_series(1, $1) AS n WHERE {which};
"""


async def run(kept: int, pruned: int, recent: int, batch: int, layout: str) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="eventbus-bench-retention-"))
    try:
        async with EmbeddedPostgres(root / "data") as pg, await Store.open(pg.dsn) as store:
            pool = store.pool
            old = kept + pruned
            step = old // kept
            async with pool.acquire() as conn:
                await conn.execute(_FILL.replace("$1", str(old)))
                await conn.execute(_FILL_RECENT.replace("$1", str(recent)))
                await conn.execute(_TRAILS)
                which = f"n % {step} = 0" if layout == "interleaved" else f"n <= {kept}"
                await conn.execute(_DEAD.replace("$1", str(old)).replace("{which}", which))
                await conn.execute("ANALYZE")
                dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
            pruner = Pruner(pool, RetentionPolicy(audit=30 * 86400.0), batch=batch)
            began = time.perf_counter()
            deleted = await pruner.prune()
            took = time.perf_counter() - began
            assert deleted is not None
            left = await pool.fetchval("SELECT count(*) FROM events")
            assert left == dead + recent, (left, dead, recent)  # every kept trail is there
            return {
                "dead": float(dead),
                "deleted": float(sum(deleted.values())),
                "seconds": took,
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kept", type=int, default=50_000, help="old events with a dead letter")
    parser.add_argument("--pruned", type=int, default=100_000, help="old events without one")
    parser.add_argument("--recent", type=int, default=50_000, help="events within the age")
    parser.add_argument("--batch", type=int, default=5_000, help="rows one DELETE removes")
    parser.add_argument("--layout", choices=("interleaved", "kept-first"), default="kept-first")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    rows = []
    for n in range(args.rounds):
        got = asyncio.run(run(args.kept, args.pruned, args.recent, args.batch, args.layout))
        rows.append(
            f"| {n + 1} | {args.layout} | {args.kept:,} | {args.pruned:,} | {args.batch:,} | "
            f"{int(got['deleted']):,} | {got['seconds']:.2f} | "
            f"{got['deleted'] / got['seconds']:,.0f} |"
        )
    command = "python bench/retention_bench.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            f"`{command.strip()}` on {h.machine()}",
            "",
            "One round of the pruner (`audit: 30d`, `dead_letters: forever`) over events 40 days"
            " old, some with a dead letter (their event, match and attempt rows kept): the"
            " oldest of them (kept-first), or one in every (kept + pruned) / kept"
            " (interleaved); and recent events, kept by age. Each event has one match and one"
            " attempt row.",
            "",
            "| round | layout | old events kept | old events pruned | batch | rows deleted"
            " | seconds | rows deleted/s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(body)
    if args.write_results:
        h.write_section(TITLE, body)


if __name__ == "__main__":
    main()
