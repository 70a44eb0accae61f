"""Running the service: two processes sharing the bus (one killed), rule reload (an invalid
set keeps the old one), bucket notifications over HTTP, and a configured source feeding the
rules, with its state under ``GET /sources``."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.app.test_crash import QUICK_REDELIVERY, _publish, _wait_all
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import ServeProcess, StartService

EVERYTHING = """
- name: everything
  targets: [fn]
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_two_processes_split_the_work_and_survive_a_kill(
    serve_process: Callable[..., ServeProcess], receiver: Receiver
) -> None:
    receiver.respond(Response(204, delay=0.01))

    def targets(instance: str) -> list[dict[str, Any]]:
        # each process tags its deliveries, so the test can see who delivered what
        return [
            {
                "name": "fn",
                "type": "http",
                "url": receiver.url("/fn"),
                "concurrency": 8,
                "headers": {"x-instance": instance},
            }
        ]

    a = serve_process(rules=EVERYTHING, targets=targets("a"), settings=QUICK_REDELIVERY)
    await a.start()  # reads its connectors before b's are written
    b = serve_process(rules=EVERYTHING, targets=targets("b"), settings=QUICK_REDELIVERY)
    await b.start()

    # The durable consumer hands work to whichever process pulls: both do a real share. A
    # process held up for a moment (a loaded machine) may miss one round of 600 events, so
    # rounds go on, up to 5, until each has delivered 60 distinct events in all (at least 2 %
    # of what was sent); one that never pulls fails.
    async def diagnosis() -> str:
        return f"a: {await _where(a)}\n{_warnings(a)}\nb: {await _where(b)}\n{_warnings(b)}"

    accepted: set[str] = set()
    shares: list[Counter[str]] = []
    for round_ in range(5):
        sent = await asyncio.gather(
            _publish(a.url, 300, prefix=f"a{round_}"), _publish(b.url, 300, prefix=f"b{round_}")
        )
        if len(sent[0] | sent[1]) != 600:
            raise AssertionError(f"{len(sent[0] | sent[1])} of 600 accepted\n{await diagnosis()}")
        accepted |= sent[0] | sent[1]
        await _wait_all(receiver, accepted, timeout=60)
        delivered = {(r.headers["x-instance"], r.headers.get("ce-id")) for r in receiver.requests}
        shares.append(Counter(instance for instance, _ in delivered))
        if shares[-1]["a"] >= 60 and shares[-1]["b"] >= 60:
            break
    else:
        raise AssertionError(
            f"one process did not share the work, distinct events each had delivered after "
            f"each round: {shares}\n{await diagnosis()}"
        )

    receiver.respond(Response(204, delay=0.05))
    more = asyncio.create_task(_publish(b.url, 300, prefix="c"))
    late = await _publish(a.url, 100, prefix="d")
    await a.kill()
    accepted |= late | await more
    await _wait_all(receiver, accepted, timeout=120)
    await b.terminate()


async def _where(proc: ServeProcess) -> str:
    """Where a process's events went, from its counters (for a failure's message); says so
    when the process does not answer (dead, or its loop stuck)."""
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(proc.url + "/metrics") as resp,
        ):
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"unreachable ({exc!r})"
    wanted = ("eventbus_events_", "eventbus_deliveries")
    lines = text.splitlines()
    return "; ".join(s for s in lines if s.startswith(wanted) and "_created" not in s)


def _warnings(proc: ServeProcess) -> str:
    lines = proc.log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if "INFO" not in line)[-4000:]


async def test_rules_reload_swaps_and_an_invalid_set_keeps_the_old(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    svc = await eventbus(
        rules="- name: a\n  match: {type: [a]}\n  targets: [fn]\n", targets=targets
    )
    rules_file = tmp_path / "rules" / "rules.yaml"

    def ev(i: str, t: str) -> dict[str, Any]:
        return {"specversion": "1.0", "id": i, "source": "tests/reload", "type": t}

    await svc.post_event(ev("1", "a"))
    await receiver.wait_for(1)

    rules_file.write_text(
        "- name: b\n  match: {type: [b]}\n  targets: [fn]\n"
        "- name: broken\n  match: {type: []}\n  when: 'event.type =='\n  targets: [nope]\n"
    )
    status, _, problem = await svc.request("POST", "/rules/reload")
    assert status == 400
    detail = problem["detail"]
    assert "rules.yaml:" in detail and "broken" in detail and "nope" in detail
    status, _, body = await svc.request("GET", "/rules")
    assert [r["name"] for r in body["rules"]] == ["a"]  # the old set stays

    _, _, before = await svc.request("GET", "/rules")
    rules_file.write_text("- name: b\n  match: {type: [b]}\n  targets: [fn]\n")
    status, _, body = await svc.request("POST", "/rules/reload")
    # another set of rules, another fingerprint: what tells instances' rule sets apart
    assert status == 200 and body["rules"] == 1
    assert body["fingerprint"] != before["fingerprint"]
    _, _, after = await svc.request("GET", "/rules")
    assert after["fingerprint"] == body["fingerprint"] and len(body["fingerprint"]) == 12
    await svc.post_event(ev("2", "a"))  # no longer routed
    await svc.post_event(ev("3", "b"))
    await receiver.wait_for(2)
    await svc.drained()  # "2" was routed too, to nothing
    assert [r.cloudevent["id"] for r in receiver.requests] == ["1", "3"]


async def test_a_reload_checks_overrides_against_the_delivery_settings_in_use(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # Connectors are read at start; the reload checked rules' overrides against the files' new
    # delivery settings: accepted, the override then failed every delivery of its route.
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    svc = await eventbus(
        rules="- name: a\n  match: {type: [a]}\n  targets: [fn]\n", targets=targets
    )
    longer = [{**targets[0], "delivery": {"retry": {"max_delay": "1h"}}}]
    (tmp_path / "connectors" / "connectors.yaml").write_text(yaml.safe_dump({"targets": longer}))
    (tmp_path / "rules" / "rules.yaml").write_text(
        "- name: a\n  match: {type: [a]}\n  targets:\n"
        "    - name: fn\n      delivery: {retry: {initial_delay: 20m}}\n"
    )
    status, _, problem = await svc.request("POST", "/rules/reload")
    assert status == 400, problem
    assert "max_delay" in problem["detail"] and "initial_delay" in problem["detail"]
    await svc.post_event({"specversion": "1.0", "id": "1", "source": "tests/reload", "type": "a"})
    await receiver.wait_for(1)


async def test_a_new_target_in_the_files_waits_for_a_restart_without_holding_reloads(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # a target added to connectors/ refused every reload ("new targets need a restart") until
    # a restart, even once no rule named it
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    svc = await eventbus(rules="- name: a\n  targets: [fn]\n", targets=targets)
    more = [*targets, {"name": "new-fn", "type": "http", "url": receiver.url("/new")}]
    (tmp_path / "connectors" / "connectors.yaml").write_text(yaml.safe_dump({"targets": more}))
    rules = tmp_path / "rules" / "rules.yaml"
    rules.write_text("- name: a\n  targets: [fn]\n- name: b\n  targets: [fn]\n")
    status, _, answer = await svc.request("POST", "/rules/reload")
    assert status == 200 and answer["rules"] == 2, answer
    assert answer["notes"] == [
        f"targets new-fn are new in {tmp_path / 'connectors'}: they start at the next start, "
        "and rules may name them from then on"
    ]
    rules.write_text("- name: a\n  targets: [new-fn]\n")
    status, _, problem = await svc.request("POST", "/rules/reload")
    assert status == 400 and "unknown target 'new-fn'" in problem["detail"], problem
    assert "targets new-fn are new in " in problem["detail"], problem  # and why it is unknown
    (tmp_path / "connectors" / "connectors.yaml").write_text(yaml.safe_dump({"targets": []}))
    rules.write_text("- name: a\n  targets: [fn]\n")
    status, _, answer = await svc.request("POST", "/rules/reload")
    assert status == 200 and answer["notes"][0].startswith("targets fn are no longer in "), answer


async def test_a_reload_names_the_targets_and_sources_edited_in_the_files(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # A target's URL edited and reloaded: "notes": [], the operator took the new URL for live
    # (only added, removed and delivery settings were noted; sources not at all).
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    timer = {"name": "tick", "type": "timer", "schedule": "0 * * * *"}
    svc = await eventbus(rules="- name: a\n  targets: [fn]\n", targets=targets, sources=[timer])
    edited = [{**targets[0], "url": receiver.url("/fn2"), "headers": {"X-A": "b"}}]
    sources = [{**timer, "schedule": "30 * * * *"}, {**timer, "name": "tock"}]
    (tmp_path / "connectors" / "connectors.yaml").write_text(
        yaml.safe_dump({"targets": edited, "sources": sources})
    )
    status, _, answer = await svc.request("POST", "/rules/reload")
    where = tmp_path / "connectors"
    assert status == 200 and answer["notes"] == [
        f"targets changed in {where}: fn (url, headers); the running ones stay as they were "
        "until the next start",
        f"sources in {where}: tock new; changed: tick (schedule); sources are read at the "
        "start, and run as they were until the next start",
    ], answer
    await svc.post_event({"specversion": "1.0", "id": "1", "source": "tests/reload", "type": "a"})
    (request,) = await receiver.wait_for(1)
    assert request.path == "/fn"  # as the note says


async def test_a_reload_refuses_connector_files_the_next_start_would_refuse(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # The reload checked the files' syntax only: a target the adapter refuses (a port out of
    # range) got 200 "starts at the next start", and the next restart failed on it.
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    svc = await eventbus(rules="- name: a\n  targets: [fn]\n", targets=targets)
    bad = [*targets, {"name": "bad", "type": "http", "url": "http://127.0.0.1:99999/"}]
    (tmp_path / "connectors" / "connectors.yaml").write_text(yaml.safe_dump({"targets": bad}))
    status, _, problem = await svc.request("POST", "/rules/reload")
    assert status == 400, problem
    assert "the next start would refuse the connector files" in problem["detail"], problem
    assert "connectors.yaml:" in problem["detail"] and "'bad'" in problem["detail"], problem
    await svc.post_event({"specversion": "1.0", "id": "1", "source": "tests/reload", "type": "a"})
    await receiver.wait_for(1)  # the rules in use stay


async def test_a_reload_checks_the_sources_this_process_runs_only(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # With run_sources off the start builds no queue source; the reload built them all, and a
    # CA file only the source-running host has refused every reload here.
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    elsewhere = {"ca": str(tmp_path / "only-on-the-source-host.pem")}
    mqtt = {"name": "mq", "type": "mqtt", "port": 8883, "topics": ["a"], "tls": elsewhere}
    svc = await eventbus(
        rules="- name: a\n  targets: [fn]\n",
        targets=targets,
        sources=[mqtt],
        settings={"run_sources": False},
    )
    status, _, answer = await svc.request("POST", "/rules/reload")
    assert status == 200, answer


async def test_a_reload_does_not_repeat_the_warnings_of_the_start(
    eventbus: StartService, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Building the adapters to check them, each reload said the start's warnings again (in
    # every worker): credentials over plain http, TLS verification off
    auth = {"bearer": "a-token-long-enough-for-eventbus"}
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn"), "auth": auth}]
    caplog.set_level(logging.WARNING, logger="eventbus")
    svc = await eventbus(rules="- name: a\n  targets: [fn]\n", targets=targets)
    assert "credentials are sent over plain http" in caplog.text
    caplog.clear()
    status, _, answer = await svc.request("POST", "/rules/reload")
    assert status == 200, answer
    assert "credentials are sent over plain http" not in caplog.text, caplog.text


async def test_the_service_answers_and_routes_while_a_large_rule_set_compiles(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    # Compiling CEL is slow (about a millisecond a condition): a reload of thousands of rules
    # held the event loop for seconds, no probe, ingest or delivery answered meanwhile.
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    first = "- name: a\n  match: {type: [a]}\n  targets: [fn]\n"
    svc = await eventbus(rules=first, targets=targets)
    many = "".join(
        f"- name: c{i}\n  match: {{type: [c]}}\n  when: event.data.n == {i} || event.data.m > {i}"
        "\n  targets: [fn]\n"
        for i in range(1500)
    )
    (tmp_path / "rules" / "rules.yaml").write_text(first + many)
    reload = asyncio.create_task(svc.request("POST", "/rules/reload"))
    await asyncio.sleep(0.3)
    answered = 0
    while not reload.done():
        probe, _, _ = await svc.request("GET", "/healthz")
        accepted, _ = await svc.post_event(
            {"specversion": "1.0", "id": str(answered), "source": "tests/reload", "type": "a"}
        )
        assert probe == 200 and accepted == 202
        answered += not reload.done()
    status, _, body = await reload
    assert status == 200 and body["rules"] == 1501, body
    assert answered >= 3, answered
    await receiver.wait_for(answered)  # routed by one rule set or the other: "a" is in both


S3_NOTIFICATION = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2026-11-28T10:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "responseElements": {"x-amz-request-id": "REQ1", "x-amz-id-2": "ID2"},
            "s3": {
                "bucket": {"name": "photos"},
                "object": {"key": "cats/tom.png", "size": 10, "eTag": "abc"},
            },
        }
    ]
}


async def test_bucket_notifications_over_http(eventbus: StartService, receiver: Receiver) -> None:
    rules = """
- name: thumbnails
  match:
    type: [{prefix: com.amazonaws.s3.ObjectCreated}]
    subject: [{suffix: .png}]
  transform:
    input_paths: {bucket: $.data.s3.bucket.name, key: $.subject}
    template: {"bucket": <bucket>, "key": <key>}
  targets: [fn]
"""
    svc = await eventbus(
        rules=rules, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    status, _, body = await svc.request(
        "POST",
        "/notifications",
        orjson.dumps(S3_NOTIFICATION),
        {"Content-Type": "application/json"},
    )
    assert status == 202, body
    assert body["entries"][0]["id"].startswith("REQ1.ID2.")  # and which object of the request
    (req,) = await receiver.wait_for(1)
    assert req.json() == {"bucket": "photos", "key": "cats/tom.png"}
    assert req.headers["ce-source"] == "aws:s3.us-east-1.photos"

    status, _, problem = await svc.request(
        "POST",
        "/notifications",
        b'{"Records": [{"eventSource": "aws:s3"}]}',
        {"Content-Type": "application/json"},
    )
    assert status == 400 and "Records[0]" in problem["detail"]
    status, _, problem = await svc.request("POST", "/notifications", b"nope")
    assert status == 400


async def test_configured_source_feeds_the_rules(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    rules = """
- name: csv-files
  match:
    type: [eventbus.file.created]
    subject: [{suffix: .csv}]
  targets: [fn]
"""
    sources = [
        {
            "name": "drop",
            "type": "directory",
            "path": str(drop),
            "pattern": "*.csv",
            "interval": 0.1,
        }
    ]
    svc = await eventbus(
        rules=rules,
        sources=sources,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
    )
    (drop / "a.csv").write_text("x,y\n")
    (drop / "b.txt").write_text("ignored")
    (req,) = await receiver.wait_for(1)
    assert req.cloudevent["subject"] == "a.csv"
    status, _, body = await svc.request("GET", "/sources")
    assert status == 200
    (state,) = body["sources"]
    assert state["name"] == "drop" and state["state"] == "running" and state["events"] == 1
