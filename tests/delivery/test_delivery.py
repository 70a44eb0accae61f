"""Delivery guarantees end to end on real NATS JetStream, PostgreSQL and HTTP functions:
retries until delivered, dead letters with their history, replay, classification of every
kind of failure, the circuit breaker, destinations, and a PostgreSQL restart mid-run."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from eventbus import app as eventbus_app
from eventbus._errors import StoreError
from eventbus.delivery import DeadLetterFilter, DeadLetterReason, Delivery
from eventbus.delivery import _store as eventbus_store
from eventbus.store import EmbeddedPostgres
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

POLL = 0.1  # seconds between checks: each one is a request to the service under test
FAST = {"strategy": "fixed", "initial_delay": "50ms", "max_attempts": 40, "jitter": False}
RULES = """
- name: all
  match: {type: [t]}
  targets: [fn]
"""


def _target(receiver: Receiver, **delivery: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "fn", "type": "http", "url": receiver.url("/fn"), "timeout": 2}
    spec["delivery"] = {"retry": FAST, "circuit_breaker": False, **delivery}
    return spec


def _event(i: int | str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"d-{i}",
        "source": "tests/delivery",
        "type": "t",
        "data": {"i": i},
    }


async def _publish(svc: RunningService, ids: range | list[int]) -> None:
    await _publish_events(svc, [_event(i) for i in ids])


async def _publish_events(svc: RunningService, events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), 50):
        status, _, body = await svc.request(
            "POST",
            "/events",
            orjson.dumps(events[start : start + 50]),
            {"Content-Type": "application/cloudevents-batch+json"},
        )
        assert status == 202, body


def _ok_ids(receiver: Receiver) -> Counter[str]:
    return Counter(
        r.cloudevent["id"] for r in receiver.requests if r.cloudevent and 200 <= r.status < 300
    )


async def _dead_letters(svc: RunningService, query: str = "") -> list[dict[str, Any]]:
    status, _, body = await svc.request("GET", "/dead-letters" + query)
    assert status == 200, body
    return list(body["items"])


async def _all_dead_lettered(svc: RunningService, count: int, what: str) -> list[dict[str, Any]]:
    """The dead letters, once there are ``count`` of them (within 60 s)."""

    async def all_dead() -> list[dict[str, Any]]:
        items = await _dead_letters(svc)
        return items if len(items) == count else []

    return await eventually(all_dead, within=60, every=POLL, what=what)


async def test_half_the_requests_fail_and_everything_is_delivered(
    eventbus: StartService, receiver: Receiver
) -> None:
    receiver.fail_randomly(0.5, 503, seed=11)
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    await _publish(svc, range(60))

    async def all_delivered() -> bool:
        return len(_ok_ids(receiver)) == 60

    await eventually(all_delivered, within=60, every=POLL, what="every event delivered")
    failures = sum(1 for r in receiver.requests if r.status == 503)
    assert failures > 20  # the target really failed about half the time

    await svc.service.store.audit.flush()
    pool = svc.service.store.pool
    rows = await pool.fetch("SELECT outcome, status FROM attempts")
    outcomes = Counter(r["outcome"] for r in rows)
    assert outcomes["delivered"] == 60
    assert outcomes["retry-scheduled"] == failures  # every failed attempt is audited
    assert await _dead_letters(svc) == []
    assert await pool.fetchval("SELECT count(*) FROM delivery_retries") == 0


async def test_target_down_dead_letters_then_replay_by_filter(
    eventbus: StartService, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.respond(503)
    policy = {"retry": {**FAST, "max_attempts": 3}}
    svc = await eventbus(rules=RULES, targets=[_target(receiver, **policy)])
    await _publish(svc, range(20))
    items = await _all_dead_lettered(svc, 20, "20 dead letters")
    assert {i["reason"] for i in items} == {"attempts-exhausted"}
    assert {i["attempts"] for i in items} == {3}
    assert {i["last_status"] for i in items} == {503}
    one = items[0]
    status, _, full = await svc.request("GET", f"/dead-letters/{one['id']}")
    assert status == 200
    assert full["event"]["id"] == one["event_id"] and full["rule"] == "all"
    assert [a["status"] for a in full["history"]] == [503, 503, 503]
    assert full["payload"]["id"] == one["event_id"]
    assert len(receiver.requests) == 60

    # filters and paging
    assert len(await _dead_letters(svc, "?target=fn&status=503")) == 20
    # counted by the database, for the console's "replay/purge filtered" (it walked the pages)
    status, _, counted = await svc.request("GET", "/dead-letters/count?target=fn&status=503")
    assert status == 200 and counted["count"] == 20, counted
    assert counted["newest"] == max(i["created_at"] for i in items)
    status, _, counted = await svc.request("GET", "/dead-letters/count?target=other")
    assert (status, counted) == (
        200,
        {"count": 0, "newest": None, "last_id": None, "since": None},
    )
    # a duration ago is answered as the time it was taken for: a purge given it acts on those
    # counted (the console's "1h" was taken again from a later now at the confirmation)
    before = datetime.now(UTC)
    status, _, counted = await svc.request("GET", "/dead-letters/count?target=fn&since=1h")
    assert status == 200 and counted["count"] == 20, counted
    since = datetime.fromisoformat(counted["since"])
    assert before - timedelta(hours=1) <= since <= datetime.now(UTC) - timedelta(hours=1)
    status, _, problem = await svc.request("GET", "/dead-letters/count?status=x")
    assert status == 400 and problem["detail"].startswith("status "), problem
    for path in ("/dead-letters?reson=gone", "/dead-letters/count?taget=fn"):  # not dropped
        status, _, problem = await svc.request("GET", path)
        assert status == 400 and " is not a parameter of GET /dead-letters" in problem["detail"]
    assert await _dead_letters(svc, "?target=other") == []
    first_page = await _dead_letters(svc, "?limit=15")
    rest = await _dead_letters(svc, f"?limit=15&after={first_page[-1]['id']}")
    assert len(first_page) == 15 and len(rest) == 5

    # bad replays are refused without touching anything
    status, _, problem = await svc.request("POST", "/dead-letters/replay")
    assert status == 400 and "filter" in problem["detail"]
    status, _, _ = await svc.request("POST", "/dead-letters/424242/replay")
    assert status == 404

    # moved 7 at a time (1,000 in the service), the first 15 named (1,000 in the service): one
    # statement moved them all, and the answer listed every one (200,000 dead letters: 5 s of
    # locks and 77 MiB)
    monkeypatch.setattr(eventbus_store, "REPLAY_BATCH", 7)
    monkeypatch.setattr(eventbus_app, "REPLAYS_LISTED", 15)
    receiver.reset()
    receiver.respond(204)
    status, _, body = await svc.request("POST", "/dead-letters/replay?target=fn")
    assert status == 202 and (body["count"], body["truncated"]) == (20, True)
    assert [item["id"] for item in body["replayed"]] == sorted(i["id"] for i in items)[:15]

    async def all_delivered() -> bool:
        return len(_ok_ids(receiver)) == 20

    await eventually(all_delivered, within=30, every=POLL, what="replayed events delivered")
    assert await _dead_letters(svc) == []
    # ids that have no dead letter are named (202 "count: 0" named none of them)
    gone = items[0]["id"]
    status, _, body = await svc.request("POST", f"/dead-letters/replay?id={gone}&id=424242")
    assert status == 202 and body["count"] == 0, body
    assert body["missing"] == [gone, 424242]
    await svc.service.store.audit.flush()
    replays = await svc.service.store.pool.fetchval(
        "SELECT count(*) FROM attempts WHERE outcome = 'replay-requested'"
    )
    assert replays == 20


async def _dead_letter_row(conn: Any, event_id: str) -> int:
    """A dead letter written straight to the table, in ``conn``'s transaction if it has one."""
    event = orjson.dumps({"id": event_id, "source": "tests/sel"}).decode()
    return int(
        await conn.fetchval(
            "INSERT INTO dead_letters (event_source, event_id, event, rule, target, payload,"
            " is_cloudevent, attempts, history, reason, first_attempt_at) VALUES ('tests/sel',"
            " $1, $2::jsonb, 'all', 'fn', $2::jsonb, true, 1, '[]', 'attempts-exhausted',"
            " now()) RETURNING id",
            event_id,
            event,
        )
    )


@pytest.mark.parametrize(
    ("method", "path", "done"),
    [("DELETE", "/dead-letters", "purged"), ("POST", "/dead-letters/replay", "count")],
)
async def test_a_confirmed_replay_or_purge_acts_on_the_counted_dead_letters_only(
    eventbus: StartService, receiver: Receiver, method: str, path: str, done: str
) -> None:
    """The console counts, asks, then acts with ``through`` (the highest id counted) and
    ``expect`` (the count). A dead letter whose write began before the count and committed
    after it has a lower id and an older time than those counted: a bound on the time (the
    console's before) let it in, and the purge deleted more than the dialog said."""
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    pool = svc.service.store.pool
    async with pool.acquire() as held:
        late = held.transaction()
        await late.start()
        late_id = await _dead_letter_row(held, "late")  # under way while counted
        counted_ids = [await _dead_letter_row(pool, f"c{i}") for i in range(3)]
        status, _, counted = await svc.request("GET", "/dead-letters/count?target=fn")
        assert status == 200 and counted["count"] == 3, counted
        assert counted["last_id"] == max(counted_ids) > late_id
        await late.commit()
    after = await _dead_letter_row(pool, "after")  # dead-lettered while the dialog waited

    confirmed = f"{path}?target=fn&through={counted['last_id']}&expect=3"
    status, _, problem = await svc.request(method, confirmed)
    assert status == 409, problem
    assert problem["detail"].startswith("4 dead letters match now, not the 3 confirmed")
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 5  # nothing done
    assert await pool.fetchval("SELECT count(*) FROM delivery_retries") == 0

    # counted again, confirmed again: those four, not the one written since
    through = max(counted_ids)
    status, _, counted = await svc.request(
        "GET", f"/dead-letters/count?target=fn&through={through}"
    )
    assert (status, counted["count"]) == (200, 4), counted
    status, _, body = await svc.request(method, confirmed.replace("expect=3", "expect=4"))
    assert status in (200, 202) and body[done] == 4, body
    left = await pool.fetch("SELECT id FROM dead_letters")
    assert [r["id"] for r in left] == [after]
    # without expect, as before: whatever matches
    status, _, body = await svc.request(method, f"{path}?target=fn")
    assert status in (200, 202) and body[done] == 1, body
    status, _, problem = await svc.request(method, f"{path}?target=fn&expect=x")
    assert status == 400 and problem["detail"].startswith("expect "), problem


async def test_a_confirmed_replay_waits_for_dead_letters_another_action_holds(
    eventbus: StartService, receiver: Receiver
) -> None:
    # A confirmed purge that found another count rolls back; a replay that skipped the rows it
    # held (SKIP LOCKED) left them as dead letters, and answered fewer than it was confirmed.
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    pool = svc.service.store.pool
    ids = [await _dead_letter_row(pool, f"h{i}") for i in range(4)]
    async with pool.acquire() as held:
        purge = held.transaction()
        await purge.start()
        await held.execute("SELECT id FROM dead_letters WHERE id = ANY($1) FOR UPDATE", ids[1:3])
        confirmed = f"/dead-letters/replay?target=fn&through={max(ids)}&expect=4"
        replay = asyncio.create_task(svc.request("POST", confirmed))
        await asyncio.sleep(0.5)
        assert not replay.done()  # waits for the rows held
        await purge.rollback()
    status, _, body = await replay
    assert (status, body["count"], body["notes"]) == (202, 4, []), body
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    # held by one that deletes them: the replay says how many it did not get
    ids = [await _dead_letter_row(pool, f"g{i}") for i in range(3)]
    async with pool.acquire() as held:
        other = held.transaction()
        await other.start()
        await held.execute("DELETE FROM dead_letters WHERE id = $1", ids[0])
        confirmed = f"/dead-letters/replay?target=fn&through={max(ids)}&expect=3"
        replay = asyncio.create_task(svc.request("POST", confirmed))
        await asyncio.sleep(0.5)
        await other.commit()
    status, _, body = await replay
    assert (status, body["count"]) == (202, 2), body
    assert body["notes"] == [
        "1 of the 3 confirmed were no longer dead letters when their batch came: another "
        "replay or a purge took them meanwhile"
    ]


async def test_classification_of_failures(
    eventbus: StartService, receiver: Receiver, refused_port: int
) -> None:
    rules = """
- name: r400
  match: {type: [t400]}
  targets: [fn]
- name: r429
  match: {type: [t429]}
  targets: [fn]
- name: rtimeout
  match: {type: [tslow]}
  targets: [slow]
- name: rrefused
  match: {type: [tdown]}
  targets: [down]
"""
    targets = [
        _target(receiver),
        {
            "name": "slow",
            "type": "http",
            "url": receiver.url("/slow"),
            "timeout": 0.3,
            "delivery": {"retry": {**FAST, "max_attempts": 2}, "circuit_breaker": False},
        },
        {
            "name": "down",
            "type": "http",
            "url": f"http://127.0.0.1:{refused_port}/",
            "delivery": {"retry": {**FAST, "max_attempts": 2}, "circuit_breaker": False},
        },
    ]
    svc = await eventbus(rules=rules, targets=targets)
    receiver.script(400, Response(429, headers={"Retry-After": "1"}))
    receiver.respond(204)

    def ev(kind: str) -> dict[str, Any]:
        return {"specversion": "1.0", "id": f"c-{kind}", "source": "tests/cls", "type": kind}

    await svc.post_event(ev("t400"))
    dead = await eventually(
        lambda: _dead_letters(svc, "?rule=r400"), within=20, every=POLL, what="400 dead letter"
    )
    assert dead[0]["reason"] == "non-retryable" and dead[0]["attempts"] == 1

    await svc.post_event(ev("t429"))
    await receiver.wait_for(3, path="/fn")
    got = [r for r in receiver.requests if r.cloudevent and r.cloudevent["id"] == "c-t429"]
    assert [r.status for r in got] == [429, 204]
    trail = await eventually(
        lambda: _trail_attempts(svc, "tests/cls", "c-t429", 2), within=20, every=POLL
    )
    assert [a["outcome"] for a in trail] == ["retry-scheduled", "delivered"]
    # the second attempt waited for Retry-After (1 s), not the 50 ms backoff
    first_at, second_at = (a["at"] for a in trail)
    assert _seconds_between(first_at, second_at) >= 0.9

    receiver.script(Response(204, delay=5), Response(204, delay=5))
    await svc.post_event(ev("tslow"))
    dead = await eventually(
        lambda: _dead_letters(svc, "?rule=rtimeout"),
        within=20,
        every=POLL,
        what="timeout dead letter",
    )
    assert dead[0]["reason"] == "attempts-exhausted" and "timeout" in dead[0]["final_error"]

    await svc.post_event(ev("tdown"))
    dead = await eventually(
        lambda: _dead_letters(svc, "?rule=rrefused"),
        within=20,
        every=POLL,
        what="refused dead letter",
    )
    assert dead[0]["reason"] == "attempts-exhausted" and dead[0]["attempts"] == 2
    assert dead[0]["last_status"] is None
    assert dead[0]["final_error"] == f"connection refused by 127.0.0.1:{refused_port}"


async def test_410_dead_letters_and_disables_the_target(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    receiver.script(410)
    await _publish(svc, [1])
    dead = await eventually(lambda: _dead_letters(svc), within=20, every=POLL, what="gone")
    assert dead[0]["reason"] == "gone"
    await _publish(svc, [2])

    async def two() -> list[dict[str, Any]]:
        items = await _dead_letters(svc)
        return items if len(items) == 2 else []

    items = await eventually(two, within=20, every=POLL, what="second dead letter")
    assert items[0]["reason"] == "target-disabled" and items[0]["attempts"] == 0
    assert len(receiver.requests) == 1  # the second event never reached the gone endpoint
    # /targets says so: why and since when
    _, _, body = await svc.request("GET", "/targets")
    (fn,) = body["targets"]
    assert fn["disabled"]["reason"] == "410 Gone at attempt 1", fn
    assert fn["disabled"]["at"] <= items[0]["created_at"], (fn, items[0])

    status, _, body = await svc.request("POST", "/targets/fn/enable")
    assert status == 200 and body == {"enabled": "fn", "was_disabled": True}, body
    _, _, body = await svc.request("GET", "/targets")
    assert body["targets"][0]["disabled"] is None
    status, _, body = await svc.request("POST", "/targets/fn/enable")  # idempotent
    assert status == 200 and body == {"enabled": "fn", "was_disabled": False}, body
    status, _, body = await svc.request("POST", "/dead-letters/replay?reason=target-disabled")
    assert status == 202 and len(body["replayed"]) == 1
    await receiver.wait_for(2)
    assert receiver.requests[-1].status == 204


async def test_a_disabled_target_stays_disabled_after_a_restart(
    eventbus: StartService, receiver: Receiver
) -> None:
    """A new process reads the disabled targets from the database as it starts: it does not
    try the gone endpoint again."""
    first = await eventbus(rules=RULES, targets=[_target(receiver)])
    receiver.script(410)
    await _publish(first, [1])
    await eventually(lambda: _dead_letters(first), within=20, every=POLL, what="gone")
    await first.stop()

    second = await eventbus(rules=RULES, targets=[_target(receiver)])
    _, _, body = await second.request("GET", "/targets")
    assert body["targets"][0]["disabled"]["reason"] == "410 Gone at attempt 1", body
    await _publish(second, [2])

    async def two() -> list[dict[str, Any]]:
        items = await _dead_letters(second)
        return items if len(items) == 2 else []

    items = await eventually(two, within=20, every=POLL, what="second dead letter")
    assert items[0]["reason"] == "target-disabled" and items[0]["attempts"] == 0, items
    assert len(receiver.requests) == 1  # only the first event reached the gone endpoint


async def test_a_target_enabled_while_the_disabled_ones_are_read_stays_enabled(
    eventbus: StartService, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retry worker's read of the disabled targets, taken before an operator's enable and
    # applied after it, disabled the target again until the next read: its deliveries were
    # dead-lettered "target-disabled" though `eventbus targets enable` had said they go out.
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    receiver.script(410)
    await _publish(svc, [1])
    await eventually(lambda: _dead_letters(svc), within=20, every=POLL, what="gone")
    dispatcher, store = svc.service.dispatcher, svc.service.deliveries
    assert dispatcher.disabled("fn") == "410 Gone at attempt 1"  # as the database says
    read, applied = asyncio.Event(), asyncio.Event()
    real = store.disabled_since

    async def read_then_wait() -> dict[str, dict[str, str]]:
        rows = await real()
        read.set()
        await applied.wait()
        return rows

    monkeypatch.setattr(store, "disabled_since", read_then_wait)
    refreshing = asyncio.create_task(dispatcher.refresh_disabled())
    await read.wait()  # it read "fn" disabled
    assert await svc.service.enable_target("fn")
    applied.set()
    await refreshing
    assert dispatcher.disabled("fn") is None


async def test_circuit_breaker_parks_deliveries_and_recovers(
    eventbus: StartService, receiver: Receiver
) -> None:
    receiver.respond(503)
    svc = await eventbus(
        rules=RULES, targets=[_target(receiver, circuit_breaker={"failures": 3, "open_for": "1s"})]
    )
    await _publish(svc, range(10))

    async def open_circuit() -> bool:
        _status, _, body = await svc.request("GET", "/targets")
        return bool(body["targets"][0]["circuit"] == "open")

    await eventually(open_circuit, within=20, every=POLL, what="circuit open")
    pool = svc.service.store.pool

    async def parked() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM delivery_retries WHERE waiting_for = 'circuit'"
        )
        return bool(n)

    await eventually(
        parked, within=20, every=POLL, what="deliveries parked behind the open circuit"
    )
    # while open, the endpoint sees only probes: far fewer requests than deliveries waiting
    seen = len(receiver.requests)
    # A short settle, kept on purpose: what is measured is how little happens during a time
    # window while the circuit is open, and no event marks the end of such a window.
    await asyncio.sleep(0.5)
    assert len(receiver.requests) - seen <= 2
    _status, _, text = await svc.request("GET", "/metrics")
    assert 'eventbus_circuit_state{target="fn"} 2.0' in text

    receiver.respond(204)

    async def all_delivered() -> bool:
        return len(_ok_ids(receiver)) == 10

    await eventually(
        all_delivered, within=60, every=POLL, what="delivered after the circuit closed"
    )
    assert await _dead_letters(svc) == []


@pytest.mark.parametrize("waits_for", ["slot", "token"])
async def test_deliveries_waiting_their_turn_are_parked_when_the_circuit_opens(
    eventbus: StartService, receiver: Receiver, waits_for: str
) -> None:
    # The circuit was checked before the wait for a slot of the concurrency cap or a token of
    # the rate limit, not after: once it opened, the deliveries queued behind them went to the
    # dead function all the same (40 of 40 in a review's run, two at a time for 18 s).
    receiver.respond(Response(503, delay=0.3 if waits_for == "slot" else 0.0))
    breaker = {"failures": 2, "open_for": "30s"}
    if waits_for == "slot":
        spec = _target(receiver, circuit_breaker=breaker)
        spec["concurrency"] = 2
    else:
        spec = _target(receiver, circuit_breaker=breaker, rate_limit=4)
    svc = await eventbus(rules=RULES, targets=[spec])
    await _publish(svc, range(20))
    pool = svc.service.store.pool

    async def all_parked() -> bool:
        n = await pool.fetchval("SELECT count(*) FROM delivery_retries")
        return bool(n == 20)

    await eventually(all_parked, within=20, every=POLL, what="every delivery in the schedule")
    # the two that opened it, and at most the two that held the slots meanwhile
    assert len(receiver.requests) <= 4, len(receiver.requests)


async def test_deliveries_parked_behind_the_circuit_go_once_it_closes(
    eventbus: StartService, receiver: Receiver
) -> None:
    # Those not taken as the probe were parked again for a full open_for: after the probe
    # closed the circuit they waited on (a minute by default) while newer events went first.
    receiver.respond(503)
    breaker = {"failures": 1, "open_for": "10s"}
    svc = await eventbus(rules=RULES, targets=[_target(receiver, circuit_breaker=breaker)])
    await _publish(svc, range(1))
    await receiver.wait_for(1)  # the failure that opens the circuit
    await _publish(svc, range(1, 6))
    pool = svc.service.store.pool

    async def parked() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM delivery_retries WHERE waiting_for = 'circuit'"
        )
        return bool(n == 6)

    await eventually(parked, within=20, every=POLL, what="every delivery parked")
    receiver.respond(204)
    await receiver.wait_for(2, timeout=30)  # the probe, once open_for has passed

    async def all_delivered() -> bool:
        return len(_ok_ids(receiver)) == 6

    # within half of open_for: the others were due again only a whole open_for after it
    await eventually(all_delivered, within=5, every=POLL, what="the parked ones delivered")


async def test_a_delivery_parked_behind_the_circuit_is_held_to_max_age(
    eventbus: StartService, receiver: Receiver
) -> None:
    # Parked again at each reopening, a delivery waited as long as the target was down
    # (5 x max_age in a review's run), where retrying stops at max_age.
    receiver.respond(503)
    retry = {**FAST, "max_age": "2s"}
    breaker = {"failures": 3, "open_for": "30s"}  # open for the whole test
    svc = await eventbus(
        rules=RULES, targets=[_target(receiver, retry=retry, circuit_breaker=breaker)]
    )
    await _publish(svc, range(10))
    items = await _all_dead_lettered(svc, 10, "every delivery too old")
    assert {i["reason"] for i in items} == {"too-old"}
    # the circuit still open (for 30 s): each waited behind it past max_age, not tried again
    status, _, body = await svc.request("GET", "/targets")
    assert status == 200 and body["targets"][0]["circuit"] == "open", body
    assert len(receiver.requests) == sum(i["attempts"] for i in items) <= 20


async def test_a_retry_taken_up_past_max_age_is_not_attempted(
    eventbus: StartService, receiver: Receiver
) -> None:
    # max_age was checked only when a retry was scheduled: one due within it but taken up
    # later (here behind a one-at-a-time target's backlog of due retries) was still sent, up
    # to 2.5 x max_age after the first attempt in a review's run
    receiver.respond(Response(503, delay=0.1))
    retry = {**FAST, "initial_delay": "100ms", "max_age": "2s"}
    target = {**_target(receiver, retry=retry), "concurrency": 1}
    # few routed deliveries wait in memory for the target's slot: a retry taken up in time
    # waits behind them, which the check does not count
    svc = await eventbus(rules=RULES, targets=[target], settings={"bus": {"max_in_flight": 8}})
    await _publish(svc, range(40))
    items = await _all_dead_lettered(svc, 40, "every delivery too old")
    assert {i["reason"] for i in items} == {"too-old"}
    first: dict[str, float] = {}
    for request in receiver.requests:
        event_id = request.cloudevent["id"]
        first.setdefault(event_id, request.at)
        # 2 s, the grace of 1 s, and the attempt itself (its wait for the target's slot)
        assert request.at - first[event_id] < 4.0, (event_id, request.at - first[event_id])
    late = [i for i in items if "past max_age (2 s): not made" in (i["final_error"] or "")]
    assert late, items
    # the last attempt's status and error stay the dead letter's (filters by status find it)
    assert {i["last_status"] for i in late} == {503}, late
    assert all(i["final_error"].startswith("HTTP 503") for i in late), late


async def test_a_late_retry_leaves_the_circuit_and_the_rate_limit_as_they_were(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The lateness was checked after the half-open circuit had let the retry through as its
    # probe (and after it took a rate-limit token): dead-lettered there, the probe was never
    # given back, and every later delivery to the target was refused as behind the circuit
    # until a restart, though the function had recovered.
    receiver.respond(503)
    retry = {**FAST, "initial_delay": "100ms", "max_age": "5s"}
    breaker = {"failures": 1, "open_for": "1s"}
    target = _target(receiver, retry=retry, circuit_breaker=breaker, rate_limit=0.25)
    svc = await eventbus(rules=RULES, targets=[target])
    await _publish(svc, [1])
    (dead,) = await _all_dead_lettered(svc, 1, "the first delivery too old")
    assert dead["reason"] == "too-old", dead
    receiver.respond(204)
    await _publish(svc, [2])
    ok = await eventually(lambda: _ok_ids(receiver), within=30, every=POLL, what="delivered")
    assert ok == {"d-2": 1}


async def test_destinations_and_dead_letter_target(
    eventbus: StartService, receiver: Receiver
) -> None:
    targets = [
        _target(
            receiver,
            on_success="audit",
            on_failure="alerts",
            dead_letter_target="dlq",
            retry={**FAST, "max_attempts": 1},
        ),
        {"name": "audit", "type": "http", "url": receiver.url("/audit")},
        {"name": "alerts", "type": "http", "url": receiver.url("/alerts")},
        {"name": "dlq", "type": "http", "url": receiver.url("/dlq")},
    ]
    svc = await eventbus(rules=RULES, targets=targets)
    receiver.script(204, 204, 500)  # fn, then the audit destination, then fn fails
    await _publish(svc, [1])
    (ok,) = await receiver.wait_for(1, path="/audit")
    assert ok.cloudevent["type"] == "eventbus.delivery.succeeded"
    assert ok.cloudevent["data"]["event"]["id"] == "d-1"
    await _publish(svc, [2])
    (alert,) = await receiver.wait_for(1, path="/alerts")
    assert alert.cloudevent["type"] == "eventbus.delivery.failed"
    assert alert.cloudevent["data"]["reason"] == "attempts-exhausted"
    assert alert.cloudevent["data"]["status"] == 500
    (dlq,) = await receiver.wait_for(1, path="/dlq")
    assert dlq.cloudevent["id"] == "d-2"
    assert dlq.cloudevent["deadletterreason"] == "attempts-exhausted"
    assert dlq.cloudevent["deadlettertarget"] == "fn"
    # The outcome events name the event they report on, and each original's trail holds its
    # follow-up deliveries (the outcome events are never on the bus: no trail of their own).
    assert (ok.cloudevent["eventbuscausesource"], ok.cloudevent["eventbuscauseid"]) == (
        "tests/delivery",
        "d-1",
    )
    await svc.drained()
    first = await svc.trail("tests/delivery", "d-1", 2)
    assert [(a["rule"], a["target"], a["outcome"]) for a in first["attempts"]] == [
        ("all", "fn", "delivered"),
        ("all#on-success", "audit", "delivered"),
    ]
    second = await svc.trail("tests/delivery", "d-2", 3)
    assert sorted((a["rule"], a["target"], a["outcome"]) for a in second["attempts"]) == [
        ("all", "fn", "dead-lettered"),
        ("all#dead-letter", "dlq", "delivered"),
        ("all#on-failure", "alerts", "delivered"),
    ]
    # A destination that fails waits to retry under the original event too.
    receiver.script(204, 503)  # fn, then the audit destination
    await _publish(svc, [3])
    await receiver.wait_for(2, path="/audit")
    await svc.drained()
    status, _, waiting = await svc.request("GET", "/retries?source=tests/delivery&id=d-3")
    assert status == 200, waiting
    assert [(r["rule"], r["target"]) for r in waiting["items"]] == [("all#on-success", "audit")]


async def test_a_destinations_replies_are_held_to_the_hop_limit(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The outcome event sent to a destination carried no hop count, so a destination whose
    # reply the rules routed back to the first target looped for ever (some 70 deliveries a
    # second in a review, every one at hop 1).
    async with Receiver() as destination:
        replies = [
            Response(200, reply={"specversion": "1.0", "id": f"r{i}", "source": "fn", "type": "t"})
            for i in range(20)
        ]
        destination.script(*replies)
        targets = [
            _target(receiver, on_success="dest"),
            {"name": "dest", "type": "http", "url": destination.url("/dest")},
        ]
        svc = await eventbus(rules=RULES, targets=targets, settings={"router": {"hop_limit": 3}})
        await _publish(svc, [1])
        await destination.wait_for(4)
        await svc.drained()
        await asyncio.sleep(1)  # a loop would go on meanwhile
        await svc.drained()
        # the event, then the replies at hops 1, 2 and 3; the one at hop 4 is dropped
        assert len(receiver.requests) == 4, [r.cloudevent for r in receiver.requests]
        assert len(destination.requests) == 4
        hops = [int(r.cloudevent.get("eventbushops", 0)) for r in receiver.requests]
        assert hops == [0, 1, 2, 3]


async def test_an_error_answer_with_control_characters_is_dead_lettered_once(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The function's answer is quoted in the error text: a NUL in it made the dead letter
    # unwritable (PostgreSQL's text refuses NUL), so the event was redelivered for ever, to
    # every target it matched; the dead-letter copy carried the newline, which CloudEvents
    # disallows in an attribute.
    rules = RULES + "- name: other\n  match: {type: [t]}\n  targets: [ok]\n"
    async with Receiver() as healthy:
        targets = [
            _target(receiver, dead_letter_target="dlq"),
            {"name": "ok", "type": "http", "url": healthy.url("/ok")},
            {"name": "dlq", "type": "http", "url": healthy.url("/dlq")},
        ]
        svc = await eventbus(rules=rules, targets=targets)
        receiver.respond(Response(400, body=b"bad\x00input\nline two"))
        await _publish(svc, [1])
        (dead,) = await eventually(
            lambda: _dead_letters(svc), within=20, every=POLL, what="dead letter"
        )
        assert dead["final_error"] == "HTTP 400 Bad Request: bad\ufffdinput\nline two"
        (copy,) = await healthy.wait_for(1, path="/dlq")
        assert copy.cloudevent["deadlettererror"] == "HTTP 400 Bad Request: bad\ufffdinput line two"
        await svc.drained()
        assert [r.cloudevent["id"] for r in healthy.requests if r.path == "/ok"] == ["d-1"]
        assert len(receiver.requests) == 1


async def test_a_replayed_dead_letter_keeps_its_history_and_counts_its_replays(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The replay moved the row back with an empty history, and nothing counted replays: the
    # dead letter it became again showed one attempt and "replayed 0 times".
    receiver.respond(400)
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    await _publish(svc, [1])
    for replays in range(3):
        (dead,) = await eventually(
            lambda: _dead_letters(svc), within=20, every=POLL, what="dead letter"
        )
        status, _, full = await svc.request("GET", f"/dead-letters/{dead['id']}")
        assert status == 200 and full["replay_count"] == replays
        assert [(h["attempt"], h.get("replay", 0)) for h in full["history"]] == [
            (1, n) for n in range(replays + 1)
        ]
        if replays == 2:
            receiver.respond(204)
        status, _, _ = await svc.request("POST", f"/dead-letters/{dead['id']}/replay")
        assert status == 202
    await receiver.wait_for(4)
    await svc.drained()
    assert await _dead_letters(svc) == []


async def test_a_replay_gets_a_fresh_budget_however_old_the_dead_letter(
    eventbus: StartService, receiver: Receiver
) -> None:
    # max_age counts from the start of the replay, not from the first attempt ever made: a
    # dead letter older than max_age replayed got one attempt, then was too-old again.
    receiver.respond(503)
    retry = {**FAST, "max_age": "1s"}
    svc = await eventbus(rules=RULES, targets=[_target(receiver, retry=retry)])
    await _publish(svc, [1])
    (dead,) = await _all_dead_lettered(svc, 1, "the delivery too old")
    assert dead["reason"] == "too-old"
    await asyncio.sleep(1.5)  # older than max_age by now, however it is counted
    receiver.reset()
    receiver.script(503, 503)  # then 204
    status, _, _ = await svc.request("POST", f"/dead-letters/{dead['id']}/replay")
    assert status == 202
    ok = await eventually(lambda: _ok_ids(receiver), within=20, every=POLL, what="delivered")
    assert ok == {"d-1": 1}
    await svc.drained()
    assert await _dead_letters(svc) == []


async def test_a_saturated_target_does_not_hold_routing_for_the_others(
    eventbus: StartService, receiver: Receiver
) -> None:
    # One request at a time, slow: the deliveries waiting for its slot held the bus's whole
    # in-flight window (8 here, 1,000 by default), and an event for another target waited
    # behind them (12.6 s in a probe at a second per request). Now they wait in the retry
    # schedule.
    rules = (
        "- name: slow\n  match: {type: [slow]}\n  targets: [slow]\n"
        "- name: fast\n  match: {type: [fast]}\n  targets: [fast]\n"
    )
    receiver.respond(Response(204, delay=0.3))
    async with Receiver() as fast:
        slow = {"name": "slow", "type": "http", "url": receiver.url("/slow"), "concurrency": 1}
        targets = [slow, {"name": "fast", "type": "http", "url": fast.url("/fast")}]
        svc = await eventbus(rules=rules, targets=targets, settings={"bus": {"max_in_flight": 8}})
        await _publish_events(svc, [{**_event(i), "type": "slow"} for i in range(20)])
        await receiver.wait_for(1)
        assert (await svc.post_event({**_event("f"), "type": "fast"}))[0] == 202
        await fast.wait_for(1, timeout=30)
        # behind the window it came after a dozen slow requests or more; a loaded machine
        # (three test processes, two reviews) saw five before it, the fast one on time
        assert len(receiver.requests) <= 7, len(receiver.requests)
        await receiver.wait_for(20, timeout=90)
        await svc.drained()
        assert sorted(_ok_ids(receiver).values()) == [1] * 20
        assert _parked(await svc.request("GET", "/metrics"), "slow") > 0


async def test_a_target_turning_slow_does_not_hold_routing_for_the_others(
    eventbus: StartService, receiver: Receiver
) -> None:
    # A target that had answered at once, then hangs: a change that parked deliveries only
    # once the target looked slow let those admitted while it still looked fast hold the
    # whole window until their attempts ended (8 s in a review's run), and an event for
    # another target waited behind them. Those beyond its share go to the retry schedule.
    rules = (
        "- name: slow\n  match: {type: [slow]}\n  targets: [slow]\n"
        "- name: fast\n  match: {type: [fast]}\n  targets: [fast]\n"
    )
    receiver.respond(204)
    async with Receiver() as fast:
        slow = {
            "name": "slow",
            "type": "http",
            "url": receiver.url("/slow"),
            "concurrency": 2,
            "delivery": {"circuit_breaker": False},
        }
        targets = [slow, {"name": "fast", "type": "http", "url": fast.url("/fast")}]
        svc = await eventbus(rules=rules, targets=targets, settings={"bus": {"max_in_flight": 8}})
        await _publish_events(svc, [{**_event(i), "type": "slow"} for i in range(20)])
        await receiver.wait_for(20)
        receiver.respond(Response(204, delay=4))
        await _publish_events(svc, [{**_event(100 + i), "type": "slow"} for i in range(20)])
        await receiver.wait_for(22)  # its two slots taken by requests that hang
        assert (await svc.post_event({**_event("f"), "type": "fast"}))[0] == 202
        await fast.wait_for(1, timeout=30)
        # before any of the hanging requests ended (their slots would have let two more in)
        assert len(receiver.requests) == 22, len(receiver.requests)
        assert _parked(await svc.request("GET", "/metrics"), "slow") > 0


def _parked(answer: tuple[int, Any, Any], target: str) -> float:
    """``eventbus_deliveries_parked_total`` of ``target`` waiting for capacity, from the
    answer of ``GET /metrics``."""
    status, _, text = answer
    assert status == 200
    line = f'eventbus_deliveries_parked_total{{target="{target}",waiting_for="capacity"}} '
    values = [float(row[len(line) :]) for row in text.splitlines() if row.startswith(line)]
    return sum(values)


@pytest.mark.timeout(180)
async def test_postgres_restart_mid_run_loses_nothing(
    eventbus: StartService, receiver: Receiver, postgres_server: EmbeddedPostgres
) -> None:
    receiver.fail_randomly(0.3, 503, seed=5)
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    await _publish(svc, range(30))
    await postgres_server.stop()
    try:
        await _publish(svc, range(30, 60))  # the bus still accepts while Postgres is down
        await asyncio.sleep(1.0)
    finally:
        await postgres_server.start()

    async def all_delivered() -> bool:
        return len(_ok_ids(receiver)) == 60

    await eventually(
        all_delivered, within=120, every=POLL, what="every event delivered after the restart"
    )
    status, _, body = await svc.request("GET", "/readyz")
    assert status == 200, body


async def _trail_attempts(
    svc: RunningService, source: str, event_id: str, n: int
) -> list[dict[str, Any]]:
    await svc.service.store.audit.flush()
    status, _, body = await svc.request("GET", f"/events/trail?source={source}&id={event_id}")
    if status != 200 or len(body["attempts"]) < n:
        return []
    return list(body["attempts"])


def _seconds_between(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


async def test_nul_in_data_is_audited_dead_lettered_and_replayed_intact(
    eventbus: StartService, receiver: Receiver
) -> None:
    receiver.respond(503)
    svc = await eventbus(
        rules=RULES, targets=[_target(receiver, retry={**FAST, "max_attempts": 2})]
    )
    event = {
        "specversion": "1.0",
        "id": "nul-1",
        "source": "tests/nul",
        "type": "t",
        "data": {"text": "a\u0000b", "k\u0000": ["\u0000"]},
    }
    assert (await svc.post_event(event))[0] == 202
    (dead,) = await eventually(
        lambda: _dead_letters(svc), within=20, every=POLL, what="dead letter"
    )
    status, _, full = await svc.request("GET", f"/dead-letters/{dead['id']}")
    assert full["event"]["data"] == event["data"]
    await svc.service.store.audit.flush()
    status, _, trail = await svc.request("GET", "/events/trail?source=tests/nul&id=nul-1")
    assert status == 200 and trail["event"]["data"] == event["data"]
    receiver.respond(204)
    status, _, _ = await svc.request("POST", f"/dead-letters/{dead['id']}/replay")
    assert status == 202
    await receiver.wait_for(3)
    assert receiver.requests[-1].cloudevent["data"] == event["data"]


async def test_delivery_slower_than_ack_wait_is_not_redelivered(
    eventbus: StartService, receiver: Receiver
) -> None:
    receiver.respond(Response(204, delay=3.5))
    target = _target(receiver)
    target["timeout"] = 10
    svc = await eventbus(rules=RULES, targets=[target], settings={"bus": {"nats": {"ack_wait": 1}}})
    await _publish(svc, [1])
    await receiver.wait_for(1)
    # The delivery takes several ack waits (the router reports progress meanwhile); once it is
    # acknowledged no copy can come, and one redelivered meanwhile would already have arrived.
    await svc.drained()
    assert len(receiver.requests) == 1


async def test_a_retry_after_past_max_age_says_so_in_the_dead_letter(
    eventbus: StartService, receiver: Receiver
) -> None:
    # Dead-lettered too-old after one attempt, at age 0, with only the 429's text: the reason
    # (the function's own wait, longer than max_age) was nowhere.
    receiver.respond(Response(429, headers={"Retry-After": "60"}))
    svc = await eventbus(rules=RULES, targets=[_target(receiver, retry={**FAST, "max_age": "30s"})])
    await _publish(svc, [1])
    (item,) = await _all_dead_lettered(svc, 1, "the delivery dead-lettered")
    assert item["reason"] == "too-old" and item["attempts"] == 1
    status, _, detail = await svc.request("GET", f"/dead-letters/{item['id']}")
    assert status == 200, detail
    assert "Retry-After (60 s) falls past max_age (30 s)" in orjson.dumps(detail).decode()


async def _replays_audited(dsn: str, source: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM attempts WHERE source = $1 AND outcome = 'replay-requested'",
                source,
            )
        )
    finally:
        await conn.close()


async def test_a_replay_names_the_targets_this_instance_does_not_have(
    eventbus: StartService, receiver: Receiver
) -> None:
    # dead letters of a target since removed from the files: "replayed 3", and the retries then
    # waited in the schedule for an instance that has the target, for ever, without a word
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    failed = {"last_status": 400, "final_error": "x", "reason": DeadLetterReason.NON_RETRYABLE}
    for i, target in enumerate(("old", "old", "fn")):
        event = {**_event(i), "source": "tests/replay-removed"}
        job = Delivery(event=event, rule="all", target=target, payload=event, is_cloudevent=True)
        await svc.service.deliveries.dead_letter(job, **failed)
    status, _, body = await svc.request("POST", "/dead-letters/replay?source=tests/replay-removed")
    assert status == 202 and body["count"] == 3, body
    assert body["notes"] == [
        "target 'old' is not defined here: its 2 replayed retries wait in the retry schedule "
        "for an instance that has it (eventbus retries list)"
    ]


async def test_a_replay_is_audited_with_its_move_and_a_failure_midway_says_what_moved(
    eventbus: StartService,
    receiver: Receiver,
    database_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The replay-requested rows went through the audit buffer after the move had committed
    # and after the answer: eventbus killed then lost every one (300 of 300 delivered, not one
    # replay in their trails), and PostgreSQL lost mid-replay answered 503 "replaying dead
    # letters: ..." though three quarters had moved, their batch in flight unaudited.
    monkeypatch.setattr(eventbus_store, "REPLAY_BATCH", 1)
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    source = "tests/replay-audit"
    failed = {"last_status": 400, "final_error": "x", "reason": DeadLetterReason.NON_RETRYABLE}
    deliveries = svc.service.deliveries
    for i in range(400):
        event = {**_event(i), "source": source}
        routed = Delivery(event=event, rule="all", target="fn", payload=event, is_cloudevent=True)
        await deliveries.dead_letter(routed, **failed)
    replay = asyncio.create_task(svc.service.replay(DeadLetterFilter(source=source)))

    async def begun() -> bool:
        return await _replays_audited(database_dsn, source) > 0

    await eventually(begun, within=20, every=0.01, what="the first batch moved")
    killer = await asyncpg.connect(database_dsn)
    try:
        # Again and again until the replay ends: one kill that fell between two of its batches
        # let the next batch take a new connection, and the replay finished (a flaky run).
        for _ in range(500):
            await killer.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if replay.done():
                break
            await asyncio.sleep(0.01)
    finally:
        await killer.close()
    with pytest.raises(StoreError) as failure:
        await replay
    moved = int(re.search(r"; (\d+) dead letters were replayed before it", str(failure.value))[1])
    assert 0 < moved < 400, failure.value
    # each dead letter that left was audited in the same transaction, no more, no less
    conn = await asyncpg.connect(database_dsn)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE event_source = $1", source
        )
    finally:
        await conn.close()
    assert await _replays_audited(database_dsn, source) == 400 - left >= moved


async def test_a_page_of_dead_letters_exactly_full_is_the_last(
    eventbus: StartService, receiver: Receiver
) -> None:
    # next_after was set whenever a page was full: with 4 dead letters and pages of 2, the
    # console's "Next page" after the second page led to an empty one.
    receiver.respond(400)  # not retried: dead-lettered at once
    svc = await eventbus(rules=RULES, targets=[_target(receiver)])
    await _publish(svc, range(4))
    dead = await _all_dead_lettered(svc, 4, "every delivery dead-lettered")
    newest_first = [d["id"] for d in dead]

    async def page(query: str) -> tuple[list[int], Any]:
        status, _, body = await svc.request("GET", f"/dead-letters?{query}")
        assert status == 200, body
        return [d["id"] for d in body["items"]], body["next_after"]

    first, after = await page("limit=2")
    assert first == newest_first[:2] and after == newest_first[1]
    second, after = await page(f"limit=2&after={after}")
    assert second == newest_first[2:] and after is None
    assert await page("limit=4") == (newest_first, None)
    assert await page("limit=5") == (newest_first, None)
