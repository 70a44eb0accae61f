"""What became of each delivery attempt is said once: the audit trail's ``attempts.outcome``
and the metric ``eventbus_deliveries_total{outcome}`` count the same attempts under the same
spellings (``AttemptOutcome``), on a real bus, database and function endpoint."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from eventbus.store import AttemptOutcome
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

# A target name no other test uses: the metrics registry is the process's, shared by tests.
TARGET = "outcomes-fn"
RULES = f"""
- name: all
  match: {{type: [t]}}
  targets: [{TARGET}]
"""


async def _publish(svc: RunningService, n: int) -> None:
    event = {"specversion": "1.0", "id": f"o-{n}", "source": "tests/outcomes", "type": "t"}
    status, _, body = await svc.request(
        "POST", "/events", orjson.dumps(event), {"Content-Type": "application/cloudevents+json"}
    )
    assert status == 202, body


async def _audited(svc: RunningService) -> Counter[str]:
    await svc.service.store.audit.flush()
    rows = await svc.service.store.pool.fetch(
        "SELECT outcome FROM attempts WHERE target = $1", TARGET
    )
    return Counter(r["outcome"] for r in rows)


async def _counted(svc: RunningService) -> Counter[str]:
    status, _, text = await svc.request("GET", "/metrics")
    assert status == 200
    counted: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "eventbus_deliveries_total" and sample.labels["target"] == TARGET:
                counted[sample.labels["outcome"]] = int(sample.value)
    return counted


async def test_audit_rows_and_metrics_count_the_same_outcomes(
    eventbus: StartService, receiver: Receiver
) -> None:
    retry: dict[str, Any] = {"strategy": "fixed", "initial_delay": "50ms", "jitter": False}
    target = {
        "name": TARGET,
        "type": "http",
        "url": receiver.url("/fn"),
        "timeout": 2,
        "delivery": {"retry": {**retry, "max_attempts": 2}, "circuit_breaker": False},
    }
    svc = await eventbus(rules=RULES, targets=[target])
    # The first event fails once, then is delivered; the second fails twice: dead-lettered.
    receiver.script(503, 204)
    await _publish(svc, 1)
    await receiver.wait_for(2)
    receiver.respond(503)
    await _publish(svc, 2)
    expected = {"delivered": 1, "retry-scheduled": 2, "dead-lettered": 1}

    async def all_audited() -> bool:
        return await _audited(svc) == expected

    await eventually(all_audited, what="four attempt rows")
    assert await _counted(svc) == expected
    # failed and refused are synchronous invocations' (tests/app/test_invoke.py, which
    # counts both)
    assert set(expected) == {o.value for o in AttemptOutcome} - {
        "replay-requested",
        "failed",
        "refused",
    }
