"""Benchmark of rule reloading at scale: how long ``load_rules`` takes for a rule directory of
10,000 rules, each with a pattern and a CEL condition of its own, cold and when one rule of the
set changed (the section "Rule engine: reloading" of bench/RESULTS.md is this output).

The rules are the pattern benchmark's workload (``rules_bench.build_patterns``, seed 42), spread
over ``--files`` YAML files; every rule's condition is distinct text
(``event.data.priority < 3 && event.data.amount != N``), so nothing is shared between rules and
the cold build compiles every one. Then, in the same process, as ``eventbus serve`` does on a
reload: the directory read again unchanged, and with one rule's condition edited in one file
(a different rule each round; median of ``--rounds``). The cold build is the reference.
Also after the cold build: the process's peak RSS, and how long one full collection of the
cyclic garbage collector takes with the new rules in it (``eventbus serve`` freezes the rules
it starts with out of the collector's sight; rules loaded by a reload are walked by each full
collection, which holds the event loop that long). Last, as after ``eventbus serve`` started
(it freezes what it loaded at start-up out of the collector's sight, ``gc.freeze``), a reload
that edits every condition: its time, the RSS after it, and how many objects of the old rules
stayed behind as frozen garbage (what ``gc.unfreeze`` and a collection then free).

    python bench/reload_bench.py                  # 10,000 rules in 100 files, 5 rounds
    python bench/reload_bench.py --rules 1000 --files 10
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from bench.rules_bench import build_patterns
from eventbus.rules import RuleSetHolder, load_rules

SECTION = "Rule engine: reloading"


def rule(i: int, pattern: dict[str, Any], *, edit: int = 0) -> dict[str, Any]:
    return {
        "name": f"rule-{i:05d}",
        "match": pattern,
        "when": f"event.data.priority < 3 && event.data.amount != {i * 10 + edit}",
        "targets": ["fn"],
    }


def write_files(root: Path, rules: list[dict[str, Any]], files: int) -> list[Path]:
    per_file = -(-len(rules) // files)
    paths = []
    for f in range(files):
        path = root / f"rules-{f:03d}.yaml"
        path.write_text(yaml.safe_dump(rules[f * per_file : (f + 1) * per_file], sort_keys=False))
        paths.append(path)
    return paths


def timed_load(root: Path, holder: RuleSetHolder | None) -> tuple[float, RuleSetHolder]:
    """Seconds to load ``root``: cold (no holder yet), else a reload of ``holder`` as
    ``eventbus serve`` does it (``POST /rules/reload``)."""
    started = time.perf_counter()
    if holder is None:
        holder = RuleSetHolder(load_rules(root, known_targets={"fn"}))
    else:
        holder.reload(root, known_targets={"fn"})
    return time.perf_counter() - started, holder


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=10_000, help="rules in the set")
    parser.add_argument("--files", type=int, default=100, help="YAML files they are spread over")
    parser.add_argument("--rounds", type=int, default=5, help="reloads with one rule changed")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = parser.parse_args()

    patterns = build_patterns(args.rules, args.seed)
    rules = [rule(i, p) for i, p in enumerate(patterns)]
    per_file = -(-args.rules // args.files)
    with tempfile.TemporaryDirectory(prefix="eventbus-reload-") as tmp:
        root = Path(tmp)
        write_files(root, rules, args.files)
        cold, holder = timed_load(root, None)
        assert len(holder.current) == args.rules, len(holder.current)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        started = time.perf_counter()
        gc.collect()
        collection = time.perf_counter() - started
        unchanged, _ = timed_load(root, holder)
        one_changed = []
        for n in range(1, args.rounds + 1):
            i = (n * 7919) % args.rules
            rules[i] = rule(i, patterns[i], edit=n)
            f = i // per_file
            chunk = rules[f * per_file : (f + 1) * per_file]
            (root / f"rules-{f:03d}.yaml").write_text(yaml.safe_dump(chunk, sort_keys=False))
            took, _ = timed_load(root, holder)
            one_changed.append(took)
            assert holder.current.rules[i].definition["when"] == rules[i]["when"]
        gc.collect()
        gc.freeze()
        rules = [rule(i, p, edit=args.rounds + 1) for i, p in enumerate(patterns)]
        write_files(root, rules, args.files)
        all_changed, _ = timed_load(root, holder)
        rss_after = _rss_mb()
        gc.unfreeze()
        left_behind = gc.collect()
    changed = statistics.median(one_changed)
    body = (
        f"`python bench/reload_bench.py --rules {args.rules} --files {args.files}`: "
        f"{args.rules:,} rules, each with a pattern and a distinct CEL condition, in "
        f"{args.files} files; `load_rules` timed cold, then again in the same process unchanged "
        f"and with one rule edited (median of {args.rounds}), each through "
        f"`RuleSetHolder.reload` as `POST /rules/reload` does; last, with what was loaded "
        "frozen out of the collector's sight (`gc.freeze`, as `eventbus serve` does once "
        "started), a reload that edits every condition: RSS after it, and the old rules' "
        "objects left behind as frozen garbage (freed by `gc.unfreeze` and a collection). "
        f"Machine: {h.machine()} Load average at the end: {h.load_average()}.\n\n"
        "| rules | cold build (s) | reload, nothing changed (s) | reload, one rule changed (s) "
        "| one changed / cold | peak RSS (MB) | one full collection after the build (s) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {args.rules:,} | {cold:.2f} | {unchanged:.2f} | {changed:.2f} "
        f"| {changed / cold:.3f} | {peak_mb:,.0f} | {collection:.2f} |\n\n"
        "| reload, every condition changed (s) | RSS after (MB) | old objects left frozen |\n"
        "|---:|---:|---:|\n"
        f"| {all_changed:.2f} | {rss_after:,.0f} | {left_behind:,} |\n"
    )
    print(body)
    if args.write:
        h.write_section(SECTION, body)


if __name__ == "__main__":
    main()
