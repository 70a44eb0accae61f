"""The ``webhook`` source end to end: requests signed the way each provider signs them (the
signers below follow the providers' published algorithms; Standard Webhooks is signed with
its own ``standardwebhooks`` package) are accepted at ``/hooks/<name>`` of a real service,
land on the real bus and reach a real function; a redelivered webhook is one event; every
way of getting a signature wrong is refused with 401 and recorded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from unittest.mock import ANY
from urllib.parse import quote

import orjson
import pytest
import standardwebhooks

from eventbus._errors import BusUnavailable, CloudEventError, ConfigError
from eventbus.config import load_connectors
from eventbus.sources import HookRequest, WebhookSource, build_source
from eventbus.sources import _webhook as webhook_module
from eventbus.sources._webhook import WebhookSourceSpec
from tests.fixtures.postgres import table_locked
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import RunningService, StartService
from tests.fixtures.wait import eventually
from tests.sources._harness import Recorder, make_context, running, source_pool

GITHUB_SECRET = "gh-secret-0123456789"
GITLAB_TOKEN = "gl-token-0123456789"
STRIPE_SECRET = "whsec_stripe0123456789"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-key-32-bytes!!").decode()
HMAC_SECRET = "generic-secret-0123456789"

SOURCES: list[dict[str, Any]] = [
    {"name": "github", "type": "webhook", "verify": {"kind": "github", "secret": GITHUB_SECRET}},
    {"name": "gitlab", "type": "webhook", "verify": {"kind": "gitlab", "secret": GITLAB_TOKEN}},
    {"name": "stripe", "type": "webhook", "verify": {"kind": "stripe", "secret": STRIPE_SECRET}},
    {
        "name": "slack",
        "type": "webhook",
        "verify": {"kind": "slack", "secret": SLACK_SECRET},
        "response": {"body": "{body:$.challenge}"},
    },
    {
        "name": "standard",
        "type": "webhook",
        "verify": {"kind": "standard-webhooks", "secret": {"env": "EB_TEST_STANDARD_SECRET"}},
    },
    {
        "name": "generic",
        "type": "webhook",
        "verify": {
            "kind": "hmac",
            "secret": HMAC_SECRET,
            "header": "X-Signature",
            "algorithm": "sha512",
            "encoding": "base64",
            "prefix": "sha512=",
            "signed": "{header:X-Timestamp}:{body}",
        },
        "event_type": "com.example.{query:kind}",
        "event_id": "{header:X-Request-Id}",
        "subject": "{body:$.order.id}",
        "extensions": {"tenant": "{query:tenant}", "requestid": "{header:X-Request-Id}"},
    },
    {"name": "plain", "type": "webhook", "methods": ["POST", "PUT"]},
    {
        "name": "static",
        "type": "webhook",
        "response": {"status": 200, "body": "ok", "content_type": "text/plain"},
    },
    {"name": "nocontent", "type": "webhook", "response": {"status": 204}},
]
# The generic scheme with its timestamp checked, and the events' ids left random.
_PARTNER: dict[str, Any] = {
    "name": "partner",
    "type": "webhook",
    "verify": {**cast(dict[str, Any], SOURCES[5]["verify"]), "timestamp": "X-Timestamp"},
}
RULES = "- name: all\n  targets: [fn]\n"
FORM = "application/x-www-form-urlencoded"


def github(body: bytes, delivery: str = "d-1", secret: str = GITHUB_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": f"sha256={digest}",
    }


def stripe(body: bytes, stamp: int | None = None, secret: str = STRIPE_SECRET) -> dict[str, str]:
    t = int(time.time()) if stamp is None else stamp
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "Stripe-Signature": f"t={t},v1={v1},v0=00"}


def slack(body: bytes, stamp: int | None = None) -> dict[str, str]:
    t = str(int(time.time()) if stamp is None else stamp)
    base = b"v0:" + t.encode() + b":" + body
    v0 = hmac.new(SLACK_SECRET.encode(), base, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": t,
        "X-Slack-Signature": f"v0={v0}",
    }


def standard(body: bytes, msg_id: str = "msg_1", at: datetime | None = None) -> dict[str, str]:
    moment = at or datetime.now(UTC)
    signature = standardwebhooks.Webhook(STANDARD_SECRET).sign(msg_id, moment, body.decode())
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
    }


def generic(body: bytes, stamp: str = "1700000000") -> dict[str, str]:
    digest = hmac.new(HMAC_SECRET.encode(), stamp.encode() + b":" + body, hashlib.sha512)
    return {
        "Content-Type": "application/json",
        "X-Timestamp": stamp,
        "X-Request-Id": "req-42",
        "X-Signature": "sha512=" + base64.b64encode(digest.digest()).decode(),
    }


@pytest.fixture
async def service(
    eventbus: StartService, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningService]:
    # the Standard Webhooks secret comes from the environment, as the docs advise
    monkeypatch.setenv("EB_TEST_STANDARD_SECRET", STANDARD_SECRET)
    yield await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=SOURCES,
    )


async def _delivered(receiver: Receiver, source: str, event_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        for r in receiver.requests:
            ce = r.cloudevent
            if ce is not None and ce["source"] == source and ce["id"] == event_id:
                return ce
        return None

    return await eventually(found, within=15, what=f"delivery of {source}/{event_id}")


async def test_each_provider_signed_as_it_signs_is_delivered(
    service: RunningService, receiver: Receiver
) -> None:
    push = orjson.dumps({"ref": "refs/heads/main", "commits": [{"id": "abc"}]})
    status, _, body = await service.request("POST", "/hooks/github", push, github(push))
    assert (status, body) == (
        202,
        {"id": "d-1", "source": "urn:eventbus:source:github", "duplicate": False},
    )
    ce = await _delivered(receiver, "urn:eventbus:source:github", "d-1")
    assert ce["type"] == "com.github.push"
    assert ce["data"] == orjson.loads(push)

    gl = orjson.dumps({"object_kind": "merge_request", "project": {"id": 7}})
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Token": GITLAB_TOKEN,
        "X-Gitlab-Event-UUID": "shared-by-the-hooks-of-one-action",
        "Idempotency-Key": "gl-key-1",
    }
    status, _, body = await service.request("POST", "/hooks/gitlab", gl, headers)
    assert status == 202, body
    assert (await _delivered(receiver, body["source"], "gl-key-1"))["type"] == (
        "com.gitlab.merge_request"
    )
    # GitLab's retry: a new Event-UUID, the same Idempotency-Key (it went to the bus again);
    # another hook of the same action: the same Event-UUID, another key (it was dropped)
    retry = {**headers, "X-Gitlab-Event-UUID": "another"}
    status, _, body = await service.request("POST", "/hooks/gitlab", gl, retry)
    assert (status, body["id"], body["duplicate"]) == (202, "gl-key-1", True)
    note = orjson.dumps({"object_kind": "note", "project": {"id": 7}})
    status, _, body = await service.request(
        "POST", "/hooks/gitlab", note, {**headers, "Idempotency-Key": "gl-key-2"}
    )
    assert (status, body["id"], body["duplicate"]) == (202, "gl-key-2", False)
    assert (await _delivered(receiver, body["source"], "gl-key-2"))["type"] == "com.gitlab.note"

    st = orjson.dumps({"id": "evt_1NG8Du", "type": "payment_intent.succeeded", "data": {}})
    status, _, body = await service.request("POST", "/hooks/stripe", st, stripe(st))
    assert (status, body["id"]) == (202, "evt_1NG8Du"), body
    ce = await _delivered(receiver, body["source"], "evt_1NG8Du")
    assert ce["type"] == "com.stripe.payment_intent.succeeded"

    sl = orjson.dumps({"type": "event_callback", "event_id": "Ev123", "event": {"type": "x"}})
    status, _, body = await service.request("POST", "/hooks/slack", sl, slack(sl))
    assert (status, body) == (200, None)  # the trigger's response: 200, an empty body
    ce = await _delivered(receiver, "urn:eventbus:source:slack", "Ev123")
    assert ce["type"] == "com.slack.event_callback"
    # Slack's URL verification: the challenge comes back as the answer
    challenge = orjson.dumps({"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV"})
    status, headers, body = await service.request(
        "POST", "/hooks/slack", challenge, slack(challenge)
    )
    assert (status, body) == (200, "3eZbrw1aBm2rZgRNFdxV")
    assert headers["Content-Type"].startswith("text/plain")

    sw = orjson.dumps({"type": "invoice.paid", "data": {"n": 1}})
    status, _, body = await service.request("POST", "/hooks/standard", sw, standard(sw))
    assert (status, body["id"]) == (202, "msg_1"), body
    assert (await _delivered(receiver, body["source"], "msg_1"))["type"] == "invoice.paid"

    order = orjson.dumps({"order": {"id": 991}})
    path = "/hooks/generic?kind=order.created&tenant=acme"
    status, _, body = await service.request("POST", path, order, generic(order))
    assert (status, body["id"]) == (202, "req-42"), body
    ce = await _delivered(receiver, body["source"], "req-42")
    assert ce["type"] == "com.example.order.created"
    assert (ce["subject"], ce["tenant"], ce["requestid"]) == ("991", "acme", "req-42")


async def test_header_values_are_signed_as_the_bytes_sent(
    service: RunningService, receiver: Receiver
) -> None:
    # The edge reads header bytes as latin-1; the signed text was encoded again as UTF-8, so
    # a request signed over a non-ASCII header value (sent in UTF-8) was refused with 401, and
    # the value, where it became an attribute, was mojibake ("cafÃ©").
    order = orjson.dumps({"order": {"id": 7}})
    stamp = "café-1700000000"
    digest = hmac.new(HMAC_SECRET.encode(), stamp.encode() + b":" + order, hashlib.sha512)
    headers = {
        **generic(order),
        "X-Timestamp": stamp,
        "X-Request-Id": "req-café",
        "X-Signature": "sha512=" + base64.b64encode(digest.digest()).decode(),
    }
    status, _, body = await service.request("POST", "/hooks/generic?kind=k", order, headers)
    assert (status, body["id"]) == (202, "req-café"), body
    ce = await _delivered(receiver, body["source"], "req-café")
    assert ce["requestid"] == "req-café"
    sw = orjson.dumps({"type": "invoice.paid"})
    status, _, body = await service.request(
        "POST", "/hooks/standard", sw, standard(sw, msg_id="msg_ünï")
    )
    assert (status, body["id"]) == (202, "msg_ünï"), body
    # bytes that are not UTF-8 still verify, and stay as they came in the attribute
    latin = "req-\xe9"
    digest = hmac.new(HMAC_SECRET.encode(), b"1:" + order, hashlib.sha512)
    raw_headers = [
        (b"Content-Type", b"application/json"),
        (b"X-Timestamp", b"1"),
        (b"X-Request-Id", latin.encode("latin-1")),
        (b"X-Signature", b"sha512=" + base64.b64encode(digest.digest())),
    ]
    status, answer = await _raw_post(service, "/hooks/generic?kind=k", raw_headers, order)
    assert (status, orjson.loads(answer)["id"]) == (202, latin), answer


async def _raw_post(
    service: RunningService, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    """POST with header bytes as given (clients encode header text as they see fit)."""
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = [f"POST {path} HTTP/1.1".encode(), f"Host: {host}:{port}".encode()]
        head += [name + b": " + value for name, value in headers]
        head += [f"Content-Length: {len(body)}".encode(), b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_headers_proxies_and_tracing_add_may_come_twice(
    service: RunningService, receiver: Receiver
) -> None:
    # A chain of proxies each adding its own X-Forwarded-Proto or traceparent: a verified
    # delivery was refused 400 for it (and GitHub does not send it again).
    push = orjson.dumps({"ref": "refs/heads/main"})
    signed = [(k.encode(), v.encode()) for k, v in github(push, delivery="d-twice").items()]
    added = [
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Proto", b"http"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"Traceparent", b"00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"),
    ]
    status, _ = await _raw_post(service, "/hooks/github", signed + added, push)
    assert status == 202
    await _delivered(receiver, "urn:eventbus:source:github", "d-twice")
    # a template reading one sees every line, as one list
    order = orjson.dumps({"order": {"id": 5}})
    lines = [(k.encode(), v.encode()) for k, v in generic(order).items() if k != "X-Request-Id"]
    lines += [(b"X-Request-Id", b"req-a"), (b"X-Request-Id", b"req-b")]
    status, body = await _raw_post(service, "/hooks/generic?kind=k", lines, order)
    assert (status, orjson.loads(body)["id"]) == (202, "req-a, req-b")
    # the signature itself may not come twice
    status, body = await _raw_post(service, "/hooks/github", signed + signed[-1:], push)
    assert status == 400 and b"appears more than once" in body


async def test_slacks_form_posts_get_their_type(
    service: RunningService, receiver: Receiver
) -> None:
    # Slash commands and interactivity post forms with no top-level type: the documented
    # trigger refused them (400 "no value for the event type 'com.slack.{body:$.type}'").
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    command = b"command=%2Fdeploy&text=prod&trigger_id=t-1"
    status, _, body = await service.request(
        "POST", "/hooks/slack", command, {**slack(command), **form}
    )
    assert status == 200, body
    action = {"type": "block_actions", "trigger_id": "t-2", "actions": [{"value": "ok"}]}
    interaction = b"payload=" + quote(orjson.dumps(action)).encode()
    status, _, body = await service.request(
        "POST", "/hooks/slack", interaction, {**slack(interaction), **form}
    )
    assert status == 200, body

    async def both() -> list[dict[str, Any]] | None:
        found = [r.cloudevent for r in receiver.requests if r.cloudevent is not None]
        slack_events = [ce for ce in found if ce["source"] == "urn:eventbus:source:slack"]
        return slack_events if len(slack_events) == 2 else None

    events = sorted(
        await eventually(both, within=15, what="two Slack events"), key=lambda e: e["type"]
    )
    assert [e["type"] for e in events] == ["com.slack.block_actions", "com.slack.slash_command"]
    assert events[0]["data"]["payload"] == action  # the interaction's JSON, read as JSON
    assert events[1]["data"] == {"command": "/deploy", "text": "prod", "trigger_id": "t-1"}


async def test_slacks_certificate_check_is_answered_and_nothing_else_unsigned(
    service: RunningService, receiver: Receiver
) -> None:
    # Slack checks a slash command URL's certificate now and then with an unsigned form of
    # ssl_check=1 and wants a 200: it got 401, and Slack reported the command failing.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    check = b"ssl_check=1&token=legacy-token"
    assert await service.request("POST", "/hooks/slack", check, form) == (200, ANY, None)
    status, _, _ = await service.request("POST", "/hooks/slack", b"command=%2Fdeploy", form)
    assert status == 401  # an unsigned slash command is still refused
    status, _, _ = await service.request("POST", "/hooks/github", check, form)
    assert status == 401  # and the check is Slack's only
    # signed (Slack's own SDKs verify it first), verified first
    signed = b"ssl_check=1&token=legacy-token"
    answer = await service.request("POST", "/hooks/slack", signed, {**slack(signed), **form})
    assert answer == (200, ANY, None)
    forged = {**slack(b"ssl_check=1&token=other"), **form}
    assert (await service.request("POST", "/hooks/slack", signed, forged))[0] == 401
    await service.drained()
    assert [r for r in receiver.requests if r.path == "/fn"] == []


async def test_a_redelivered_webhook_is_one_event(
    service: RunningService, receiver: Receiver
) -> None:
    push = orjson.dumps({"ref": "refs/heads/main"})
    for attempt in range(3):
        status, headers, body = await service.request(
            "POST", "/hooks/github", push, github(push, delivery="same-delivery")
        )
        # answered 202 each time, a retry marked as the duplicate it is
        assert (status, body["id"], body["duplicate"]) == (202, "same-delivery", attempt > 0)
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower.get("eventbus-duplicate") == ("true" if attempt else None)
    other = await service.request("POST", "/hooks/github", push, github(push, delivery="next"))
    assert other[0] == 202
    await _delivered(receiver, "urn:eventbus:source:github", "next")
    await service.drained()
    ids = [r.cloudevent["id"] for r in receiver.requests if r.cloudevent is not None]
    assert sorted(ids) == ["next", "same-delivery"]


async def test_bodies_become_data_by_their_content_type(
    service: RunningService, receiver: Receiver
) -> None:
    async def post(body: bytes, content_type: str | None, method: str = "POST") -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        status, _, answer = await service.request(method, "/hooks/plain", body, headers)
        assert status == 202, answer
        return await _delivered(receiver, answer["source"], answer["id"])

    form = await post(b"a=1&b=2&b=3&empty=", "application/x-www-form-urlencoded")
    assert form["data"] == {"a": "1", "b": ["2", "3"], "empty": ""}
    assert form["type"] == "com.eventbus.webhook"
    # as browsers send forms: a trailing "&", a field without "=" (each was refused, 400)
    loose = await post(b"a=1&flag&", "application/x-www-form-urlencoded")
    assert loose["data"] == {"a": "1", "flag": ""}
    # A body calling itself a structured CloudEvent is the trigger's data, JSON: delivered
    # in binary mode under "application/cloudevents+json", a receiver read it as the event.
    for media in ("application/cloudevents+json", "application/cloudevents-batch+json"):
        wrapped = await post(b'{"a": 1}', media)
        assert (wrapped["data"], wrapped["datacontenttype"]) == ({"a": 1}, "application/json")
    text = await post("héllo".encode(), "text/plain; charset=utf-8", method="PUT")
    assert (text["data"], text["datacontenttype"]) == ("héllo", "text/plain; charset=utf-8")
    # in its declared charset (it was read as UTF-8, then written back as UTF-16 twice over)
    wide = await post("héllo".encode("utf-16"), "text/plain; charset=utf-16")
    assert (wide["data"], wide["datacontenttype"]) == ("héllo", "text/plain; charset=utf-16")
    status, _, answer = await service.request(
        "POST", "/hooks/plain", b"a..b", {"Content-Type": "text/plain; charset=idna"}
    )
    assert status == 400 and "unsupported charset" in answer["detail"], answer
    # bytes the type's charset does not read are kept as they came, and reach the function
    # as sent (a CSV in Latin-1 without a charset, XML whose prolog names its encoding)
    for body, media in (
        ("café;1".encode("latin-1"), "text/csv"),
        ('<?xml version="1.0" encoding="ISO-8859-1"?><a>é</a>'.encode("latin-1"), "text/xml"),
    ):
        kept = await post(body, media)
        assert (base64.b64decode(kept["data_base64"]), kept["datacontenttype"]) == (body, media)
    raw = bytes(range(256))
    binary = await post(raw, "application/octet-stream")
    assert base64.b64decode(binary["data_base64"]) == raw
    problem = await post(b'{"kind": "x"}', "application/problem+json")
    assert problem["data"] == {"kind": "x"}
    # any */json is JSON, as the event's datacontenttype is read (text/json became bytes under
    # a JSON type, then refused)
    legacy = await post(b'{"kind": "y"}', "text/json")
    assert (legacy["data"], legacy["datacontenttype"]) == ({"kind": "y"}, "text/json")
    # JSON in its declared charset, written out as UTF-8 without it (a UTF-8 body labelled
    # UTF-16 went out as UTF-8 bytes under that label; a UTF-16 body was refused)
    utf16 = await post('{"k": "é"}'.encode("utf-16"), "application/json; charset=utf-16")
    assert (utf16["data"], utf16["datacontenttype"]) == ({"k": "é"}, "application/json")
    status, _, answer = await service.request(
        "POST",
        "/hooks/plain",
        b'{"k": "\xe9" }',
        {"Content-Type": "application/json; charset=utf-16"},
    )
    assert status == 400 and "neither UTF-8 nor utf-16 text" in answer["detail"], answer
    empty = await post(b"", None)
    assert "data" not in empty and "data_base64" not in empty

    status, headers, answer = await service.request("POST", "/hooks/static", b"{}")
    assert (status, answer) == (200, "ok")
    assert headers["Content-Type"].startswith("text/plain")

    # a 204 has neither body nor length (RFC 9110), and the connection goes on with the next
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"Host: {host}:{port}\r\n"
        writer.write(
            f"POST /hooks/nocontent HTTP/1.1\r\n{head}Content-Length: 2\r\n\r\n{{}}".encode()
        )
        writer.write(f"GET /healthz HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
        first, second = (await reader.read()).split(b"HTTP/1.1 ")[1:]
    finally:
        writer.close()
    assert first.startswith(b"204 ") and b"content-length" not in first.lower(), first
    assert first.endswith(b"\r\n\r\n") and second.startswith(b"200 "), (first, second)


async def _refusal_rows(service: RunningService, path: str) -> list[str]:
    await service.service.store.audit.flush()
    rows = await service.service.store.pool.fetch(
        "SELECT reason FROM refusals WHERE path = $1", path
    )
    return [r["reason"] for r in rows]


async def _rejected(service: RunningService) -> dict[tuple[str, str], float]:
    """``eventbus_events_rejected_total`` now, by via and reason (the process's metrics: read
    the change a test makes)."""
    _, _, text = await service.request("GET", "/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith("eventbus_events_rejected_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="')[1].split('"')[0]
            via = labels.split('via="')[1].split('"')[0]
            found[via, reason] = float(value)
    return found


async def test_wrong_signatures_are_refused_and_recorded(
    service: RunningService, receiver: Receiver
) -> None:
    body = orjson.dumps({"id": "evt_2", "type": "charge.failed"})
    stale = int(time.time()) - 600
    changed = body.replace(b"failed", b"succeeded")
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("github", body, github(body, secret="wrong-secret-0000"), "does not match"),
        ("github", changed, github(body), "does not match"),
        ("github", body, {"X-GitHub-Event": "push"}, "X-Hub-Signature-256 is missing"),
        ("gitlab", body, {"X-Gitlab-Token": "not-the-token"}, "not the trigger's token"),
        ("gitlab", body, {}, "X-Gitlab-Token is missing"),
        ("stripe", body, stripe(body, stamp=stale), "outside the 300s tolerance"),
        ("stripe", changed, stripe(body), "no v1 signature"),
        ("stripe", body, {"Stripe-Signature": "v1=abc"}, "needs one t="),
        ("stripe", body, {"Stripe-Signature": "t=soon,v1=abc"}, "not Unix seconds"),
        # a float overflow answered 500 before any signature was looked at
        ("stripe", body, {"Stripe-Signature": f"t={'9' * 400},v1=00"}, "not Unix seconds"),
        ("stripe", body, {"Stripe-Signature": "t=+1_700_000_000,v1=00"}, "not Unix seconds"),
        ("slack", body, slack(body, stamp=stale), "outside the 300s tolerance"),
        (
            "slack",
            body,
            {**slack(body), "X-Slack-Request-Timestamp": "9" * 400},
            "not Unix seconds",
        ),
        ("slack", changed, slack(body), "does not match"),
        ("standard", changed, standard(body), "no v1 signature"),
        ("standard", body, standard(body, at=datetime.fromtimestamp(stale, UTC)), "tolerance"),
        ("standard", body, {"webhook-id": "m"}, "webhook-timestamp is missing"),
        ("generic", changed, generic(body), "does not match"),
        ("generic", body, {**generic(body), "X-Timestamp": "1700000001"}, "does not match"),
    ]
    before = await _rejected(service)
    for hook, payload, headers, detail in cases:
        path = f"/hooks/{hook}?kind=k"
        status, resp_headers, answer = await service.request("POST", path, payload, headers)
        assert status == 401, (hook, detail, answer)
        assert resp_headers["Content-Type"] == "application/problem+json"
        assert detail in answer["detail"], (hook, answer)
    reasons = await _refusal_rows(service, "/hooks/stripe")
    assert any("tolerance" in r for r in reasons) and len(reasons) == 6
    # counted where a trigger's key and address refusals are (they went to via="http")
    after = await _rejected(service)
    assert after.get(("hook", "unauthorized"), 0) - before.get(("hook", "unauthorized"), 0) == len(
        cases
    )
    assert after.get(("http", "401")) == before.get(("http", "401")), (before, after)
    await service.drained()
    assert receiver.requests == []
    status, _, _ = await service.request("GET", "/readyz")
    assert status == 200


# --- the trigger's definition, checked at load with file and line -----------------------------

BAD_HOOKS = [
    ("verify", "{kind: github}", "verify.github.secret: Field required"),
    ("verify", "{kind: carrier-pigeon, secret: s}", "verify: Input tag 'carrier-pigeon'"),
    ("verify", "{kind: github, secret: {env: EB_TEST_UNSET_SECRET}}", "is not set"),
    ("verify", "{kind: github, secret: {vault: x}}", "write a string, {env: NAME}"),
    ("verify", "{kind: github, secret: ''}", "must not be empty"),
    ("verify", "{kind: standard-webhooks, secret: 'whsec_not base64!'}", "base64 key"),
    # an empty key: anyone could sign
    ("verify", "{kind: standard-webhooks, secret: 'whsec_'}", "base64 key"),
    # a short secret or key is guessed: offline from one signed request, online by trying
    ("verify", "{kind: github, secret: fifteen-chars-}", "at least 16 characters"),
    ("verify", "{kind: gitlab, secret: fifteen-chars-}", "at least 16 characters"),
    ("verify", "{kind: standard-webhooks, secret: 'whsec_MTIzNDU2Nzg5MDEyMzQ1'}", "16 bytes"),
    ("keys", "[fifteen-chars-]", "a trigger key must have at least 16 characters"),
    ("verify", "{kind: hmac, secret: sixteen-chars-ok, header: X-S, algorithm: md5}", "algorithm"),
    ("verify", "{kind: hmac, secret: sixteen-chars-ok, header: X-S, signed: '{x}'}", "references"),
    # checked before the body is read: it loaded, and every request was refused (401)
    (
        "verify",
        "{kind: hmac, secret: sixteen-chars-ok, header: X-S, signed: '{body:$.ts}.{body}'}",
        "covers the raw body as {body}, not values in it",
    ),
    ("event_type", "'com.{header:X}.{broken'", "write references as"),
    ("event_id", "'{body:id}'", "a JSONPath starting at '$'"),
    ("subject", "'{body:$[[[}'", "invalid JSONPath"),
    ("extensions", "{Tenant: '{query:t}'}", "1-20 of a-z 0-9"),
    ("extensions", "{subject: '{query:t}'}", "not a CloudEvents attribute"),
    ("methods", "[post]", "not an upper-case HTTP method"),
    ("allow", "[10.0.0.0/33]", "not a CIDR block or address"),
    ("deny", "['10.1.2.3/8']", "has host bits set"),
    ("trusted_proxies", "['::1/129']", "not a CIDR block"),
    ("max_body", "0", "greater than or equal to 1"),
    ("response", "{status: 302}", "less than or equal to 299"),
    # written after the 204 with its length, a body rendered from the request was read by a
    # keep-alive client (a proxy's pooled connection) as the answer to its next request
    ("response", "{status: 204, body: '{body:$.x}'}", "a 204 answer has no body"),
]


@pytest.mark.parametrize(("field", "value", "problem"), BAD_HOOKS)
def test_a_bad_trigger_is_reported_with_file_and_line(
    tmp_path: Path, field: str, value: str, problem: str
) -> None:
    text = f"sources:\n  - name: hook\n    type: webhook\n    {field}: {value}\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={})
    (line,) = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert line.startswith(f"c.yaml:4: sources.0.{field}"), line
    assert problem in line and line.endswith("(source 'hook')"), line


def test_secrets_come_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_text("from-a-file-0123456789\n")
    monkeypatch.setenv("EB_TEST_HOOK_SECRET", "from-the-env-0123456789")
    conn = tmp_path / "connectors"
    conn.mkdir()
    (conn / "c.yaml").write_text(
        "sources:\n"
        "  - {name: a, type: webhook, verify: {kind: gitlab, secret: {env: EB_TEST_HOOK_SECRET}}}\n"
        f"  - {{name: b, type: webhook, keys: [{{file: {tmp_path / 'secret'}}}]}}\n"
    )
    specs = load_connectors(conn).sources
    a, b = specs["a"], specs["b"]
    assert isinstance(a, WebhookSourceSpec) and isinstance(b, WebhookSourceSpec)
    assert a.verify is not None and a.verify.secret.reveal() == "from-the-env-0123456789"
    assert [k.reveal() for k in b.keys] == ["from-a-file-0123456789"]
    assert "from-the-env-0123456789" not in repr(a)  # secrets stay out of logs and errors


def _event(spec: dict[str, Any], request: HookRequest, now: float | None = None) -> Any:
    source = build_source({"name": "hook", "type": "webhook", **spec})
    assert isinstance(source, WebhookSource)
    return source.event_for(request, now=now)


def test_a_secret_being_rotated_verifies_with_either_the_new_or_the_previous_one() -> None:
    # a provider moves to a new secret while requests signed with the old one are in flight:
    # with one secret, every one of them was refused (401) and lost to the sender's retries
    body = b'{"id": "evt_9", "type": "x"}'
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    spec = {"verify": {"kind": "github", "secret": new, "previous_secret": old}}
    for secret in (new, old):
        headers = {k.lower(): v for k, v in github(body, secret=secret).items()}
        assert _event(spec, HookRequest("POST", headers, "", body))["type"]
    headers = {k.lower(): v for k, v in github(body, secret="other-secret-0123456789").items()}
    with pytest.raises(CloudEventError, match="X-Hub-Signature-256 does not match") as info:
        _event(spec, HookRequest("POST", headers, "", body))
    assert info.value.status == 401
    # a token is checked before the body is read: either token passes that check too
    gitlab = {"verify": {"kind": "gitlab", "secret": new, "previous_secret": old}}
    source = build_source({"name": "gl", "type": "webhook", **gitlab})
    assert isinstance(source, WebhookSource)
    source.precheck(HookRequest("POST", {"x-gitlab-token": old}, "", b""))
    with pytest.raises(CloudEventError):
        source.precheck(HookRequest("POST", {"x-gitlab-token": "nope-0123456789abc"}, "", b""))
    # the previous one is held to the same rules as the secret
    with pytest.raises(ConfigError, match="previous_secret"):
        build_source(
            {"name": "h", "type": "webhook", "verify": {**spec["verify"], "previous_secret": "x"}}
        )


def test_templates_find_values_in_headers_query_and_body() -> None:
    body = orjson.dumps({"a": {"n": 3, "ok": True, "obj": {}}, "list": [None]})
    request = HookRequest("POST", {"x-kind": "k", "content-type": "application/json"}, "q=1", body)
    spec = {
        "event_type": "t.{header:X-Kind}.{query:q}.{body:$.a.n}",
        "subject": "{body:$.a.ok}",
        "extensions": {"obj": "{body:$.a.obj}", "nul": "{body:$.list[0]}", "q": "{query:q}"},
    }
    event = _event(spec, request)
    assert (event["type"], event["subject"], event["q"]) == ("t.k.1.3", "true", "1")
    assert "obj" not in event and "nul" not in event  # objects and null are no value
    assert len(event["id"]) == 36 and event["source"] == "urn:eventbus:source:hook"
    assert _event({"event_id": "{header:X-None}"}, request)["id"] != event["id"]
    # a form post is an object to body references too
    form = HookRequest(
        "POST", {"content-type": "application/x-www-form-urlencoded"}, "", b"action=opened&n=2"
    )
    assert _event({"event_type": "t.{body:$.action}.{body:$.n}"}, form)["type"] == "t.opened.2"


def test_the_event_size_limit_is_the_callers() -> None:
    source = build_source({"name": "hook", "type": "webhook"})
    assert isinstance(source, WebhookSource)
    request = HookRequest("POST", {"content-type": "text/plain"}, "", b"x" * 300_000)
    with pytest.raises(CloudEventError) as info:
        source.event_for(request)  # the default limit, 256 KiB
    assert info.value.status == 413
    assert source.event_for(request, max_size=400_000)["data"] == "x" * 300_000


def test_a_signature_is_checked_against_the_time_of_the_request() -> None:
    body = b'{"id": "evt_3", "type": "x"}'
    headers = {k.lower(): v for k, v in stripe(body, stamp=1_000_000).items()}
    request = HookRequest("POST", headers, "", body)
    spec = {"verify": {"kind": "stripe", "secret": STRIPE_SECRET, "tolerance": "1m"}}
    assert _event(spec, request, now=1_000_059)["id"] == "evt_3"
    with pytest.raises(CloudEventError, match="outside the 60s tolerance") as info:
        _event(spec, request, now=1_000_061)
    assert info.value.status == 401
    # a generic HMAC that signs a timestamp checks it when told which header holds it (it
    # verified for ever: a captured request could be sent again at any time)
    hmac_spec = cast(dict[str, Any], SOURCES[5]["verify"]) | {"timestamp": "X-Timestamp"}
    headers = {k.lower(): v for k, v in generic(body, stamp="1000000").items()}
    request = HookRequest("POST", headers, "", body)
    assert _event({"verify": hmac_spec}, request, now=1_000_299)["type"]
    with pytest.raises(CloudEventError, match="outside the 300s tolerance"):
        _event({"verify": hmac_spec}, request, now=1_000_301)
    with pytest.raises(CloudEventError, match="header X-Timestamp is missing"):
        unstamped = {k: v for k, v in headers.items() if k != "x-timestamp"}
        _event({"verify": hmac_spec}, HookRequest("POST", unstamped, "", body), now=1_000_000)
    # and only a signed one: an unsigned timestamp is whatever a replay says
    with pytest.raises(ConfigError, match=r"must be signed: name \{header:X-Date\} in signed"):
        build_source(
            {"name": "h", "type": "webhook", "verify": hmac_spec | {"timestamp": "X-Date"}}
        )
    # named as the template reads it, spaces and case aside (refused as unsigned before)
    spaced = hmac_spec | {"signed": "{header: x-timestamp }:{body}"}
    assert _event({"verify": spaced}, request, now=1_000_299)["type"]


@pytest.mark.parametrize("path", ["$.order[?(@ > 1)]", "$.order[?@ > 1]", "$.order[? (@ > 1)]"])
def test_a_filter_in_a_template_leaves_the_body_as_it_came(path: str) -> None:
    # jsonpath-ng's filter (its parentheses optional) applied to an object replaced it, in the
    # body it searched, by the list of its values: the event's data went out changed.
    source = build_source(
        {"name": "f", "type": "webhook", "event_type": "com.x.{body:" + path + "}"}
    )
    assert isinstance(source, WebhookSource)
    body = b'{"order": {"a": 2, "b": 0}}'
    request = HookRequest("POST", {"content-type": "application/json"}, "", body)
    event = source.event_for(request)
    assert (event["type"], event["data"]) == ("com.x.2", {"order": {"a": 2, "b": 0}})


def test_the_examples_of_the_docs_load_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "sources.md"
    text = docs.read_text(encoding="utf-8")
    section = text[text.index("## `type: webhook`") : text.index("## Queue sources")]
    triggers, hmac_verify = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    names = ("GITHUB_WEBHOOK_SECRET", "GITLAB_WEBHOOK_TOKEN", "SLACK_SIGNING_SECRET")
    for name in (*names, "ORDERS_HOOK_KEY"):
        monkeypatch.setenv(name, f"{name.lower()}-0123456789")
    monkeypatch.setenv("PARTNER_SECRET", "partner-0123456789")
    (tmp_path / "whsec").write_text("whsec_from_a_file\n")
    (tmp_path / "a.yaml").write_text(
        triggers.replace("/run/secrets/stripe-whsec", str(tmp_path / "whsec"))
    )
    indented = "".join(f"    {line}\n" for line in hmac_verify.splitlines())
    (tmp_path / "b.yaml").write_text(f"sources:\n  - name: partner\n    type: webhook\n{indented}")
    sources = load_connectors(tmp_path).sources
    assert sorted(sources) == ["github", "gitlab", "legacy-orders", "partner", "slack", "stripe"]
    stripe_spec = sources["stripe"]
    assert isinstance(stripe_spec, WebhookSourceSpec) and stripe_spec.verify is not None
    assert stripe_spec.verify.secret.reveal() == "whsec_from_a_file"


@pytest.mark.timeout(120)
async def test_a_webhook_on_the_kafka_bus(
    eventbus: StartService, receiver: Receiver, kafka_bootstrap: str
) -> None:
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        sources=[SOURCES[0], SOURCES[2], _PARTNER],
        kafka_bootstrap=kafka_bootstrap,
    )
    push = orjson.dumps({"ref": "refs/heads/main"})
    status, _, body = await svc.request("POST", "/hooks/github", push, github(push, "k-1"))
    assert (status, body["duplicate"]) == (202, False), body
    ce = await _delivered(receiver, "urn:eventbus:source:github", "k-1")
    assert (ce["type"], ce["data"]) == ("com.github.push", {"ref": "refs/heads/main"})
    # A signed request sent again within its tolerance (a captured one, replayed) is answered
    # as the duplicate it is: this bus keeps no duplicate window, so each copy was an event.
    charge = orjson.dumps({"id": "evt_replayed", "type": "charge.succeeded"})
    signed = stripe(charge)
    # copies sent at once (each was published), then the same signature spelled otherwise
    # (each spelling was another key)
    t, v1, _ = signed["Stripe-Signature"].split(",")
    respelled = [f"{v1},{t}", f"{t}, {v1}", f"{t},{v1},v1=00"]
    answers = await asyncio.gather(
        *(svc.request("POST", "/hooks/stripe", charge, signed) for _ in range(3))
    )
    for spelling in respelled:
        headers = {**signed, "Stripe-Signature": spelling}
        answers.append(await svc.request("POST", "/hooks/stripe", charge, headers))
    assert [a[0] for a in answers] == [202] * 6
    assert sorted(a[2]["duplicate"] for a in answers) == [False] + [True] * 5
    await _delivered(receiver, "urn:eventbus:source:stripe", "evt_replayed")
    # a replay of a trigger whose events take a random id: answered with the id of the event
    # on the bus (it was a new random id each time, of an event that never was)
    order = b'{"order": {"id": 8}}'
    partner = generic(order, stamp=str(int(time.time())))
    answers = [await svc.request("POST", "/hooks/partner", order, partner) for _ in range(3)]
    assert [(a[0], a[2]["duplicate"]) for a in answers] == [(202, False), (202, True), (202, True)]
    assert len({a[2]["id"] for a in answers}) == 1, answers
    await _delivered(receiver, "urn:eventbus:source:partner", answers[0][2]["id"])
    await svc.drained()
    ids = [r.cloudevent["id"] for r in receiver.requests if r.cloudevent is not None]
    assert ids.count("evt_replayed") == 1, ids
    assert ids.count(answers[0][2]["id"]) == 1, ids


@pytest.mark.parametrize("first_ends", ["refused by the bus", "its request gone"])
async def test_a_copy_sent_while_the_first_is_on_its_way_waits_for_it(
    database_dsn: str, first_ends: str
) -> None:
    # A sender's retry of a signed request (same bytes, same signature) was answered 202
    # "duplicate" at once while the first copy's publish was still waiting for the bus; that
    # publish then failed (503), and the event was on the bus under neither copy. And a replay
    # was answered with the id of an event made for it, which never was on the bus.
    refused = first_ends == "refused by the bus"
    source = build_source(_PARTNER)
    assert isinstance(source, WebhookSource)
    gate = asyncio.Event()
    published: list[dict[str, Any]] = []

    async def publish(event: dict[str, Any]) -> None:
        if not published and not gate.is_set():
            await gate.wait()
            if refused:
                raise BusUnavailable("no acknowledgement in time (test)")
        published.append(event)

    body = b'{"order": {"id": 7}}'
    headers = {k.lower(): v for k, v in generic(body, stamp=str(int(time.time()))).items()}
    request = HookRequest("POST", headers, "", body)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "partner", Recorder())
        ctx.publish = publish
        async with running(source, ctx):
            await asyncio.sleep(0)  # the source's task takes its context
            signature = source.signature_of(request)
            assert signature is not None
            first = asyncio.create_task(source.publish(source.event_for(request), signature))
            await asyncio.sleep(0.01)  # the first waits for the bus
            retry = source.event_for(request)
            copy = asyncio.create_task(source.publish(retry, signature))
            await asyncio.sleep(0.05)
            assert not copy.done()  # not answered before the first copy's publish ends
            if not refused:
                # (its client hung up): the event is on the bus under neither copy unless the
                # waiting one publishes it
                first.cancel()
                gate.set()
                async with asyncio.timeout(5):
                    assert await copy == (False, retry["id"])  # published itself
                assert published == [retry]
                return
            gate.set()
            with pytest.raises(BusUnavailable):
                await first
            # answered as the first was, at once: each copy waited for the one before it, then
            # for a publish of its own (5, 10, 15 s ... on a bus that did not answer)
            with pytest.raises(BusUnavailable):
                await copy
            assert published == []
            # the sender's next retry gets through, and one after it is its duplicate
            retry = source.event_for(request)
            assert await source.publish(retry, signature) == (False, retry["id"])
            assert await source.publish(source.event_for(request), signature) == (
                True,
                retry["id"],
            )
            assert published == [retry]


@contextlib.asynccontextmanager
async def _two_workers(
    pool: Any, publish: Callable[[dict[str, Any]], Awaitable[None]]
) -> AsyncIterator[tuple[WebhookSource, WebhookSource]]:
    """Two processes' triggers of ``_PARTNER`` (serve --workers 2, say) on one database,
    running, each publishing through ``publish``."""
    workers = cast(list[WebhookSource], [build_source(_PARTNER) for _ in range(2)])
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            ctx = make_context(pool, "partner", Recorder())
            ctx.publish = publish
            await stack.enter_async_context(running(worker, ctx))
        await asyncio.sleep(0)  # the sources' tasks take their contexts
        yield workers[0], workers[1]


def _signed(order: str) -> HookRequest:
    """A ``_PARTNER`` request signed now, for the order ``order``."""
    body = orjson.dumps({"order": {"id": order}})
    headers = {k.lower(): v for k, v in generic(body, stamp=str(int(time.time()))).items()}
    return HookRequest("POST", headers, "", body)


async def _send(worker: WebhookSource, request: HookRequest) -> tuple[bool, str]:
    return await worker.publish(worker.event_for(request), worker.signature_of(request))


async def test_a_copy_sent_to_another_process_is_a_duplicate_for_the_whole_tolerance(
    database_dsn: str,
) -> None:
    # Each worker of serve --workers N (and an instance after a restart) remembered only the
    # signatures it had published: a captured request sent again to another one, past the
    # bus's duplicate window (2 minutes) and within the tolerance (5), was published again.
    published: list[dict[str, Any]] = []
    gate = asyncio.Event()
    gate.set()

    async def publish(event: dict[str, Any]) -> None:
        if not gate.is_set():
            await gate.wait()
            raise BusUnavailable("no acknowledgement in time (test)")
        published.append(event)

    async with source_pool(database_dsn) as pool, _two_workers(pool, publish) as (first, other):
        request = _signed("shared")
        signature = first.signature_of(request)
        assert signature is not None
        event = first.event_for(request)
        assert await first.publish(event, signature) == (False, event["id"])
        assert await other.publish(other.event_for(request), signature) == (True, event["id"])
        # A copy reaching the other process while the first is still being published goes to
        # the bus itself (which drops it as a duplicate when the first gets there): it was
        # answered "duplicate" at once, and lost when the first publish then failed.
        request = _signed("in flight")
        signature = first.signature_of(request)
        assert signature is not None
        gate.clear()
        failing = asyncio.create_task(first.publish(first.event_for(request), signature))
        await asyncio.sleep(0.05)  # the first waits for the bus
        gate.set()
        copy = other.event_for(request)
        assert await other.publish(copy, signature) == (False, copy["id"])
        with pytest.raises(BusUnavailable):
            await failing
    assert published == [event, copy]


async def test_a_hanging_database_holds_one_signed_request_a_second_not_each_ten(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The look into the shared signatures and the write after the publish each waited the
    # store's read timeout when PostgreSQL hung (rather than refusing connections): 10 s for
    # every signed request, where Slack wants its answer within 3.
    monkeypatch.setattr(webhook_module, "_SHARED_PAUSE", 1.5)
    published: list[dict[str, Any]] = []

    async def publish(event: dict[str, Any]) -> None:
        published.append(event)

    async with source_pool(database_dsn) as pool, _two_workers(pool, publish) as (first, other):
        async with table_locked(database_dsn, "webhook_signatures"):
            # the first wait the look's deadline (1 s), the rest nothing: 10 s each before
            async with asyncio.timeout(4):
                answers = await asyncio.gather(
                    *(_send(first, _signed(f"hung {n}")) for n in range(20))
                )
            assert all(duplicate is False for duplicate, _ in answers)
        assert len(published) == 20  # each published, none refused
        # still paused: what the first publishes now is not shared, so a copy sent to the
        # other is published again (the bus's window tells it)
        request = _signed("while paused")
        assert (await _send(first, request))[0] is False
        assert (await _send(other, request))[0] is False
        await asyncio.sleep(1.6)  # the pause over, signatures are shared again
        request = _signed("after")
        _, event_id = await _send(first, request)
        assert await _send(other, request) == (True, event_id)
    assert len(published) == 23


async def test_a_burst_of_signed_requests_is_shared_whole(database_dsn: str) -> None:
    # Past 4 looks and writes at once a request went on without: of 20 sent at once, 15
    # copies sent to another process were published again, the database healthy.
    published: list[dict[str, Any]] = []

    async def publish(event: dict[str, Any]) -> None:
        published.append(event)

    async with source_pool(database_dsn) as pool, _two_workers(pool, publish) as (first, other):
        requests = [_signed(f"burst {n}") for n in range(20)]
        await asyncio.gather(*(_send(first, request) for request in requests))
        copies = await asyncio.gather(*(_send(other, request) for request in requests))
    assert [duplicate for duplicate, _ in copies] == [True] * 20
    assert len(published) == 20


async def test_expired_signatures_are_deleted_by_a_running_trigger(database_dsn: str) -> None:
    source = build_source(_PARTNER)
    async with source_pool(database_dsn) as pool:
        await pool.execute(
            "INSERT INTO webhook_signatures (source, digest, event_id, expires_at) VALUES"
            " ('partner', 'old', 'e-1', now() - interval '1 s'),"
            " ('partner', 'new', 'e-2', now() + interval '1 h')"
        )
        async with running(source, make_context(pool, "partner", Recorder())):
            await eventually(lambda: _only_live_left(pool), what="the expired one deleted")


async def _only_live_left(pool: Any) -> bool:
    return await pool.fetchval("SELECT array_agg(event_id) FROM webhook_signatures") == ["e-2"]


async def test_a_copy_waiting_on_a_publish_whose_entry_went_is_still_answered(
    database_dsn: str,
) -> None:
    # The replay memory let go of the first copy's entry while it was still being published
    # (past twice the tolerance, or the oldest past its bound); when that publish failed,
    # nothing resolved what the copy waited on, and its request hung for ever.
    verify = {**cast(dict[str, Any], _PARTNER["verify"]), "tolerance": 0.1}
    source = build_source({**_PARTNER, "verify": verify})
    assert isinstance(source, WebhookSource)
    gate = asyncio.Event()
    published: list[dict[str, Any]] = []

    async def publish(event: dict[str, Any]) -> None:
        if event["data"] == {"n": 1} and not gate.is_set():
            await gate.wait()
            raise BusUnavailable("no acknowledgement in time (test)")
        published.append(event)

    stamp = int(time.time())

    def request(n: int) -> HookRequest:
        body = orjson.dumps({"n": n})
        headers = {k.lower(): v for k, v in generic(body, str(stamp)).items()}
        return HookRequest("POST", headers, "", body)

    def event_of(request: HookRequest) -> dict[str, Any]:
        return cast(dict[str, Any], source.event_for(request, now=stamp))  # within tolerance

    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "partner", Recorder())
        ctx.publish = publish
        async with running(source, ctx):
            await asyncio.sleep(0)  # the source's task takes its context
            first_request = request(1)
            signature = source.signature_of(first_request)
            assert signature is not None
            first = asyncio.create_task(source.publish(event_of(first_request), signature))
            await asyncio.sleep(0.01)
            retry = event_of(first_request)
            copy = asyncio.create_task(source.publish(retry, signature))
            await asyncio.sleep(0.3)  # past twice the tolerance: the entry goes at the next look
            other = request(2)
            await source.publish(event_of(other), source.signature_of(other))
            gate.set()
            with pytest.raises(BusUnavailable):
                await first
            async with asyncio.timeout(5):  # answered, as the first was
                with pytest.raises(BusUnavailable):
                    await copy
    assert [e["data"] for e in published] == [{"n": 2}]


def test_githubs_form_content_type_makes_the_event_its_json_does() -> None:
    # GitHub's form content type (the default of a hook made through its API) posts the JSON
    # as the field `payload`: the event's data was {"payload": "<the JSON as text>"}, so
    # rules on data.repository and the subject template found nothing.
    spec = {
        "verify": {"kind": "github", "secret": GITHUB_SECRET},
        "subject": "{body:$.repository.full_name}",
    }
    push = {"ref": "refs/heads/main", "repository": {"full_name": "o/r"}, "n": [1, 2]}
    as_json = orjson.dumps(push)
    as_form = b"payload=" + urllib.parse.quote_plus(as_json.decode()).encode()
    events = []
    for body, media in ((as_json, "application/json"), (as_form, FORM)):
        headers = {k.lower(): v for k, v in github(body).items()} | {"content-type": media}
        events.append(_event(spec, HookRequest("POST", headers, "", body)))
    for event in events:
        assert (event["data"], event["subject"], event["type"]) == (
            push,
            "o/r",
            "com.github.push",
        )
        assert event["datacontenttype"] == "application/json"
    # a form that is not GitHub's one JSON field stays a form
    other = b"payload=not-json&x=1"
    headers = {k.lower(): v for k, v in github(other).items()} | {"content-type": FORM}
    assert _event(spec, HookRequest("POST", headers, "", other))["data"] == {
        "payload": "not-json",
        "x": "1",
    }


def test_gitlab_system_hooks_are_typed_by_their_event_name() -> None:
    # A system hook (project_create ...) carries event_name and no object_kind: refused 400
    # "no value for the event type", and GitLab disables a hook that keeps failing.
    spec = {"verify": {"kind": "gitlab", "secret": GITLAB_TOKEN}}
    headers = {"x-gitlab-token": GITLAB_TOKEN, "content-type": "application/json"}
    system = orjson.dumps({"event_name": "project_create", "name": "p"})
    assert _event(spec, HookRequest("POST", headers, "", system))["type"] == (
        "com.gitlab.project_create"
    )
    both = orjson.dumps({"event_name": "push", "object_kind": "push_system"})
    assert _event(spec, HookRequest("POST", headers, "", both))["type"] == "com.gitlab.push_system"
    with pytest.raises(CloudEventError) as info:  # neither: both named
        _event(spec, HookRequest("POST", headers, "", b"{}"))
    assert info.value.detail == (
        "the request has no value for the event type 'com.gitlab.{body:$.object_kind}' "
        "nor 'com.gitlab.{body:$.event_name}'"
    )


@pytest.mark.parametrize(
    ("kind", "content_type", "body"),
    [
        ("gitlab", "application/json", b'{"command": "x"}'),
        ("gitlab", FORM, b"command=x"),
        ("slack", "application/json", b'{"command": "/deploy"}'),
        ("slack", FORM, b"command=%2Fdeploy"),
    ],
)
def test_only_slacks_forms_are_slash_commands(kind: str, content_type: str, body: bytes) -> None:
    # Any body with a command key was typed com.slack.slash_command, a GitLab hook's and a
    # JSON body too: Slack posts its slash commands as forms.
    if kind == "slack":
        spec = {"verify": {"kind": "slack", "secret": SLACK_SECRET}}
        headers = {k.lower(): v for k, v in slack(body).items()}
    else:
        spec = {"verify": {"kind": "gitlab", "secret": GITLAB_TOKEN}}
        headers = {"x-gitlab-token": GITLAB_TOKEN}
    request = HookRequest("POST", {**headers, "content-type": content_type}, "", body)
    if kind == "slack" and content_type == FORM:
        assert _event(spec, request)["type"] == "com.slack.slash_command"
        return
    with pytest.raises(CloudEventError, match="no value for the event type"):
        _event(spec, request)
