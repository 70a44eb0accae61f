"""The arithmetic of ``eventbus._rates`` on counters of this process: the per-target window
and the percentile estimated from a histogram's buckets (the running service: the console's
API tests)."""

from __future__ import annotations

import math

import pytest

from eventbus import metrics
from eventbus._rates import Rates, _quantile
from tests.fixtures.wait import eventually

INF = math.inf


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        ([], None),
        ([(0.1, 0.0), (INF, 0.0)], None),
        # all ten in (0, 0.1]: the 95th at 95 % of the way
        ([(0.1, 10.0), (1.0, 10.0), (INF, 10.0)], 0.095),
        # 90 below 0.1, 10 in (0.1, 1.0]: the 95th is the 5th of those 10
        ([(0.1, 90.0), (1.0, 100.0), (INF, 100.0)], 0.1 + 0.9 * 0.5),
        # beyond the last finite bound: that bound, at least
        ([(0.1, 1.0), (1.0, 1.0), (INF, 100.0)], 1.0),
    ],
)
def test_quantile_from_buckets(buckets: list[tuple[float, float]], expected: float | None) -> None:
    found = _quantile(0.95, buckets)
    assert found == (None if expected is None else pytest.approx(expected))


def test_by_target_counts_what_happened_since_the_oldest_recent_sample() -> None:
    rates = Rates(every=5.0, recent=300.0)
    target = "tests-rates-window"
    delivered = metrics.DELIVERIES.labels(target, "delivered")
    delivered.inc(7)
    rates.sample()
    delivered.inc(11)
    rates.sample()
    # as if sampled 400 s ago (beyond the window) and 100 s ago (its start)
    (first, old), (second, start) = rates._by_target
    rates._by_target[0], rates._by_target[1] = (first - 400, old), (second - 100, start)
    delivered.inc(3)
    metrics.DELIVERIES.labels(target, "retry-scheduled").inc(1)
    metrics.DELIVERIES.labels(target, "dead-lettered").inc(1)
    for seconds in (0.002, 0.002, 0.004, 0.2):
        metrics.DELIVERY_SECONDS.labels(target).observe(seconds)
    body = rates.by_target()
    assert body["window"] == pytest.approx(100, abs=1)
    found = body["targets"][target]
    assert found["delivered"] == pytest.approx(0.03, abs=0.001)
    assert found["failed"] == pytest.approx(0.02, abs=0.001)
    assert found["latency_ms"] == pytest.approx(52.0)
    # ranks 3.8 of 4: in (0.1, 0.25], where the one slow attempt is
    assert 100 < found["p95_ms"] <= 250


async def test_a_failed_reading_costs_one_point_not_the_sampler(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading every worker's metric files can fail (one half-written, say): the sampler logs
    it and samples again at its next turn."""
    real = metrics.families
    calls = 0

    def flaky() -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a metric file half-written")
        return real()

    monkeypatch.setattr(metrics, "families", flaky)
    async with Rates(every=0.01) as rates:
        await eventually(lambda: len(rates.snapshot()["points"]) >= 2, within=5)
    assert "sampling the counters for the console failed" in caplog.text
