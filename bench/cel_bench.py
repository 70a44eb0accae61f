"""Benchmark of CEL conditions on cel-python and on cel-expr-python (the ``fast-cel`` extra):
µs per evaluation, per event conversion and per event end to end, printed as a markdown table.
"cel-python" is the default runtime as eventbus runs it, its fast path (``_cel_fast``) first;
"cel-python alone" the same condition with the fast path taken away.

Each figure is the median of ``--rounds`` rounds of ``--number`` calls. "evaluate" reuses one
activation, whose conversion is then paid already. "convert" is what each runtime pays once per
event (cel-python: ``_to_cel`` in Python; cel-expr-python: the int64 check in Python, then its
C++ conversion on the first evaluation, measured as a fresh activation plus one evaluation less
that evaluation). "convert + condition" is what a router pays for an event whose one matching
rule has that condition.

    python bench/cel_bench.py
    python bench/cel_bench.py --rounds 9 --number 2000

Not a bench/RESULTS.md section: figures there come from a fresh environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventbus.rules._cel import Condition, _celpy_context, activation, compile_condition

CONDITIONS = [
    "event.data.priority < 3",
    "has(event.data.coupon) && event.data.coupon.startsWith('VIP')",
    "has(event.data.total) && event.data.total > 100",
    'event.source.startsWith("shop/") && event.type.endsWith(".placed")',
    'event.data.currency.matches("^[A-Z]{3}$")',
    "event.data.items.exists(i, i.qty >= 10)",
    "size(event.data.items) > 1 && event.data.shipping.country != event.data.billing.country",
    'timestamp(event.time) > timestamp("2026-01-01T00:00:00Z")',
]


def build_event(items: int) -> dict[str, Any]:
    """An order CloudEvent: about 600 bytes of JSON, and 190 more per item."""
    address = {"street": "Hauptstraße 1", "city": "Berlin", "zip": "10115", "country": "DE"}
    return {
        "specversion": "1.0",
        "id": "8f0c1a2e-3b4d-4e5f-9a6b-7c8d9e0f1a2b",
        "source": "shop/eu",
        "type": "com.example.order.placed",
        "time": "2026-11-28T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "order": "A-100234",
            "priority": 2,
            "total": 250,
            "currency": "EUR",
            "customer": {"id": "c-42", "tier": "pro", "email": "someone@example.com"},
            "shipping": address,
            "billing": {**address, "country": "AT"},
            "items": [
                {"sku": f"SKU-{i:04d}", "qty": 1 + i % 3, "price": 9.5 + i, "tags": ["a", "b"]}
                for i in range(items)
            ],
            "note": None,
        },
    }


def _median_us(call: Callable[[], object], rounds: int, number: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(times)


def _runtimes(source: str) -> tuple[Condition, Condition]:
    return compile_condition(source), compile_condition(source, native=True)


def _alone(condition: Condition) -> Condition:
    return dataclasses.replace(condition, fast=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=1000)
    args = parser.parse_args()
    rounds, number = args.rounds, args.number

    event = build_event(3)
    shared = activation(event)
    rows = [
        "| condition | fast path | cel-python µs | cel-python alone µs | cel-expr-python µs |",
        "|---|---|--:|--:|--:|",
    ]
    for source in CONDITIONS:
        py, native = _runtimes(source)
        alone = _alone(py)
        assert py.evaluate(shared) == native.evaluate(shared) == alone.evaluate(shared), source
        t_py = _median_us(lambda py=py: py.evaluate(shared), rounds, number)
        t_alone = _median_us(lambda alone=alone: alone.evaluate(shared), rounds, number)
        t_native = _median_us(lambda native=native: native.evaluate(shared), rounds, number)
        fast = "no" if py.fast is None else "yes"
        rows.append(f"| `{source}` | {fast} | {t_py:.1f} | {t_alone:.1f} | {t_native:.2f} |")

    rows += ["", "| per event | size | cel-python alone µs | cel-expr-python µs | ratio |"]
    rows.append("|---|--:|--:|--:|--:|")
    first_py, first_native = _runtimes(CONDITIONS[0])
    first_alone = _alone(first_py)
    for items in (0, 3, 10, 40):
        event = build_event(items)
        size = len(json.dumps(event).encode())
        reused = activation(event)
        t_py = _median_us(lambda event=event: _celpy_context(event), rounds, number)
        t_eval = _median_us(lambda reused=reused: first_native.evaluate(reused), rounds, number)
        t_event = _median_us(
            lambda event=event: first_native.evaluate(activation(event)), rounds, number
        )
        rows.append(
            f"| convert | {size} B | {t_py:.1f} | {t_event - t_eval:.1f} "
            f"| {t_py / (t_event - t_eval):.0f}x |"
        )
        t_py = _median_us(
            lambda event=event: first_alone.evaluate(activation(event)), rounds, number
        )
        rows.append(
            f"| convert + `{CONDITIONS[0]}` | {size} B | {t_py:.1f} | {t_event:.1f} "
            f"| {t_py / t_event:.0f}x |"
        )
        t_fast = _median_us(
            lambda event=event: first_py.evaluate(activation(event)), rounds, number
        )
        rows.append(
            f"| the same with the fast path (no conversion) | {size} B | {t_fast:.1f} | "
            f"{t_event:.1f} | {t_fast / t_event:.2f}x |"
        )

    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("cel-python", "cel-expr-python")
    )
    print(
        f"Python {platform.python_version()}, {versions}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}; median of {rounds} rounds of {number} calls.\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
