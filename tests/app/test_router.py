"""The router on a running service: it records acceptance itself, once per bus message, and it
never routes a bus message that is not a CloudEvent, whoever wrote it onto the bus."""

from __future__ import annotations

import nats
import orjson

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually

RULES = """
- name: everything
  match:
    source: [{prefix: "tests/"}]
  targets: [fn]
"""


def _event(i: int) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"e-{i}", "source": "tests/router", "type": "t"}


async def _start(eventbus: StartService, receiver: Receiver) -> RunningService:
    return await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )


async def test_messages_that_are_not_cloudevents_are_set_aside_never_routed(
    eventbus: StartService, receiver: Receiver, nats_url: str
) -> None:
    svc = await _start(eventbus, receiver)
    subject = svc.service.settings.bus.nats.subject
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        # Straight onto the bus, past the edge: invalid events a router must not deliver.
        no_type = {"specversion": "1.0", "id": "bad-1", "source": "tests/router"}
        await js.publish(subject, orjson.dumps(no_type))
        await js.publish(subject, b"\xff not json", headers={"Eventbus-Via": "http"})
        # A valid one written the same way is routed: the bus checks, it does not gatekeep.
        await js.publish(subject, orjson.dumps(_event(0)))
    finally:
        await nc.close()
    assert (await svc.post_event(_event(1)))[0] == 202

    got = await receiver.wait_for(2, path="/fn", timeout=30)
    assert sorted(r.cloudevent["id"] for r in got) == ["e-0", "e-1"]
    pool = svc.service.store.pool

    async def both_set_aside() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM source_dead_letters") == 2)

    await eventually(both_set_aside)
    rows = await pool.fetch(
        "SELECT source, payload, error, meta::jsonb->>'via' AS via FROM source_dead_letters"
    )
    # the router takes messages concurrently: either may be set aside first
    rows.sort(key=lambda row: row["payload"] == b"\xff not json")
    assert [r["source"] for r in rows] == ["bus", "bus"]
    assert orjson.loads(rows[0]["payload"]) == no_type
    assert "'type'" in rows[0]["error"]
    assert rows[1]["payload"] == b"\xff not json" and rows[1]["via"] == "http"
    assert "malformed JSON" in rows[1]["error"]
    # listed where an operator looks for unusable input
    status, _, listed = await svc.request("GET", "/sources/dead-letters?source=bus")
    assert status == 200 and len(listed["items"]) == 2
    # Nothing routed for them: the trail knows only the valid events.
    await svc.service.store.audit.flush()
    assert await pool.fetchval("SELECT count(*) FROM events WHERE id LIKE 'bad%'") == 0
    assert receiver.requests and all(r.cloudevent["id"] != "bad-1" for r in receiver.requests)


async def test_the_router_records_acceptance_once_per_bus_message(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await _start(eventbus, receiver)
    for i in range(3):
        assert (await svc.post_event(_event(i)))[0] == 202
    await receiver.wait_for(3, path="/fn", timeout=30)
    # their attempts are recorded once the function's answers are read, after it saw them
    await svc.drained()
    await svc.service.store.audit.flush()
    rows = await svc.service.store.pool.fetch(
        "SELECT id, via, bus_ref, received_at FROM events ORDER BY id"
    )
    assert [(r["id"], r["via"]) for r in rows] == [
        ("e-0", "http"),
        ("e-1", "http"),
        ("e-2", "http"),
    ]
    assert len({r["bus_ref"] for r in rows}) == 3 and all(r["bus_ref"] for r in rows)
    status, _, trail = await svc.request("GET", "/events/trail?source=tests/router&id=e-1")
    assert status == 200 and trail["via"] == "http"
    assert [a["outcome"] for a in trail["attempts"]] == ["delivered"]


async def test_a_failing_condition_is_counted_in_the_metrics(
    eventbus: StartService, receiver: Receiver
) -> None:
    # A condition failing at run time (a missing field) means no match; it was only in a log
    # line once a minute per rule.
    rules = (
        "- name: strict\n  match: {source: [tests/router]}\n"
        "  when: event.data.total > 1\n  targets: [fn]\n"
        "- name: all\n  match: {source: [tests/router]}\n  targets: [fn]\n"
    )
    svc = await eventbus(
        rules=rules, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    event = {"specversion": "1.0", "id": "m-1", "source": "tests/router", "type": "t"}
    assert (await svc.post_event({**event, "data": {}}))[0] == 202
    await receiver.wait_for(1, path="/fn")
    await svc.drained()
    _, _, text = await svc.request("GET", "/metrics")
    line = 'eventbus_rule_failures_total{rule="strict",what="condition"} '
    assert [row for row in text.splitlines() if row.startswith(line)] == [line + "1.0"]
