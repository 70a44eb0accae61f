"""The HTTP target against a real aiohttp function endpoint (``receiver`` fixture): what only
HTTP does. What every target does (lifecycle, timeouts, refusals, outcomes) is test_contract.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil
import pydantic
import pytest
from cloudevents.v1.http import from_http as sdk_from_http

from eventbus._errors import ConfigError
from eventbus.targets import HttpTarget, HttpTargetSpec, Outcome, verify_webhook
from eventbus.targets._base import MAX_ERROR_CHARS
from eventbus.targets._http import MAX_RESPONSE_BYTES, parse_retry_after
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.wait import eventually


def make_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/tests/targets",
        "type": "com.example.object.created",
        "datacontenttype": "application/json",
        "subject": "a.txt",
        "data": {"key": "a.txt", "size": 3},
    }
    event.update(overrides)
    return event


async def deliver_once(config: HttpTargetSpec, payload: Any = None, **kw: Any) -> Outcome:
    event = make_event()
    async with HttpTarget(config) as target:
        return await target.deliver(
            event,
            event if payload is None else payload,
            is_cloudevent=kw.get("is_cloudevent", payload is None),
            attempt=1,
        )


def config_for(receiver: Receiver, **kw: Any) -> HttpTargetSpec:
    return HttpTargetSpec(name="fn", url=receiver.url("/fn"), **kw)


# --- what is sent ---------------------------------------------------------------------------


async def test_static_headers_in_any_case_replace_defaults_and_yield_to_the_event(
    receiver: Receiver,
) -> None:
    # Header names are case-insensitive: a target's "user-agent" replaces eventbus's default,
    # and its "content-type" or "ce-id", in whatever case, yields to the event's own value
    # instead of going out as a second header beside it.
    headers = {"user-agent": "billing-bus", "CONTENT-TYPE": "text/plain", "CE-ID": "forged"}
    outcome = await deliver_once(config_for(receiver, headers=headers))
    assert outcome.delivered, outcome.error
    (req,) = await receiver.wait_for(1)
    assert req.headers.getall("User-Agent") == ["billing-bus"]
    assert req.headers.getall("Content-Type") == ["application/json"]
    assert req.headers.getall("ce-id") == ["evt-1"]


async def test_binary_mode_sends_ce_headers_and_data_body(receiver: Receiver) -> None:
    outcome = await deliver_once(config_for(receiver, headers={"Authorization": "Bearer t"}))
    assert outcome.delivered and outcome.status == 204 and outcome.error is None
    (req,) = await receiver.wait_for(1)
    assert (req.method, req.path) == ("POST", "/fn")
    assert req.headers["ce-id"] == "evt-1"
    assert req.headers["ce-source"] == "/tests/targets"
    assert req.headers["ce-type"] == "com.example.object.created"
    assert req.headers["ce-specversion"] == "1.0"
    assert req.headers["ce-subject"] == "a.txt"
    assert req.headers["Content-Type"].startswith("application/json")
    assert req.headers["Authorization"] == "Bearer t"
    assert "webhook-signature" not in req.headers
    assert req.json() == {"key": "a.txt", "size": 3}
    assert req.cloudevent is not None and req.cloudevent["id"] == "evt-1"


async def test_binary_payload_arrives_as_raw_bytes(receiver: Receiver) -> None:
    event = make_event(datacontenttype="image/png", data_base64="iVBORw0KGgo=")
    del event["data"]
    async with HttpTarget(config_for(receiver)) as target:
        outcome = await target.deliver(event, event, is_cloudevent=True, attempt=1)
    assert outcome.delivered
    (req,) = await receiver.wait_for(1)
    assert req.body == base64.b64decode("iVBORw0KGgo=")
    assert req.headers["Content-Type"] == "image/png"
    assert req.headers["ce-id"] == "evt-1"


async def test_structured_mode_sends_whole_event_as_json(receiver: Receiver) -> None:
    outcome = await deliver_once(config_for(receiver, mode="structured"))
    assert outcome.delivered
    (req,) = await receiver.wait_for(1)
    assert req.headers["Content-Type"].startswith("application/cloudevents+json")
    assert "ce-id" not in req.headers
    assert req.json() == make_event()


@pytest.mark.parametrize(
    ("payload", "content_type", "body"),
    [
        ({"file": "a.txt", "n": [1, 2]}, "application/json", b'{"file":"a.txt","n":[1,2]}'),
        ([1, "two"], "application/json", b'[1,"two"]'),
        ("object a.txt was created", "text/plain; charset=utf-8", b"object a.txt was created"),
    ],
)
async def test_transformed_payload_sent_as_body_with_event_identity(
    receiver: Receiver, payload: Any, content_type: str, body: bytes
) -> None:
    outcome = await deliver_once(config_for(receiver), payload, is_cloudevent=False)
    assert outcome.delivered
    (req,) = await receiver.wait_for(1)
    assert req.body == body
    assert req.headers["Content-Type"] == content_type
    assert req.headers["ce-id"] == "evt-1"
    assert req.headers["ce-source"] == "/tests/targets"
    assert req.headers["ce-type"] == "com.example.object.created"
    assert req.headers["ce-specversion"] == "1.0"
    assert "ce-subject" not in req.headers


async def test_signed_request_verifies_and_matches_independent_hmac(receiver: Receiver) -> None:
    key = b"function secret key"
    secret = "whsec_" + base64.b64encode(key).decode()
    before = int(time.time())
    outcome = await deliver_once(config_for(receiver, secret=secret))
    assert outcome.delivered
    (req,) = await receiver.wait_for(1)
    verify_webhook(secret, req.headers, req.body)
    assert req.headers["webhook-id"] == "evt-1"
    ts = int(req.headers["webhook-timestamp"])
    assert ts >= before
    signed = f"evt-1.{ts}.".encode() + req.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert req.headers["webhook-signature"] == f"v1,{expected}"


async def test_a_delivery_waiting_for_a_slot_is_signed_when_it_goes_out(
    receiver: Receiver,
) -> None:
    # Stamped before waiting behind the concurrency cap, a queued delivery arrived as old as
    # its wait (minutes, with a slow function), past a receiver's 5-minute window: 401.
    receiver.script(Response(204, delay=2.2), 204)
    async with HttpTarget(
        config_for(receiver, secret="a raw secret of 26 bytes", concurrency=1)
    ) as target:
        first, second = (make_event(), {**make_event(), "id": "evt-2"})
        await asyncio.gather(
            *(target.deliver(e, e, is_cloudevent=True, attempt=1) for e in (first, second))
        )
    stamps = [int(r.headers["webhook-timestamp"]) for r in receiver.requests]
    assert stamps[1] - stamps[0] >= 2, stamps
    for req in receiver.requests:
        verify_webhook("a raw secret of 26 bytes", req.headers, req.body)


async def test_signed_transformed_payload_uses_original_event_id(receiver: Receiver) -> None:
    outcome = await deliver_once(
        config_for(receiver, secret="a raw secret of 26 bytes"), {"a": 1}, is_cloudevent=False
    )
    assert outcome.delivered
    (req,) = await receiver.wait_for(1)
    assert req.headers["webhook-id"] == "evt-1"
    verify_webhook("a raw secret of 26 bytes", req.headers, req.body)


# --- classification ---------------------------------------------------------------------------


def in_two_minutes() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)


@pytest.mark.parametrize(
    ("answer", "delivered", "retryable", "gone"),
    [
        (Response(200), True, False, False),
        (Response(201, body=b"created"), True, False, False),
        (Response(204), True, False, False),
        (Response(400, body=b"bad field 'size'"), False, False, False),
        (Response(404), False, False, False),
        (Response(408), False, True, False),
        (Response(410), False, False, True),
        (Response(429), False, True, False),
        (Response(500, body=b"boom"), False, True, False),
        (Response(502), False, True, False),
        (Response(503), False, True, False),
        (Response(302, headers={"Location": "/elsewhere"}), False, False, False),
    ],
    ids=lambda v: str(v.status) if isinstance(v, Response) else None,
)
async def test_status_classification(
    receiver: Receiver, answer: Response, delivered: bool, retryable: bool, gone: bool
) -> None:
    receiver.script(answer)
    outcome = await deliver_once(config_for(receiver))
    assert outcome.status == answer.status
    assert (outcome.delivered, outcome.retryable, outcome.gone) == (delivered, retryable, gone)
    assert outcome.retry_after is None
    assert outcome.reply is None
    assert outcome.duration_ms >= 0
    if delivered:
        assert outcome.error is None
    else:
        assert outcome.error is not None and outcome.error.startswith(f"HTTP {answer.status}")
        if answer.body:
            assert answer.body.decode() in outcome.error
    if answer.status == 302:
        assert "redirect to /elsewhere not followed" in (outcome.error or "")
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_and_http_date(receiver: Receiver, status: int) -> None:
    receiver.script(
        Response(status, headers={"Retry-After": "7"}),
        Response(status, headers={"Retry-After": in_two_minutes()}),
        Response(status, headers={"Retry-After": "whenever"}),
    )
    config = config_for(receiver)
    event = make_event()
    async with HttpTarget(config) as target:
        seconds, date, junk = [
            await target.deliver(event, event, is_cloudevent=True, attempt=i) for i in (1, 2, 3)
        ]
    assert seconds.retryable and seconds.retry_after == 7.0
    assert date.retry_after is not None and 60 < date.retry_after <= 121
    assert junk.retryable and junk.retry_after is None


async def test_retry_after_ignored_on_other_statuses(receiver: Receiver) -> None:
    receiver.script(Response(500, headers={"Retry-After": "7"}))
    outcome = await deliver_once(config_for(receiver))
    assert outcome.retryable and outcome.retry_after is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        (" 120 ", 120.0),
        ("-1", None),
        ("1.5", None),
        ("later", None),
        ("\u00b2", None),  # a digit to str.isdigit, not to float()
        pytest.param("9" * 400, 365 * 86400.0, id="400-digits"),  # a year at most, not inf
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("url", "http://", "url must be http"),
        ("url", "http://[::1/", "invalid url"),
        ("headers", {"X-Evil": "a\r\nInjected: yes"}, "line break"),
    ],
)
def test_bad_config_is_rejected_before_any_request(field: str, value: Any, reason: str) -> None:
    kwargs: dict[str, Any] = {"name": "fn", "url": "http://127.0.0.1:1/", field: value}
    with pytest.raises(ConfigError, match=reason) as info:
        HttpTarget(HttpTargetSpec(**kwargs))
    assert "'fn'" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("url", "ftp://127.0.0.1/x"),
        ("url", "no scheme at all"),
        ("concurrency", 0),
        ("mode", "carrier-pigeon"),
        ("timeout", 0),
        ("secret", "whsec_***"),  # not valid base64
        # a key of a few bytes, guessed from one signed request (as inbound: 16 at least)
        ("secret", "abc"),
        ("secret", "whsec_AA=="),
    ],
)
def test_the_spec_refuses_what_it_can_check(field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        HttpTargetSpec(name="fn", **{"url": "http://127.0.0.1:1/", field: value})


def test_the_secret_can_come_from_the_environment() -> None:
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": "http://127.0.0.1:1/", "secret": {"env": "EVENTBUS_TEST_SECRET"}},
        context={"env": {"EVENTBUS_TEST_SECRET": "whsec_c2l4dGVlbiBieXRlIGtleQ=="}},
    )
    assert HttpTarget(spec)._key == b"sixteen byte key"


# --- bad input at deliver -------------------------------------------------------------------


async def test_a_payload_said_to_be_a_cloudevent_that_is_none_is_final(receiver: Receiver) -> None:
    # HTTP checks what it is handed (the Kafka and NATS targets send it as it is); the rest of
    # the unsendable payloads are in the target contract (test_contract.py).
    event = make_event()
    async with HttpTarget(config_for(receiver)) as target:
        bad = await target.deliver(event, {"data": 1}, is_cloudevent=True, attempt=1)
    assert not bad.delivered and not bad.retryable and bad.status is None
    assert bad.error is not None and bad.error.startswith("cannot build the request")
    assert receiver.requests == []


# --- concurrency ------------------------------------------------------------------------------


async def test_concurrency_is_a_hard_cap(receiver: Receiver) -> None:
    receiver.respond(Response(200, delay=0.3))
    event = make_event()
    async with HttpTarget(config_for(receiver, concurrency=3)) as target:
        outcomes = await asyncio.gather(
            *(target.deliver(event, event, is_cloudevent=True, attempt=1) for _ in range(10))
        )
    assert all(o.delivered for o in outcomes)
    assert len(receiver.requests) == 10
    assert 1 < receiver.max_in_flight <= 3


def connections_to(port: int) -> int:
    """This process's open TCP connections to ``port`` on loopback."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def test_targets_share_one_connection_pool(receiver: Receiver) -> None:
    # 100 targets of one endpoint, each used in turn: one kept-alive connection serves them all
    # (a pool per target would hold 100 open sockets, and 1,000 targets a thousand).
    port = urlsplit(receiver.url()).port
    assert port is not None
    event = make_event()
    async with contextlib.AsyncExitStack() as stack:
        targets = [
            await stack.enter_async_context(
                HttpTarget(HttpTargetSpec(name=f"fn-{n}", url=receiver.url(f"/fn/{n}")))
            )
            for n in range(100)
        ]
        for target in targets:
            outcome = await target.deliver(event, event, is_cloudevent=True, attempt=1)
            assert outcome.delivered
        assert len(receiver.requests) == 100
        assert connections_to(port) == 1
    # The last target to close closes the pool.
    await eventually(lambda: connections_to(port) == 0, within=5, what="pool closed")


async def test_a_closed_target_leaves_the_others_working(receiver: Receiver) -> None:
    event = make_event()
    async with HttpTarget(config_for(receiver)) as staying:
        async with HttpTarget(HttpTargetSpec(name="other", url=receiver.url("/other"))) as gone:
            assert (await gone.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
        assert (await staying.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
    assert [r.path for r in receiver.requests] == ["/other", "/fn"]


async def test_each_target_keeps_its_own_timeout_in_the_shared_pool(receiver: Receiver) -> None:
    receiver.respond(Response(204, delay=0.6))
    event = make_event()
    async with (
        HttpTarget(HttpTargetSpec(name="patient", url=receiver.url("/a"), timeout=5)) as patient,
        HttpTarget(HttpTargetSpec(name="hasty", url=receiver.url("/b"), timeout=0.2)) as hasty,
    ):
        slow, fast = await asyncio.gather(
            patient.deliver(event, event, is_cloudevent=True, attempt=1),
            hasty.deliver(event, event, is_cloudevent=True, attempt=1),
        )
    assert slow.delivered
    assert not fast.delivered and fast.error == "timeout after 0.2s"


# --- replies ----------------------------------------------------------------------------------

REPLY = {
    "specversion": "1.0",
    "id": "reply-1",
    "source": "/functions/thumbnail",
    "type": "com.example.thumbnail.created",
    "datacontenttype": "application/json",
    "data": {"thumbnail": "a.small.png"},
}


@pytest.mark.parametrize("structured", [False, True])
async def test_reply_event_is_parsed(receiver: Receiver, structured: bool) -> None:
    receiver.script(Response(200, reply=REPLY, structured=structured))
    outcome = await deliver_once(config_for(receiver))
    assert outcome.delivered and outcome.reply is not None
    assert {k: outcome.reply[k] for k in REPLY} == REPLY


async def test_handwritten_binary_reply_is_parsed(receiver: Receiver) -> None:
    receiver.script(
        Response(
            200,
            headers={
                "ce-specversion": "1.0",
                "ce-id": "r-7",
                "ce-source": "/fn",
                "ce-type": "com.example.done",
                "Content-Type": "application/json",
            },
            body=b'{"ok":true}',
        )
    )
    outcome = await deliver_once(config_for(receiver))
    assert outcome.reply is not None
    assert (outcome.reply["id"], outcome.reply["type"]) == ("r-7", "com.example.done")
    assert outcome.reply["data"] == {"ok": True}


async def test_handwritten_structured_reply_is_parsed(receiver: Receiver) -> None:
    receiver.script(
        Response(
            200,
            headers={"Content-Type": "application/cloudevents+json; charset=utf-8"},
            body=orjson.dumps(REPLY),
        )
    )
    outcome = await deliver_once(config_for(receiver))
    assert outcome.reply is not None and outcome.reply["id"] == "reply-1"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ce-specversion": "1.0", "ce-source": "/fn", "ce-type": "t"}, b"{}"),
        ({"Content-Type": "application/cloudevents+json"}, b"{not json"),
        ({"Content-Type": "application/cloudevents+json"}, b'{"specversion":"1.0"}'),
        # a NUL in the charset: once a ValueError that undid the delivery, made again for ever
        (
            {
                **{"ce-specversion": "1.0", "ce-id": "r", "ce-source": "/fn", "ce-type": "t"},
                "ce-datacontenttype": "text/plain;charset=utf-8%00",
                "Content-Type": "",  # the type is then ce-datacontenttype
            },
            b"abc",
        ),
    ],
    ids=[
        "binary-missing-id",
        "structured-not-json",
        "structured-missing-attributes",
        "binary-nul-charset",
    ],
)
async def test_invalid_reply_is_ignored_with_a_log_line(
    receiver: Receiver, caplog: pytest.LogCaptureFixture, headers: dict[str, str], body: bytes
) -> None:
    receiver.script(Response(200, headers=headers, body=body))
    with caplog.at_level(logging.WARNING, logger="eventbus.targets._http"):
        outcome = await deliver_once(config_for(receiver))
    assert outcome.delivered and outcome.reply is None and outcome.error is None
    assert "reply to event evt-1 ignored" in caplog.text


async def test_plain_json_answer_is_not_a_reply(receiver: Receiver) -> None:
    receiver.script(Response(200, headers={"Content-Type": "application/json"}, body=b'{"a":1}'))
    outcome = await deliver_once(config_for(receiver))
    assert outcome.delivered and outcome.reply is None


async def test_error_answer_with_cloudevent_is_not_a_reply(receiver: Receiver) -> None:
    receiver.script(Response(500, reply=REPLY))
    outcome = await deliver_once(config_for(receiver))
    assert not outcome.delivered and outcome.reply is None


# --- bounded responses ------------------------------------------------------------------------

HUGE = b"x" * (3 * MAX_RESPONSE_BYTES)


async def test_huge_error_body_is_bounded_and_target_keeps_working(receiver: Receiver) -> None:
    receiver.script(Response(500, body=HUGE), Response(200, body=HUGE), Response(204))
    event = make_event()
    async with HttpTarget(config_for(receiver)) as target:
        error, ok, after = [
            await target.deliver(event, event, is_cloudevent=True, attempt=1) for _ in range(3)
        ]
    assert error.retryable and error.error is not None
    assert len(error.error) == MAX_ERROR_CHARS and error.error.endswith("...")
    assert ok.delivered and ok.reply is None
    assert after.delivered


async def test_huge_reply_is_ignored(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    big = dict(REPLY, data={"blob": "y" * (2 * MAX_RESPONSE_BYTES)})
    receiver.script(Response(200, reply=big, structured=True))
    with caplog.at_level(logging.WARNING, logger="eventbus.targets._http"):
        outcome = await deliver_once(config_for(receiver))
    assert outcome.delivered and outcome.reply is None
    assert "larger than" in caplog.text


async def test_event_without_data_arrives_without_a_content_type(receiver: Receiver) -> None:
    # aiohttp would otherwise declare the empty body application/octet-stream, and a binding
    # reader would take that for the event's datacontenttype
    event = make_event()
    del event["data"], event["datacontenttype"]
    async with HttpTarget(config_for(receiver)) as target:
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
    (req,) = await receiver.wait_for(1)
    assert "Content-Type" not in req.headers
    assert req.cloudevent == event
    # and the CloudEvents SDK's reader sees no datacontenttype that was never set
    sdk_event = sdk_from_http(dict(req.headers), req.body)
    assert sdk_event.get("datacontenttype") is None and sdk_event.data is None
    assert sdk_event["id"] == event["id"]


def test_a_payload_handed_to_many_targets_is_encoded_once() -> None:
    from eventbus.targets import _http

    event = make_event(id="fanout-1")
    first_headers, first_body = _http._encoded(event, False)
    again_headers, again_body = _http._encoded(event, False)
    assert again_body is first_body  # remembered, not encoded again
    assert again_headers == first_headers and again_headers is not first_headers
    again_headers["webhook-id"] = "x"  # a caller's additions stay its own
    assert "webhook-id" not in _http._encoded(event, False)[0]
    # The structured encoding of the same payload is another entry.
    assert _http._encoded(event, True)[1] != first_body
    # An equal but distinct payload is encoded for itself, and the memory stays bounded.
    for n in range(3 * _http._ENCODED_KEEP):
        _http._encoded(make_event(id=f"other-{n}"), False)
    assert len(_http._ENCODED) <= _http._ENCODED_KEEP
    copy = dict(event)
    assert _http._encoded(copy, False)[1] == first_body


async def test_requests_ask_for_an_uncompressed_answer(receiver: Receiver) -> None:
    # The answer is read up to a bound and never decompressed: a function must not compress it
    # (without Accept-Encoding a server may pick any coding).
    event = make_event()
    async with HttpTarget(config_for(receiver)) as target:
        assert (await target.deliver(event, event, is_cloudevent=True, attempt=1)).delivered
    (req,) = await receiver.wait_for(1)
    assert req.headers["Accept-Encoding"] == "identity"
    assert req.headers["Content-Type"] == "application/json"


def test_a_concurrency_above_the_shared_pool_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="eventbus.targets._http"):
        HttpTarget(HttpTargetSpec(name="fits", url="http://127.0.0.1:9/", concurrency=512))
        assert caplog.text == ""
        HttpTarget(HttpTargetSpec(name="hog", url="http://127.0.0.1:9/", concurrency=600))
    assert "target hog: concurrency 600 is more than the 512 connections" in caplog.text
