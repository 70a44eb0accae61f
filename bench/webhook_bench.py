"""Benchmark of webhook ingest: signed GitHub webhooks at ``POST /hooks/github`` (HMAC-SHA256
verified, mapped to a CloudEvent) against CloudEvents at ``POST /events``, on one ``eventbus
serve`` (embedded JetStream and PostgreSQL, one rule to a function endpoint). The issue's
target: webhook ingest at least 80 % of ``POST /events`` throughput.

Every component is its own process (bench/_harness.py): the load generator (here: a closed
loop of ``--concurrency`` requests for ``--duration`` seconds, each webhook signed as GitHub
signs it), the function endpoint, eventbus. The phases alternate (events, hooks, events, hooks)
after a warm-up of each, so drift in the machine's load hits both alike; the figure is 202
answers per second; every accepted event is then waited for at the endpoint.

    python bench/webhook_bench.py [--duration 10] [--rounds 2] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h

SECRET = "bench-webhook-secret-0123456789"
RULES = "- name: all\n  targets: [fn]\n"
CONCURRENCY = 64
# A GitHub push payload's usual shape, trimmed to about 1 KiB like the CloudEvent of the
# other benchmarks.
PUSH: dict[str, Any] = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
    "repository": {"id": 1296269, "full_name": "octocat/Hello-World", "private": False},
    "pusher": {"name": "octocat", "email": "octocat@github.com"},
    "commits": [
        {
            "id": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
            "message": "Update README.md " * 8,
            "timestamp": "2026-11-28T12:00:00Z",
            "author": {"name": "Monalisa Octocat", "email": "octocat@github.com"},
            "added": [],
            "removed": [],
            "modified": ["README.md"],
        }
    ],
}


class _Load:
    def __init__(self, url: str, mode: str, run: str) -> None:
        self.url, self.mode, self.run = url, mode, run
        self.seq = self.accepted = self.rejected = self.errors = 0

    def request(self) -> tuple[bytes, dict[str, str]]:
        n = self.seq
        self.seq += 1
        data = {**PUSH, "run": self.run, "sent": time.time()}
        if self.mode == "events":
            event = {
                "specversion": "1.0",
                "id": f"{self.run}-{n}",
                "source": "bench/github",
                "type": "com.github.push",
                "datacontenttype": "application/json",
                "data": data,
            }
            return orjson.dumps(event), {"content-type": "application/cloudevents+json"}
        body = orjson.dumps(data)
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        return body, {
            "content-type": "application/json",
            "x-github-event": "push",
            "x-github-delivery": f"{self.run}-{n}",
            "x-hub-signature-256": f"sha256={signature}",
        }

    async def post(self, http: aiohttp.ClientSession) -> None:
        body, headers = self.request()
        try:
            async with http.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 202:
                    self.accepted += 1
                else:
                    self.rejected += 1
        except (aiohttp.ClientError, TimeoutError):
            self.errors += 1


async def _load_main(args: argparse.Namespace) -> None:
    load = _Load(args.url, args.mode, args.run)
    connector = aiohttp.TCPConnector(limit=max(args.concurrency, 100))
    timeout = aiohttp.ClientTimeout(total=30)
    started = time.time()
    end = started + args.duration
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def worker() -> None:
            while time.time() < end:
                await load.post(http)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    report = {
        "sent": load.seq,
        "accepted": load.accepted,
        "rejected": load.rejected,
        "errors": load.errors,
        "started_at": started,
        "ended_at": time.time(),
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


def _load_command(url: str, mode: str, run: str, duration: float) -> list[str]:
    return [
        sys.executable,
        __file__,
        "load",
        "--url",
        url,
        "--mode",
        mode,
        "--run",
        run,
        "--duration",
        str(duration),
        "--concurrency",
        str(CONCURRENCY),
    ]


def per_request_us() -> tuple[float, float]:
    """In-process CPU per request of the two entry points' own work (best of 5 runs of 5,000):
    verify + map + encode a signed GitHub push, against reading and validating the same
    payload as a structured CloudEvent. Steadier than the end-to-end figures on a busy
    machine, and where the two entry points differ."""
    from eventbus.cloudevents import encode, parse_http
    from eventbus.sources import HookRequest, build_source

    source = build_source(
        {"name": "github", "type": "webhook", "verify": {"kind": "github", "secret": SECRET}}
    )
    loader = _Load("", "hooks", "micro")
    body, headers = loader.request()
    loader.mode = "events"
    event, event_headers = loader.request()

    def hook() -> None:
        encode(source.event_for(HookRequest("POST", headers, "", body)))

    def events() -> None:
        parse_http(event_headers, event, max_size=256 * 1024, max_entries=100)

    return tuple(  # type: ignore[return-value]
        min(timeit.repeat(f, number=5_000, repeat=5)) / 5_000 * 1e6 for f in (hook, events)
    )


async def main(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    with h.Processes(work) as procs:
        receiver = h.start_receiver(procs)
        await receiver.ready()
        (work / "connectors").mkdir(parents=True)
        hook = {
            "name": "github",
            "type": "webhook",
            "verify": {"kind": "github", "secret": SECRET},
        }
        (work / "connectors" / "hooks.yaml").write_bytes(orjson.dumps({"sources": [hook]}))
        target = {"name": "fn", "type": "http", "url": receiver.url("/fn")}
        events_url, proc = await h.start_eventbus(
            procs, work, workers=1, rules=RULES, targets=[target]
        )
        base = events_url.removesuffix("/events")
        urls = {"events": events_url, "hooks": base + "/hooks/github"}
        rates: dict[str, list[float]] = {"events": [], "hooks": []}
        missing = 0
        phases = [("warm", mode) for mode in urls]
        phases += [(f"r{i}", mode) for i in range(args.rounds) for mode in urls]
        for tag, mode in phases:
            run = f"{tag}-{mode}"
            duration = 3.0 if tag == "warm" else args.duration
            load = await h.run_load(procs, _load_command(urls[mode], mode, run, duration))
            got = await receiver.wait_delivered(run, load["accepted"], bound=120)
            if load["rejected"] or load["errors"]:
                raise RuntimeError(f"{run}: {load}")
            if tag != "warm":
                rates[mode].append(load["accepted"] / (load["ended_at"] - load["started_at"]))
                missing += load["accepted"] - got["delivered"]
        procs.stop(proc)
    events, hooks = (sum(rates[m]) / len(rates[m]) for m in ("events", "hooks"))
    ratio = hooks / events
    rows = [
        "| entry point | 202/s per round | mean 202/s |",
        "|---|---|---:|",
        f"| `POST /events` (structured CloudEvent) | {', '.join(f'{r:,.0f}' for r in rates['events'])} | {events:,.0f} |",  # noqa: E501
        f"| `POST /hooks/github` (HMAC-SHA256 verified) | {', '.join(f'{r:,.0f}' for r in rates['hooks'])} | {hooks:,.0f} |",  # noqa: E501
    ]
    verdict = "met" if ratio >= 0.8 else "NOT met"
    hook_us, events_us = per_request_us()
    return "\n".join(
        [
            f"`python bench/webhook_bench.py --duration {args.duration:g} --rounds "
            f"{args.rounds}` on {h.machine()}; load average {h.load_average()}. Closed loop, "
            f"{CONCURRENCY} requests outstanding, one `eventbus serve` worker on the embedded "
            "JetStream and PostgreSQL, one rule to a function endpoint; a ~1 KiB GitHub push "
            "payload either way.",
            "",
            *rows,
            "",
            f"Webhooks at {ratio:.0%} of `POST /events` (target ≥ 80 %: {verdict}); "
            f"accepted but not delivered when the drain wait ended: {missing}.",
            "",
            f"In-process CPU per request of the entry point's own work (best of 5 runs of 5,000): "
            f"verify, map and encode a signed push {hook_us:.1f} µs; read and validate the "
            f"same payload as a structured CloudEvent {events_us:.1f} µs.",
        ]
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    gen = sub.add_parser("load", help="the load generator (run by the benchmark)")
    gen.add_argument("--url", required=True)
    gen.add_argument("--mode", choices=["events", "hooks"], required=True)
    gen.add_argument("--run", required=True)
    gen.add_argument("--duration", type=float, required=True)
    gen.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="events/hooks phase pairs")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    if args.cmd == "load":
        asyncio.run(_load_main(args))
        return
    report = asyncio.run(main(args))
    print(report)
    if args.write_results:
        h.write_section("Webhook ingest", report)


if __name__ == "__main__":
    _main()
