"""Benchmark of the rule engine's pattern matching: events/s and µs/event against 10 to 10,000
rules, printed as a markdown table (the section "Rule engine: pattern matching" of
bench/RESULTS.md is this output).

Rules mix exact, prefix, numeric and anything-but conditions over CloudEvents with about twenty
leaf fields; everything is derived from ``--seed``, so a run is reproducible. Each size is timed
for about ``--duration`` seconds of matching (at most ``--max-rounds`` passes over the event
pool), the sizes taking turns pass by pass; the median pass is reported.

    python bench/rules_bench.py                       # 10, 100, 1000, 10000 rules, 2 s each
    python bench/rules_bench.py --sizes 10,10000 --duration 5
    python bench/rules_bench.py --cel                 # rules with CEL too, via RuleSet.route

``build_patterns`` and ``build_events`` are the reusable workload.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.rules._index import PatternIndex
from eventbus.rules._pattern import compile_pattern

SOURCES = [f"//svc-{i:03d}.example.com/orders" for i in range(200)]
TYPES = [
    f"com.example.{entity}.{verb}"
    for entity in (
        "order",
        "invoice",
        "upload",
        "user",
        "payment",
        "shipment",
        "refund",
        "review",
        "cart",
        "ticket",
    )
    for verb in ("created", "updated", "deleted", "failed", "retried")
]
TENANTS = [f"tenant-{i:02d}" for i in range(40)]
REGIONS = ["eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-south-1"]
STATUSES = ["new", "paid", "shipped", "cancelled", "refunded", "on-hold"]
CURRENCIES = ["EUR", "USD", "GBP", "JPY"]
TIERS = ["free", "pro", "enterprise"]


def build_patterns(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` event patterns, a quarter each anchored on exact, prefix, numeric, anything-but."""
    rng = random.Random(seed)
    patterns: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 4
        source, event_type = rng.choice(SOURCES), rng.choice(TYPES)
        if kind == 0:
            pattern: dict[str, Any] = {
                "source": [source],
                "type": [event_type],
                "data": {"region": rng.sample(REGIONS, 2)},
            }
        elif kind == 1:
            pattern = {
                "source": [source],
                "subject": [{"prefix": f"uploads/{rng.choice(TENANTS)}/"}],
            }
        elif kind == 2:
            low = rng.randrange(0, 900)
            pattern = {
                "type": [event_type],
                "data": {
                    "tenant": [rng.choice(TENANTS)],
                    "amount": [{"numeric": [">=", low, "<", low + rng.randrange(10, 500)]}],
                },
            }
        else:
            pattern = {
                "source": [source],
                "type": [event_type],
                "data": {"status": [{"anything-but": rng.sample(STATUSES, 2)}]},
            }
        patterns.append(pattern)
    return patterns


def build_events(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` CloudEvents (JSON form) with ~20 leaf fields, drawn from the rules' vocabulary."""
    rng = random.Random(seed + 1)
    events = []
    for i in range(n):
        tenant = rng.choice(TENANTS)
        events.append(
            {
                "specversion": "1.0",
                "id": f"evt-{seed}-{i}",
                "source": rng.choice(SOURCES),
                "type": rng.choice(TYPES),
                "subject": f"uploads/{tenant}/{rng.randrange(10**6)}.png",
                "time": f"2026-11-28T12:{i % 60:02d}:00Z",
                "datacontenttype": "application/json",
                "data": {
                    "tenant": tenant,
                    "region": rng.choice(REGIONS),
                    "status": rng.choice(STATUSES),
                    "amount": round(rng.uniform(0, 1000), 2),
                    "currency": rng.choice(CURRENCIES),
                    "items": [
                        {"sku": f"sku-{rng.randrange(1000)}", "qty": rng.randrange(1, 5)}
                        for _ in range(rng.randrange(1, 4))
                    ],
                    "customer": {
                        "id": rng.randrange(10**6),
                        "tier": rng.choice(TIERS),
                        "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
                    },
                    "tags": rng.sample(["a", "b", "c", "d", "e"], 2),
                    "priority": rng.randrange(5),
                },
            }
        )
    return events


def _prepare(size: int, args: argparse.Namespace) -> tuple[Callable[[Any], list[Any]], float]:
    """The matching function for ``size`` rules, and how long building it took."""
    patterns = build_patterns(size, args.seed)
    started = time.perf_counter()
    if args.cel:
        from eventbus.rules import compile_rules

        # Each rule also gets a `when` condition, true for about half of the events, and the
        # rule set is measured through RuleSet.route: the pattern index, CEL only on pattern
        # hits, the event converted for CEL once, Route objects built. The build time then
        # is the whole rule set's (index and CEL compilation).
        route = compile_rules(
            [
                {"name": f"r{i}", "match": p, "when": "event.data.priority < 3", "targets": ["t"]}
                for i, p in enumerate(patterns)
            ]
        ).route
        return route, time.perf_counter() - started
    index = PatternIndex((i, compile_pattern(p)) for i, p in enumerate(patterns))
    return index.match, time.perf_counter() - started


def _measure(
    sizes: list[int], args: argparse.Namespace, events: list[dict[str, Any]]
) -> list[dict[str, float]]:
    """Time passes over ``events`` for every size in turn, round after round, so that load
    from other processes on a shared machine falls on all sizes alike; report the median."""
    prepared = [_prepare(size, args) for size in sizes]
    gc.collect()
    gc.freeze()
    passes: list[list[float]] = [[] for _ in sizes]
    matched = [0 for _ in sizes]
    deadline = time.perf_counter() + args.duration * len(sizes)
    for _ in range(args.max_rounds):
        for i, (match, _build_s) in enumerate(prepared):
            started = time.perf_counter()
            for event in events:
                matched[i] += len(match(event))
            passes[i].append(time.perf_counter() - started)
        if time.perf_counter() >= deadline:
            break
    gc.unfreeze()
    rows = []
    for i, size in enumerate(sizes):
        us_per_event = statistics.median(passes[i]) / len(events) * 1e6
        rows.append(
            {
                "rules": size,
                "build_s": prepared[i][1],
                "events_per_s": 1e6 / us_per_event,
                "us_per_event": us_per_event,
                "matches_per_event": matched[i] / (len(passes[i]) * len(events)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,10000", help="rule counts, comma-separated")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of matching per size")
    parser.add_argument("--events", type=int, default=2000, help="distinct events in the pool")
    parser.add_argument("--max-rounds", type=int, default=1000, help="passes over the pool at most")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--cel", action="store_true", help="give each rule a CEL condition; time RuleSet.route"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    events = build_events(args.events, args.seed)
    rows = _measure(sizes, args, events)
    print(
        f"Machine: {h.machine()}; seed {args.seed}, {args.events} events, "
        f"{args.duration:g} s per size{', with CEL' if args.cel else ''}\n"
    )
    build = "rule set build (s)" if args.cel else "index build (s)"
    print(f"| rules | {build} | events/s | µs/event | matches/event |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['rules']:,} | {row['build_s']:.3f} | {row['events_per_s']:,.0f} "
            f"| {row['us_per_event']:.1f} | {row['matches_per_event']:.2f} |"
        )
    if len(rows) > 1:
        ratio = rows[-1]["us_per_event"] / rows[0]["us_per_event"]
        print(
            f"\nCost per event at {rows[-1]['rules']:,} rules / at {rows[0]['rules']:,}: "
            f"{ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
