"""Rule engine: the cost of an event whose array fields are tested against many wildcard and
cidr conditions (the operators the index used to test one by one).

3,000 wildcards (``abc*de*.xyz``, random letters) and 1,000 cidr blocks (/16, /24, /28) on two
fields of ``data``; the event carries 500 names and 500 IPv4 addresses. Prints milliseconds per
``PatternIndex.match``. Run from the tree to measure, e.g. ``python bench/wildcard_bench.py``.
"""

from __future__ import annotations

import argparse
import random
import time

from eventbus.rules._index import PatternIndex
from eventbus.rules._pattern import compile_pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wildcards", type=int, default=3000)
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--values", type=int, default=500, help="names and addresses per event")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    def word(n: int) -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(n))

    entries = [
        (i, compile_pattern({"data": {"name": [{"wildcard": f"{word(3)}*{word(2)}*.{word(3)}"}]}}))
        for i in range(args.wildcards)
    ]
    for i in range(args.blocks):
        block = f"10.{i % 256}.{(i * 7) % 256}.0/{rng.choice([16, 24, 28])}"
        entries.append((args.wildcards + i, compile_pattern({"data": {"ip": [{"cidr": block}]}})))
    index = PatternIndex(entries)
    ips = [
        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        for _ in range(args.values)
    ]
    event = {"data": {"name": [word(12) for _ in range(args.values)], "ip": ips}}
    runs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.duration or runs == 0:
        index.match(event)
        runs += 1
    each = (time.perf_counter() - start) / runs
    print(
        f"{each * 1000:.2f} ms per event ({runs} runs;"
        f" {len(entries)} rules, {args.values} values per field)"
    )


if __name__ == "__main__":
    main()
