"""Prometheus metrics: one registry for the process, exposed at ``GET /metrics``.

Every component increments these directly; names follow Prometheus conventions
(``eventbus_<thing>_<unit>``). Labels are bounded: target and rule names come from
configuration, never from event content.

The workers of ``eventbus serve --workers N`` count together: their parent gives each one
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode: every process keeps its
values in files there), and whichever worker answers ``GET /metrics`` renders the sum of all of
them; a gauge shows the largest (circuit state) or latest (retry backlog) value of the live
workers. The parent's own counts (the embedded servers and the workers it restarted) reach
the workers through one more file there (:class:`ParentFigures`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from eventbus._files import replace_file

__all__ = [
    "AUDIT_PENDING",
    "AUDIT_QUARANTINED",
    "BUS_REJECTED",
    "CIRCUIT_STATE",
    "DELIVERIES",
    "DELIVERIES_IN_FLIGHT",
    "DELIVERIES_PARKED",
    "DELIVERY_SECONDS",
    "EMBEDDED_RESTARTS",
    "EVENTS_DUPLICATE",
    "EVENTS_MATCHED",
    "EVENTS_RECEIVED",
    "EVENTS_REJECTED",
    "EVENTS_ROUTED",
    "HTTP_CONNECTIONS_DROPPED",
    "INVOCATIONS",
    "MULTIPROC_ENV",
    "REFUSALS_UNRECORDED",
    "REGISTRY",
    "RETENTION_DELETED",
    "RETRY_BACKLOG",
    "RULE_FAILURES",
    "WORKER_RESTARTS",
    "ParentFigures",
    "activity",
    "families",
    "forget_process",
    "render",
]

_log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_RECEIVED = Counter(
    "eventbus_events_received",
    "Events accepted onto the durable bus, by entry point",
    ["via"],
    registry=REGISTRY,
)
EVENTS_DUPLICATE = Counter(
    "eventbus_events_duplicate",
    "Events taken for duplicates, by entry point: the bus already held their source+id "
    "within its duplicate window, so they were not stored (JetStream) or not delivered again "
    "(Kafka, counted where read)",
    ["via"],
    registry=REGISTRY,
)
INVOCATIONS = Counter(
    "eventbus_invocations",
    "Synchronous invocations answered with the function's reply or failure (never on the bus), "
    "by entry point",
    ["via"],
    registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "eventbus_events_rejected",
    "Events or requests refused at an entry point, by reason (over HTTP the status answered: "
    "each refused event, single or an entry of a batch, invalid or not taken by the bus)",
    ["via", "reason"],
    registry=REGISTRY,
)
EVENTS_ROUTED = Counter(
    "eventbus_events_routed", "Bus messages the router evaluated", registry=REGISTRY
)
EVENTS_MATCHED = Counter(
    "eventbus_events_matched", "Bus messages that matched at least one rule", registry=REGISTRY
)
DELIVERIES = Counter(
    "eventbus_deliveries",
    "Delivery attempts by target and outcome (delivered, retry-scheduled, dead-lettered: the "
    "audit trail's spellings)",
    ["target", "outcome"],
    registry=REGISTRY,
)
RULE_FAILURES = Counter(
    "eventbus_rule_failures",
    "Events whose rule's condition failed (counted as no match) or whose transform for a "
    "target failed (that target skipped), by rule and what failed (condition, transform); a "
    "synchronous request's evaluation of the rules counts too",
    ["rule", "what"],
    registry=REGISTRY,
)
DELIVERIES_PARKED = Counter(
    "eventbus_deliveries_parked",
    "Deliveries written to the durable schedule without an attempt, by target and what they "
    "wait for (capacity: the target's slots, circuit: its open circuit)",
    ["target", "waiting_for"],
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "eventbus_delivery_seconds",
    "Duration of one delivery attempt",
    ["target"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
DELIVERIES_IN_FLIGHT = Gauge(
    "eventbus_deliveries_in_flight",
    "Deliveries under way per target (waiting for its rate limit, a connection, its answer or "
    "the record of the outcome; synchronous invocations too)",
    ["target"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
CIRCUIT_STATE = Gauge(
    "eventbus_circuit_state",
    "Circuit breaker state per target: 0 closed, 1 half-open, 2 open",
    ["target"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
HTTP_CONNECTIONS_DROPPED = Counter(
    "eventbus_http_connections_dropped",
    "HTTP connections closed by the server's limits, by reason (header_timeout, body_timeout, "
    "send_timeout, head_too_large, shed: the longest-waiting one made room at the connection "
    "cap, shed_body: the request whose body came slowest did, refused: at the cap)",
    ["reason"],
    registry=REGISTRY,
)
REFUSALS_UNRECORDED = Counter(
    "eventbus_refusals_unrecorded",
    "Refused requests over the audit rate limit: counted here and in one summary row a second",
    registry=REGISTRY,
)
RETRY_BACKLOG = Gauge(
    "eventbus_retry_backlog",
    "Deliveries waiting in the durable retry schedule",
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)
AUDIT_PENDING = Gauge(
    "eventbus_audit_pending",
    "Audit rows accepted but not yet written to the database (held in memory)",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
AUDIT_QUARANTINED = Counter(
    "eventbus_audit_quarantined",
    "Audit rows the database could not take, set aside in audit_quarantine, by table",
    ["table"],
    registry=REGISTRY,
)
RETENTION_DELETED = Counter(
    "eventbus_retention_deleted",
    "Rows deleted for being older than the retention settings allow, by table",
    ["table"],
    registry=REGISTRY,
)
BUS_REJECTED = Counter(
    "eventbus_bus_rejected",
    "Bus messages that were not valid CloudEvents, set aside instead of routed",
    registry=REGISTRY,
)
LIVE_DROPPED = Counter(
    "eventbus_live_dropped",
    "Live-stream items not sent to another worker's watchers: that worker read too slowly",
    registry=REGISTRY,
)
EMBEDDED_RESTARTS = Counter(
    "eventbus_embedded_restarts",
    "Embedded servers (nats-server, postgresql) restarted after they died",
    ["server"],
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "eventbus_worker_restarts",
    "Workers of serve --workers N started again by their parent after they exited",
    ["worker"],
    registry=REGISTRY,
)
# What the parent of serve --workers N counts itself: it serves no /metrics of its own.
_PARENT_COUNTERS = (EMBEDDED_RESTARTS, WORKER_RESTARTS)
_PARENT_FILE = "parent.json"


def activity() -> dict[str, float]:
    """This process's running totals, as the periodic summary reports them: events received
    (every entry point) and routed, and delivery attempts by outcome (``delivered``,
    ``retry-scheduled``, ``dead-lettered``)."""
    totals: dict[str, float] = {}
    for metric in (EVENTS_RECEIVED, EVENTS_ROUTED, DELIVERIES):
        for family in metric.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = sample.labels.get("outcome", family.name.removeprefix("eventbus_"))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _registry() -> CollectorRegistry:
    """This process's metrics, or with ``PROMETHEUS_MULTIPROC_DIR`` set, a registry reading
    every worker's files together."""
    # prometheus-client reads the variable itself (when it is imported) to write the files;
    # reading must be from the same place.
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(_WorkerFiles(Path(directory)))
    registry.register(_ParentFile(Path(directory) / _PARENT_FILE))
    return registry


class ParentFigures:
    """The parent's counters, written to ``directory`` for the workers to serve with theirs.

    :meth:`publish` writes them when they changed (a restart is rare: the parent calls it once
    a second), replacing the file whole so a worker never reads half of it.
    """

    def __init__(self, directory: Path) -> None:
        self._path = directory / _PARENT_FILE
        self._written: bytes | None = None

    def publish(self) -> None:
        families = [
            {
                "name": family.name,
                "help": family.documentation,
                "type": family.type,
                "samples": [
                    [s.name, s.labels, s.value]
                    for s in family.samples
                    if not s.name.endswith("_created")  # as the workers' files, which have none
                ],
            }
            for counter in _PARENT_COUNTERS
            for family in counter.collect()
        ]
        text = orjson.dumps(families)
        if text == self._written:
            return
        replace_file(self._path, text)
        self._written = text


class _ParentFile:
    """The parent's counters as :class:`ParentFigures` wrote them; none before it did."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        with suppress(FileNotFoundError):
            for family in orjson.loads(self._path.read_bytes()):
                metric = Metric(family["name"], family["help"], family["type"])
                for name, labels, value in family["samples"]:
                    metric.add_sample(name, labels, value)
                yield metric


_LISTINGS = 5  # tries at reading the workers' files while workers that ended are forgotten


class _WorkerFiles:
    """Every worker's files in ``directory``, merged as prometheus-client's own multiprocess
    collector merges them, leaving out a file a worker has created but not yet sized: its first
    value of a kind (the first delivery's duration, say) opens the file empty and only then
    extends it, and the library's reader fails on an empty file (every reading of the service's
    figures answered 500 in that moment). Such a file holds no value yet, so nothing is lost."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        for _ in range(_LISTINGS):
            files = []
            for path in self._directory.glob("*.db"):
                try:
                    if path.stat().st_size > 0:
                        files.append(str(path))
                except FileNotFoundError:  # a live gauge's file, removed as its worker ended
                    continue
            try:
                merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            except FileNotFoundError:  # removed between the listing and the reading: again
                continue
            return merged
        raise OSError(f"the metrics files in {self._directory} kept changing while read")


def render() -> bytes:
    """The exposition text of every metric: this process's, or with ``PROMETHEUS_MULTIPROC_DIR``
    set, every worker's together."""
    return generate_latest(_registry())


def families() -> dict[str, Metric]:
    """Every metric family by name (``eventbus_deliveries``): this process's, or with
    ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's together (counters summed, as
    :func:`render`), so that any worker can answer for the whole service. Reading the workers'
    files takes about 2 ms (two workers, ten targets): a console page's refresh asks for it
    three times every 5 s."""
    return {family.name: family for family in _registry().collect()}


def forget_process(pid: int, directory: Path) -> None:
    """Drop the gauges of a worker that ended from ``directory`` (its counts stay counted),
    and its files that count nothing: a worker failing at its start again and again left a
    file of zeros at each start (thousands a day, every scrape reading them all)."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    for path in directory.glob(f"*_{pid}.db"):
        try:
            if path.stat().st_size == 0:  # never sized (killed as it opened it): as a scrape
                continue
            merged = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
                [str(path)], accumulate=False
            )
        except Exception as exc:  # any file, however broken, is only left
            # (struct.error, RuntimeError: escaped, they ended the parent and every worker)
            _log.debug("metrics file %s not read: %r", path, exc)
            continue
        if all(sample.value == 0 for metric in merged for sample in metric.samples):
            path.unlink(missing_ok=True)
