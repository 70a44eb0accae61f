"""Cost curves of the pipeline: how the cost of one event grows with the work it causes. One
``eventbus serve`` process (JetStream and PostgreSQL embedded, audit on) behind HTTP ingest, and
an aiohttp function endpoint, each curve a table of the cost as the work grows, the first row
the reference:

- ``fanout``: one event matching 1, 10 and 50 rules (each rule its own target path):
  deliveries per second and CPU per delivery;
- ``size``: events carrying 1 KiB, 64 KiB and 256 KiB of data: events/s, MB/s and RSS;
- ``targets``: 10, 100 and 1,000 distinct HTTP targets, events spread over them: events/s, RSS
  and open file descriptors per target;
- ``rules``: 10 to 10,000 rules, each event matching one, with and without a CEL condition on
  every rule: events/s and CPU per event.

Each point: a fresh service, a warm-up, then a closed loop of ``CONCURRENCY`` requests for
``--duration`` seconds; deliveries counted at the endpoint once the backlog drained; CPU is the
service's Python processes' user + system time over the phase.

    python bench/curves_bench.py [--curves fanout size targets rules] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h

SECTION = "Cost curves"
WARMUP = 2.0
CONCURRENCY = 32
DRAIN_BOUND = 120.0


@dataclass
class Point:
    curve: str
    label: str
    accepted_per_s: float
    deliveries_per_s: float
    cpu_ms_per_event: float
    cpu_ms_per_delivery: float
    mb_per_s: float
    rss_mb: float
    fds: int


def _event(**data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "source": "bench/curves",
        "type": "com.example.curve",
        "datacontenttype": "application/json",
        "data": data,
    }


def _fanout(n: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    rules = "".join(
        f"- name: r{i}\n  match: {{type: [com.example.curve]}}\n  targets: [t{i}]\n"
        for i in range(n)
    )
    return rules, [_target(f"t{i}", f"/t{i}") for i in range(n)], [_event(k=1)]


def _size(kib: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    rules = "- name: all\n  match: {type: [com.example.curve]}\n  targets: [fn]\n"
    # JSON text of about ``kib`` KiB (the receiver parses it as the data)
    return rules, [_target("fn", "/fn")], [_event(pad="x" * (kib * 1024 - 200))]


def _targets(n: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    rules = "".join(
        f"- name: r{i}\n  match: {{data: {{k: [{i}]}}}}\n  targets: [t{i}]\n" for i in range(n)
    )
    targets = [_target(f"t{i}", f"/t{i}", concurrency=4) for i in range(n)]
    # The load cycles through its templates: 200 of them spread the events over the targets.
    events = [_event(k=i % n) for i in range(min(n, 200))]
    return rules, targets, events


def _rules(n: int, cel: bool) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    when = "  when: event.data.amount > 10 && event.data.tier != 'free'\n" if cel else ""
    rules = "".join(
        f"- name: r{i}\n  match: {{source: [bench/curves], data: {{tenant: [t{i}]}}}}\n"
        f"{when}  targets: [fn]\n"
        for i in range(n)
    )
    events = [_event(tenant=f"t{i * n // 20}", amount=50, tier="pro") for i in range(20)]
    return rules, [_target("fn", "/fn")], events


def _target(name: str, path: str, *, concurrency: int = 64) -> dict[str, Any]:
    return {"name": name, "type": "http", "url": f"{{receiver}}{path}", "concurrency": concurrency}


Case = tuple[str, str, Callable[[], tuple[str, list[dict[str, Any]], list[dict[str, Any]]]], int]

CURVES: dict[str, list[Case]] = {
    "fanout": [("fanout", f"{n} rules", lambda n=n: _fanout(n), n) for n in (1, 10, 50)],
    "size": [("size", f"{k} KiB", lambda k=k: _size(k), 1) for k in (1, 64, 256)],
    "targets": [("targets", f"{n} targets", lambda n=n: _targets(n), 1) for n in (10, 100, 1000)],
    "rules": [
        (f"rules{' + CEL' if cel else ''}", f"{n} rules", lambda n=n, cel=cel: _rules(n, cel), 1)
        for cel in (False, True)
        for n in (10, 1000, 10_000)
    ],
}


async def _point(case: Case, args: argparse.Namespace, work: Path, n: int) -> Point:
    curve, label, build, fanout = case
    rules, targets, events = build()
    where = work / f"{curve.replace(' + ', '-').replace(' ', '-')}-{n}"  # no spaces: see store
    where.mkdir(parents=True)
    with h.Processes(where) as procs:
        receiver = h.start_receiver(procs)
        await receiver.ready()
        for target in targets:
            target["url"] = target["url"].replace("{receiver}", receiver.url(""))
        url, proc = await h.start_eventbus(procs, where, workers=1, rules=rules, targets=targets)
        service = psutil.Process(proc.pid)
        warm = await h.run_load(procs, h.load_command(url, events, f"w{n}", duration=WARMUP))
        await receiver.wait_delivered(f"w{n}", warm["accepted"] * fanout, bound=DRAIN_BOUND)
        run = f"r{n}"
        cpu = h.python_cpu([proc.pid])
        spies = []
        if args.profile is not None:
            folder = args.profile / f"{curve}-{label}".replace(" ", "-")
            spies = h.profile(h.python_pids([proc.pid]), args.duration, folder)
        load = await h.run_load(
            procs,
            h.load_command(url, events, run, concurrency=CONCURRENCY, duration=args.duration),
        )
        for spy in spies:
            spy.wait(timeout=args.duration + 30)
        stats = await _drained(receiver, run, load["accepted"] * fanout)
        cpu_s = h.python_cpu([proc.pid]) - cpu
        rss = service.memory_info().rss / 2**20
        fds = service.num_fds()
        procs.stop(proc)
    span = max((stats["last_at"] or load["ended_at"]) - load["started_at"], 1e-9)
    accepted = load["accepted"]
    deliveries = stats["answered_ok"]
    size = len(str(events[0]))
    return Point(
        curve,
        label,
        accepted / span,
        deliveries / span,
        cpu_s * 1000 / max(accepted, 1),
        cpu_s * 1000 / max(deliveries, 1),
        accepted * size / span / 2**20,
        rss,
        fds,
    )


async def _drained(receiver: h.Receiver, run: str, expected: int) -> dict[str, Any]:
    """Stats once ``expected`` answers were counted (every delivery of every event)."""
    deadline = asyncio.get_running_loop().time() + DRAIN_BOUND
    while True:
        stats = await receiver.stats(run)
        if stats["answered_ok"] >= expected or asyncio.get_running_loop().time() > deadline:
            return stats
        await asyncio.sleep(0.2)


def render(points: list[Point], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    lines = [
        f"`python bench/curves_bench.py --curves {' '.join(args.curves)} --duration"
        f" {args.duration:g}` on {h.machine()}; load average (1/5/15 min) {loads[0]} before,"
        f" {loads[1]} after.",
        "",
        f"One process, closed loop of {CONCURRENCY} requests, JetStream and PostgreSQL embedded,"
        " audit on. Ratio: CPU per delivery against the curve's first row.",
        "",
        "| curve | point | accepted/s | deliveries/s | CPU ms/event | CPU ms/delivery |"
        " MB/s in | RSS MB | fds | CPU/delivery ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first: dict[str, Point] = {}
    for p in points:
        base = first.setdefault(p.curve, p)
        lines.append(
            f"| {p.curve} | {p.label} | {p.accepted_per_s:,.0f} | {p.deliveries_per_s:,.0f} |"
            f" {p.cpu_ms_per_event:.2f} | {p.cpu_ms_per_delivery:.3f} | {p.mb_per_s:.1f} |"
            f" {p.rss_mb:.0f} | {p.fds} |"
            f" {p.cpu_ms_per_delivery / max(base.cpu_ms_per_delivery, 1e-9):.2f} |"
        )
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> str:
    h.environment()  # refuse an environment that would make the figures wrong, first
    before = h.load_average()
    work = Path(tempfile.mkdtemp(prefix="eventbus-curves-"))
    points = []
    try:
        for name in args.curves:
            for i, case in enumerate(CURVES[name]):
                points.append(await _point(case, args, work, len(points) * 10 + i))
                print(f"  {points[-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return render(points, args, (before, h.load_average()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", nargs="+", choices=list(CURVES), default=list(CURVES))
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample the service with py-spy at each point; collapsed stacks under this folder",
    )
    args = parser.parse_args()
    table = asyncio.run(main(args))
    print(table)
    if args.profile is not None:
        for folder in sorted(p for p in args.profile.iterdir() if p.is_dir()):
            print(f"\n### {folder.name}\n\n{h.summarize(folder)}")
    if args.write_results:
        h.write_section(SECTION, table)
