"""The service's own counters as rates over the last hour, for the console's overview, and per
target over the last five minutes, for its targets page: no Prometheus server needed.

Where it sits: beside ``metrics`` (it only reads its counters). The composition root runs one
``Rates`` per process; every ``every`` seconds it adds the counters' totals to a ring buffer of
``window / every`` samples (an hour of 5-second samples: 720 small dicts), and ``snapshot``
turns consecutive samples into per-second rates. Per target it keeps the last ``recent``
seconds of samples (deliveries by outcome and the delivery-duration histogram), and
``by_target`` compares the counters now with the oldest of them: deliveries and failures per
second, the mean attempt duration and its 95th percentile, estimated from the histogram's
buckets. With ``--workers N`` the counters read are every worker's together (prometheus-client's
multiprocess files, as ``/metrics`` reads them), so any worker answers for the whole service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from eventbus import metrics
from eventbus._tasks import cancel_and_wait

__all__ = ["SERIES", "Rates", "deliveries_by_target", "gauge_by_target"]

log = logging.getLogger("eventbus")

# name in the answer -> (counter, the label values a sample must have to count)
SERIES: dict[str, tuple[Counter, dict[str, str]]] = {
    "received": (metrics.EVENTS_RECEIVED, {}),
    "routed": (metrics.EVENTS_ROUTED, {}),
    "matched": (metrics.EVENTS_MATCHED, {}),
    "delivered": (metrics.DELIVERIES, {"outcome": "delivered"}),
    "retried": (metrics.DELIVERIES, {"outcome": "retry-scheduled"}),
    "dead_lettered": (metrics.DELIVERIES, {"outcome": "dead-lettered"}),
}


def _samples(families: dict[str, Metric], metric: Counter | Gauge | Histogram) -> list[Sample]:
    """The samples of ``metric`` among ``families`` (:func:`eventbus.metrics.families`)."""
    family = families.get(next(iter(metric.describe())).name)
    return [] if family is None else family.samples


def _total(
    families: dict[str, Metric],
    metric: Counter | Histogram,
    labels: dict[str, str],
    suffix: str = "_total",
) -> float:
    """The sum of ``metric``'s samples named ``*suffix`` that carry ``labels``."""
    return sum(
        sample.value
        for sample in _samples(families, metric)
        if sample.name.endswith(suffix)
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _mean_ms(seconds: float, count: float) -> float | None:
    """The mean of ``count`` durations adding up to ``seconds``, in ms (None: none)."""
    return round(seconds / count * 1000, 3) if count > 0 else None


def _latency_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The mean duration of the delivery attempts made between two samples (None: none)."""
    return _mean_ms(
        after["_seconds"] - before["_seconds"], after["_attempts"] - before["_attempts"]
    )


def _quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q``-quantile of observations counted in histogram ``buckets`` (upper bound,
    cumulative count; ascending, the last bound infinite), interpolated linearly within its
    bucket as Prometheus's ``histogram_quantile`` does; None when nothing was observed. One in
    the infinite bucket is reported as the largest finite bound: at least that."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class _TargetTotals:
    """One target's counters at a moment: deliveries by result, and the attempts timed by
    ``DELIVERY_SECONDS`` (their count, seconds and cumulative buckets by upper bound)."""

    delivered: float = 0.0
    failed: float = 0.0
    timed: float = 0.0
    seconds: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    def since(self, before: _TargetTotals, elapsed: float) -> dict[str, Any]:
        """What happened between ``before`` and this, ``elapsed`` seconds apart."""
        old = dict(before.buckets)
        buckets = [(bound, count - old.get(bound, 0.0)) for bound, count in self.buckets]
        p95 = _quantile(0.95, buckets)
        return {
            "delivered": _per_second(self.delivered - before.delivered, elapsed),
            "failed": _per_second(self.failed - before.failed, elapsed),
            "latency_ms": _mean_ms(self.seconds - before.seconds, self.timed - before.timed),
            "p95_ms": None if p95 is None else round(p95 * 1000, 3),
        }


def _per_second(count: float, elapsed: float) -> float:
    return round(max(count, 0.0) / elapsed, 3) if elapsed > 0 else 0.0


def _target_totals(families: dict[str, Metric]) -> dict[str, _TargetTotals]:
    """Every target's counters in ``families`` now."""
    timed: dict[str, dict[str, Any]] = {}
    for sample in _samples(families, metrics.DELIVERY_SECONDS):
        entry = timed.setdefault(sample.labels["target"], {"buckets": []})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith(("_count", "_sum")):
            entry[sample.name.rsplit("_", 1)[1]] = sample.value
    outcomes = deliveries_by_target(families)
    totals = {}
    for name in outcomes.keys() | timed.keys():
        counts = outcomes.get(name, {})
        histogram = timed.get(name, {})
        totals[name] = _TargetTotals(
            delivered=counts.get("delivered", 0.0),
            failed=sum(n for outcome, n in counts.items() if outcome != "delivered"),
            timed=histogram.get("count", 0.0),
            seconds=histogram.get("sum", 0.0),
            buckets=tuple(sorted(histogram.get("buckets", ()))),
        )
    return totals


def gauge_by_target(families: dict[str, Metric], gauge: Gauge) -> dict[str, float]:
    """A gauge labelled by target, per target, from ``families``: with ``--workers N`` as its
    multiprocess mode combines the workers' values (summed in flight, the worst circuit)."""
    return {s.labels["target"]: s.value for s in _samples(families, gauge) if "target" in s.labels}


def deliveries_by_target(families: dict[str, Metric] | None = None) -> dict[str, dict[str, float]]:
    """Delivery attempts since the service started (every worker's), per target and outcome;
    from ``families`` when given (one reading for several figures)."""
    out: dict[str, dict[str, float]] = {}
    for sample in _samples(
        metrics.families() if families is None else families, metrics.DELIVERIES
    ):
        if sample.name.endswith("_total"):
            target = out.setdefault(sample.labels["target"], {})
            target[sample.labels["outcome"]] = sample.value
    return out


class Rates:
    """``async with Rates() as rates``: samples until the block ends; see the module."""

    def __init__(
        self, *, every: float = 5.0, window: float = 3600.0, recent: float = 300.0
    ) -> None:
        self.every = every
        self._recent = recent
        self._samples: deque[tuple[float, float, dict[str, float]]] = deque(
            maxlen=int(window / every) + 1
        )
        # one more than ``recent`` spans, so one sample is always at most ``recent`` old
        self._by_target: deque[tuple[float, dict[str, _TargetTotals]]] = deque(
            maxlen=int(recent / every) + 2
        )
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Add the counters' totals now (the sampling loop calls this)."""
        families = metrics.families()
        totals = {
            name: _total(families, counter, labels) for name, (counter, labels) in SERIES.items()
        }
        totals["_seconds"] = _total(families, metrics.DELIVERY_SECONDS, {}, "_sum")
        totals["_attempts"] = _total(families, metrics.DELIVERY_SECONDS, {}, "_count")
        now = time.monotonic()
        self._samples.append((now, time.time(), totals))
        self._by_target.append((now, _target_totals(families)))

    def by_target(self, families: dict[str, Metric] | None = None) -> dict[str, Any]:
        """``{"window": s, "targets": {name: {"delivered": per second, "failed": per second,
        "latency_ms": mean attempt duration, "p95_ms": its 95th percentile}}}`` between the
        oldest sample at most ``recent`` seconds old and the counters now: ``window`` says how
        long that is (less while the process is younger). ``failed`` counts every delivery
        outcome but delivered (retry scheduled, dead-lettered, a synchronous failure); the
        durations are None when no attempt was made. Only targets with a delivery counted
        appear."""
        now = time.monotonic()
        current = _target_totals(metrics.families() if families is None else families)
        then, before = next(
            ((t, totals) for t, totals in self._by_target if now - t <= self._recent),
            (now, current),
        )
        elapsed = now - then
        idle = _TargetTotals()
        return {
            "window": round(elapsed, 3),
            "targets": {
                name: totals.since(before.get(name, idle), elapsed)
                for name, totals in current.items()
            },
        }

    def snapshot(self) -> dict[str, Any]:
        """``{"every": s, "points": [{"at": ISO time, name: per second, ..., "latency_ms":
        mean attempt duration or None}, ...]}``, oldest first: one point per pair of
        consecutive samples."""
        samples = list(self._samples)
        points = []
        for (t0, _, before), (t1, wall, after) in itertools.pairwise(samples):
            elapsed = max(t1 - t0, 1e-9)
            point: dict[str, Any] = {"at": datetime.fromtimestamp(wall, UTC).isoformat()}
            for name in SERIES:
                point[name] = round(max(after[name] - before[name], 0.0) / elapsed, 3)
            point["latency_ms"] = _latency_ms(before, after)
            points.append(point)
        return {"every": self.every, "points": points}

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # a worker's metric file read half-written, say
                # The charts miss one point; the sampler must not end over it.
                log.warning("sampling the counters for the console failed: %r", exc)
            await asyncio.sleep(self.every)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="eventbus-rates")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)
