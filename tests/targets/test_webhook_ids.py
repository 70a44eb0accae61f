"""Signed deliveries of events with non-ASCII ids verify with the ``standardwebhooks`` package at a
real ASGI server (uvicorn), which hands header bytes to the application decoded as Latin-1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from standardwebhooks import Webhook

from eventbus.bus._nats_server import free_port
from eventbus.targets import HttpTarget, HttpTargetSpec, verify_webhook
from tests.fixtures.service import uvicorn_started

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

Message = MutableMapping[str, Any]


@dataclass
class AsgiReceiver:
    """Records each request as an ASGI application sees it, and answers 204."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        # What Starlette's Headers and most ASGI frameworks do with header bytes.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append((headers, body))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest_asyncio.fixture
async def asgi_receiver() -> AsyncIterator[AsgiReceiver]:
    app = AsgiReceiver()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await uvicorn_started(server, task)
    app.url = f"http://127.0.0.1:{port}/fn"
    yield app
    server.should_exit = True
    await task


def _event(event_id: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/tests/webhooks",
        "type": "com.example.signed",
        "data": {"ok": True},
    }


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("transformed", [False, True])
async def test_non_ascii_event_id_signature_verifies_at_an_asgi_server(
    asgi_receiver: AsgiReceiver, mode: str, transformed: bool
) -> None:
    event = _event("commande-é-☕ 100%")
    config = HttpTargetSpec(name="fn", url=asgi_receiver.url, mode=mode, secret=SECRET)  # type: ignore[arg-type]
    async with HttpTarget(config) as target:
        payload = {"summary": "x"} if transformed else event
        outcome = await target.deliver(event, payload, is_cloudevent=not transformed, attempt=1)
    assert outcome.delivered, outcome.error
    [(headers, body)] = asgi_receiver.requests
    webhook_id = headers["webhook-id"]
    assert webhook_id == "commande-%C3%A9-%E2%98%95%20100%25"
    if "ce-id" in headers:
        assert headers["ce-id"] == webhook_id
    Webhook(SECRET).verify(body, headers)
    verify_webhook(SECRET, headers, body)


async def test_plain_ascii_ids_are_sent_unchanged(asgi_receiver: AsgiReceiver) -> None:
    config = HttpTargetSpec(name="fn", url=asgi_receiver.url, secret=SECRET)
    async with HttpTarget(config) as target:
        assert (
            await target.deliver(_event("evt-1"), _event("evt-1"), is_cloudevent=True, attempt=1)
        ).delivered
    [(headers, body)] = asgi_receiver.requests
    assert headers["webhook-id"] == "evt-1"
    Webhook(SECRET).verify(body, headers)
