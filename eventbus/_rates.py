"""The service's own counters as rates over the last hour, for the console's overview: no
Prometheus server needed.

Where it sits: beside ``metrics`` (it only reads its counters). The composition root runs one
``Rates`` per process; every ``every`` seconds it adds the counters' totals to a ring buffer of
``window / every`` samples (an hour of 5-second samples: 720 small dicts), and ``snapshot``
turns consecutive samples into per-second rates. Counters are per process: with ``--workers N``
each process reports its own share.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from prometheus_client import Counter, Histogram

from eventbus import metrics
from eventbus._tasks import cancel_and_wait

__all__ = ["SERIES", "Rates", "deliveries_by_target"]

# name in the answer -> (counter, the label values a sample must have to count)
SERIES: dict[str, tuple[Counter, dict[str, str]]] = {
    "received": (metrics.EVENTS_RECEIVED, {}),
    "routed": (metrics.EVENTS_ROUTED, {}),
    "matched": (metrics.EVENTS_MATCHED, {}),
    "delivered": (metrics.DELIVERIES, {"outcome": "delivered"}),
    "retried": (metrics.DELIVERIES, {"outcome": "retry-scheduled"}),
    "dead_lettered": (metrics.DELIVERIES, {"outcome": "dead-lettered"}),
}


def _total(metric: Counter | Histogram, labels: dict[str, str], suffix: str = "_total") -> float:
    """The sum of ``metric``'s samples named ``*suffix`` that carry ``labels``."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def _latency_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The mean duration of the delivery attempts made between two samples (None: none)."""
    count = after["_attempts"] - before["_attempts"]
    if count <= 0:
        return None
    return round((after["_seconds"] - before["_seconds"]) / count * 1000, 3)


def deliveries_by_target() -> dict[str, dict[str, float]]:
    """Delivery attempts of this process since it started, per target and outcome."""
    out: dict[str, dict[str, float]] = {}
    for family in metrics.DELIVERIES.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                target = out.setdefault(sample.labels["target"], {})
                target[sample.labels["outcome"]] = sample.value
    return out


class Rates:
    """``async with Rates() as rates``: samples until the block ends; see the module."""

    def __init__(self, *, every: float = 5.0, window: float = 3600.0) -> None:
        self.every = every
        self._samples: deque[tuple[float, float, dict[str, float]]] = deque(
            maxlen=int(window / every) + 1
        )
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Add the counters' totals now (the sampling loop calls this)."""
        totals = {name: _total(counter, labels) for name, (counter, labels) in SERIES.items()}
        totals["_seconds"] = _total(metrics.DELIVERY_SECONDS, {}, "_sum")
        totals["_attempts"] = _total(metrics.DELIVERY_SECONDS, {}, "_count")
        self._samples.append((time.monotonic(), time.time(), totals))

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
            self.sample()
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
