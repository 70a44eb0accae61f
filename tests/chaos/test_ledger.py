"""The reconciliation itself, on ledgers written by hand: each broken promise is named, and a
clean run has no problem (so a chaos test fails for what went wrong, and only then)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tests.chaos._ledger import AuditLedger, Fault, Publisher, reconcile
from tests.fixtures.receiver import Receiver, Recorded

FAULT = Fault("test", began=10.0, ended=20.0)


def ledgers(
    received: list[tuple[str, float]], **audit: Any
) -> tuple[Publisher, Receiver, AuditLedger]:
    """Three events, all accepted; ``received`` (id, arrival) by the function; the audit
    complete unless ``audit`` overrides a field."""
    publisher = Publisher("http://127.0.0.1:1", 3, rate=1)
    publisher.accepted = set(publisher.ids)
    receiver = Receiver()
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    for event_id, at in received:
        event = {"id": event_id}
        receiver.requests.append(Recorded("POST", "/fn", headers, b"", event, None, 204, at))
    complete = AuditLedger(
        accepted=Counter(publisher.ids),
        delivered=Counter({event_id for event_id, _ in received}),
        undelivered_attempts=0,
        dead_lettered=frozenset(),
        pending_retries=0,
    )
    return publisher, receiver, replace(complete, **audit)


ALL = [("chaos-0", 1.0), ("chaos-1", 2.0), ("chaos-2", 25.0)]


def test_a_clean_run_has_no_problem() -> None:
    report = reconcile(*ledgers(ALL), FAULT, max_in_flight=10)
    assert report.problems == []
    assert report.counts["received"] == 3


def test_a_duplicate_across_the_fault_is_explained_and_counted() -> None:
    report = reconcile(*ledgers([*ALL, ("chaos-1", 21.0)]), FAULT, max_in_flight=10)
    assert report.problems == []
    assert report.counts["explained duplicates"] == 1


@pytest.mark.parametrize(
    ("received", "audit", "problem"),
    [
        (ALL[:2], {}, "1 accepted events neither delivered nor dead-lettered: chaos-2"),
        (ALL, {"accepted": Counter(["chaos-0"])}, "2 accepted events without their `events` row"),
        (ALL, {"delivered": Counter(["chaos-0"])}, "2 received events without an attempt row"),
        ([*ALL, ("chaos-0", 2.0)], {}, "1 duplicate receipts outside the fault window: chaos-0"),
        ([*ALL, ("chaos-0", 15.0), ("chaos-1", 15.0)], {}, "2 duplicate receipts across"),
        ([*ALL, ("other", 1.0)], {}, "unknown ids other"),
        (ALL, {"pending_retries": 2}, "2 deliveries still wait in the retry schedule"),
    ],
)
def test_each_broken_promise_is_named(
    received: list[tuple[str, float]], audit: dict[str, Any], problem: str
) -> None:
    report = reconcile(*ledgers(received, **audit), FAULT, max_in_flight=1)
    with pytest.raises(AssertionError, match="published 3, accepted 3") as failed:
        report.check()
    assert problem in str(failed.value)


def test_dead_lettered_counts_as_ended() -> None:
    report = reconcile(
        *ledgers(ALL[:2], dead_lettered=frozenset({"chaos-2"})), FAULT, max_in_flight=10
    )
    assert report.problems == []
