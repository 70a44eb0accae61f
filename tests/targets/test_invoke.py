"""``Target.invoke``: one synchronous attempt that returns the endpoint's answer, against real
endpoints (the ``receiver`` function, Tansu, nats-server). What ``deliver`` sends is the same
request (test_http.py, test_kafka_target.py, test_nats_target.py); this is what comes back."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import orjson
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from eventbus.bus._nats_server import free_port
from eventbus.targets import (
    HttpTarget,
    HttpTargetSpec,
    KafkaTarget,
    KafkaTargetSpec,
    NatsTarget,
    NatsTargetSpec,
)
from tests.fixtures.nats import unique_name
from tests.fixtures.receiver import Receiver, Response
from tests.targets.conftest import read_records

EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "inv-1",
    "source": "/tests/invoke",
    "type": "com.example.invoked",
    "datacontenttype": "application/json",
    "data": {"n": 1},
}


async def test_http_invoke_returns_status_content_type_and_body(receiver: Receiver) -> None:
    receiver.script(
        Response(201, headers={"Content-Type": "text/csv"}, body=b"a,b\n1,2\n"),
        Response(422, headers={"Content-Type": "application/json"}, body=b'{"bad": true}'),
    )
    async with HttpTarget(HttpTargetSpec(name="fn", url=receiver.url("/fn"))) as target:
        ok = await target.invoke(EVENT, EVENT, is_cloudevent=True)
        refused = await target.invoke(EVENT, EVENT, is_cloudevent=True)
    assert ok.outcome.delivered and ok.outcome.status == 201 and not ok.busy
    assert (ok.content_type, ok.body) == ("text/csv", b"a,b\n1,2\n")
    assert refused.outcome.status == 422 and not refused.outcome.delivered
    assert refused.body == b'{"bad": true}'
    assert [r.cloudevent for r in receiver.requests] == [EVENT, EVENT]


async def test_http_invoke_with_the_cap_full_sends_nothing(receiver: Receiver) -> None:
    receiver.respond(Response(200, delay=5))
    config = HttpTargetSpec(name="fn", url=receiver.url("/fn"), concurrency=1)
    async with HttpTarget(config) as target:
        first = asyncio.create_task(target.invoke(EVENT, EVENT, is_cloudevent=True))
        await receiver.wait_for(1)
        second = await target.invoke(EVENT, EVENT, is_cloudevent=True)
        assert second.busy and not second.outcome.delivered and second.outcome.retryable
        assert "concurrency cap of 1" in (second.outcome.error or "")
        first.cancel()
    assert len(receiver.requests) == 1


async def test_http_invoke_timeout_and_refused_connection(receiver: Receiver) -> None:
    receiver.respond(Response(200, delay=5))
    config = HttpTargetSpec(name="fn", url=receiver.url("/fn"), timeout=0.3)
    async with HttpTarget(config) as target:
        late = await target.invoke(EVENT, EVENT, is_cloudevent=True)
    assert late.outcome.timed_out and late.outcome.status is None
    closed = HttpTargetSpec(name="fn", url=f"http://127.0.0.1:{free_port()}/")
    async with HttpTarget(closed) as target:
        refused = await target.invoke(EVENT, EVENT, is_cloudevent=True)
    assert not refused.outcome.timed_out and "connection refused" in (refused.outcome.error or "")


async def test_kafka_invoke_answers_with_the_acknowledgement(kafka_bootstrap: str) -> None:
    topic = unique_name("invoke")
    config = KafkaTargetSpec(
        name="k", bootstrap_servers=kafka_bootstrap, topic=topic, idempotent=False
    )
    async with KafkaTarget(config) as target:
        answers = [await target.invoke(EVENT, EVENT, is_cloudevent=True) for _ in range(2)]
    acks = [orjson.loads(a.body) for a in answers]
    assert all(a.outcome.delivered and a.content_type == "application/json" for a in answers)
    assert [a["topic"] for a in acks] == [topic, topic]
    records = await read_records(kafka_bootstrap, topic, 2)
    # each acknowledgement names where its record is
    assert sorted((a["partition"], a["offset"]) for a in acks) == sorted(
        (r.partition, r.offset) for r in records
    )


async def test_nats_invoke_answers_with_the_acknowledgement(nats_url: str) -> None:
    subject = unique_name("invoke")
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=subject, subjects=[subject + ".js"]))
        core = NatsTargetSpec(name="n", url=nats_url, subject=subject + ".core")
        stream = NatsTargetSpec(name="j", url=nats_url, subject=subject + ".js", jetstream=True)
        async with NatsTarget(core) as a, NatsTarget(stream) as b:
            plain = await a.invoke(EVENT, EVENT, is_cloudevent=True)
            stored = await b.invoke(EVENT, EVENT, is_cloudevent=True)
        await js.delete_stream(subject)
    finally:
        await nc.close()
    assert plain.outcome.delivered and orjson.loads(plain.body) == {"subject": subject + ".core"}
    assert stored.outcome.delivered and stored.content_type == "application/json"
    assert orjson.loads(stored.body) == {
        "subject": subject + ".js",
        "stream": subject,
        "seq": 1,
        "duplicate": False,
    }


async def test_broker_invoke_failure_has_no_body(nats_url: str) -> None:
    config = NatsTargetSpec(name="n", url=nats_url, subject=unique_name("s"), jetstream=True)
    async with NatsTarget(config) as target:
        answer = await target.invoke(EVENT, EVENT, is_cloudevent=True)
    assert not answer.outcome.delivered and answer.body == b"" and answer.content_type is None
    assert "no JetStream stream" in (answer.outcome.error or "")


async def test_nats_request_returns_the_subscribers_reply(nats_url: str) -> None:
    subject = unique_name("request")
    nc = await nats.connect(nats_url)

    async def answer(msg: Msg) -> None:
        seen = orjson.loads(msg.data)
        await nc.publish(
            msg.reply,
            orjson.dumps({"echo": seen["id"]}),
            headers={"Content-Type": "application/json"},
        )

    try:
        await nc.subscribe(subject, cb=answer)
        await nc.flush()
        config = NatsTargetSpec(name="n", url=nats_url, subject=subject, timeout=2)
        nobody = NatsTargetSpec(name="m", url=nats_url, subject=subject + ".x", timeout=2)
        async with NatsTarget(config) as target, NatsTarget(nobody) as silent:
            replied = await target.request(EVENT, EVENT, is_cloudevent=True)
            unanswered = await silent.request(EVENT, EVENT, is_cloudevent=True)
    finally:
        await nc.close()
    assert replied.outcome.delivered and replied.content_type == "application/json"
    assert orjson.loads(replied.body) == {"echo": "inv-1"}
    assert not unanswered.outcome.delivered and unanswered.outcome.retryable
    assert "no responders" in (unanswered.outcome.error or "")


async def test_a_nats_micro_error_reply_is_a_failed_call(nats_url: str) -> None:
    # A NATS micro service answers an error with its headers: it was answered 200 and audited
    # delivered, the caller unable to tell the call failed.
    subject = unique_name("micro")
    nc = await nats.connect(nats_url)
    errors = {
        "bad": ({"Nats-Service-Error": "bad input", "Nats-Service-Error-Code": "400"}, b""),
        "odd": ({"Nats-Service-Error": "exploded", "Nats-Service-Error-Code": "1001"}, b"{}"),
        "sup": ({"Nats-Service-Error": "x", "Nats-Service-Error-Code": "4\u00b2"}, b"{}"),
        "long": ({"Nats-Service-Error": "x", "Nats-Service-Error-Code": "4" * 5000}, b"{}"),
    }

    async def answer(msg: Msg) -> None:
        headers, data = errors[orjson.loads(msg.data)["data"]["kind"]]
        await nc.publish(msg.reply, data, headers=headers)

    try:
        await nc.subscribe(subject, cb=answer)
        await nc.flush()
        config = NatsTargetSpec(name="n", url=nats_url, subject=subject, timeout=2)
        async with NatsTarget(config) as target:
            answers = {}
            for kind in errors:
                event = {**EVENT, "data": {"kind": kind}}
                answers[kind] = await target.request(event, event, is_cloudevent=True)
    finally:
        await nc.close()
    bad, odd = answers["bad"], answers["odd"]
    assert not bad.outcome.delivered and bad.outcome.status == 400
    assert not bad.outcome.retryable
    assert bad.outcome.error == "the service replied with error 400: bad input"
    assert (bad.content_type, bad.body) == ("text/plain; charset=utf-8", b"bad input")
    assert odd.outcome.status == 500 and odd.outcome.retryable  # not an HTTP status
    assert odd.body == b"{}"
    # a code int() refuses (a superscript digit, 5,000 digits) raised: a bare 500, unaudited
    assert answers["sup"].outcome.status == 500 and answers["long"].outcome.status == 500
    assert len(answers["long"].outcome.error or "") < 200
