"""The ASGI types the HTTP edge is written against (as ``starlette.types`` spells them), and
one whole answer sent through them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from eventbus.http._problem import Problem

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "read_body",
    "request_headers",
    "send_answer",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_NO_BODY = frozenset({204, 205})
"""Statuses whose answer has no body (nor a length): 304 is never sent here."""


async def send_answer(
    send: Send, status: int, media: str, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    """Send one complete answer: ``status``, ``Content-Type: media``, its length, ``headers``
    and ``body``; a 204 or 205 goes without either (RFC 9110: it has none, and bytes sent
    after it are the next answer to a keep-alive client)."""
    bodiless = status in _NO_BODY
    framing = (
        []
        if bodiless
        else [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode())]
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *framing,
                *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if bodiless else body})


# Headers a request may repeat: lists by definition, and the ones proxies and tracing add on
# the way (a chain of proxies may each add its own), which eventbus reads nowhere but where a
# webhook's template names one. Their lines are read as one value, joined by ", " (RFC 9110:
# field lines of one name are one comma-separated list; X-Forwarded-For's are joined by
# ``_addresses`` too). Any other header repeated is refused: which of its values counts is a
# choice a proxy in front may make differently (the first, where eventbus took the last),
# and it decides what the event is (``ce-*``, Content-Type) or who sends it (Authorization,
# X-API-Key, a webhook's signature).
REPEATABLE_HEADERS = frozenset(
    {
        "accept", "accept-encoding", "accept-language", "cache-control", "cookie", "forwarded",
        "pragma", "te", "via", "warning", "x-forwarded-for",
        # proxies and load balancers
        "x-forwarded-host", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-proto",
        "x-forwarded-scheme", "x-forwarded-server", "x-real-ip", "x-request-id",
        "x-correlation-id", "x-amzn-trace-id", "x-cloud-trace-context", "cdn-loop",
        # tracing (W3C Trace Context and Baggage, Zipkin B3)
        "traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid",
        "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
    }
)  # fmt: skip


def request_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """A request's headers by lower-case name; the lines of a header in
    ``REPEATABLE_HEADERS`` joined by ", "; raises ``Problem`` (400) for any other repeated."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
    if len(headers) < len(raw):
        lines: dict[str, list[str]] = {}
        for key, value in raw:
            name = key.decode("latin-1").lower()
            if name in lines and name not in REPEATABLE_HEADERS:
                raise Problem(400, f"header {name!r} appears more than once; send it once")
            lines.setdefault(name, []).append(value.decode("latin-1"))
        for name, values in lines.items():
            if len(values) > 1:
                headers[name] = ", ".join(values)
    return headers


async def read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without buffering it whole,
    and (415) a body in a content coding: none is decoded, and read as it came a gzip body
    was taken for the event's data."""
    coding = headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):
        raise Problem(
            415,
            f"Content-Encoding {coding[:40]!r} is not supported: send the body uncompressed",
            headers={"Accept-Encoding": "identity"},
        )
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise Problem(413, f"request body of {declared} bytes exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            message = await receive()
        except asyncio.CancelledError:
            # The server's shutdown cancels what outlasts router.shutdown_grace (nothing else
            # cancels a request): a body still coming then got uvicorn's bare 500 text and an
            # ERROR traceback in the log. Answered instead, the task ends with the answer.
            task = asyncio.current_task()
            if task is None:
                raise
            task.uncancel()
            raise Problem(
                503,
                "the service stopped before the request's body arrived (router.shutdown_grace "
                "passed): nothing of it was taken; send it again",
                headers={"Retry-After": "1"},
            ) from None
        if message["type"] == "http.disconnect":
            raise Problem(400, "the client went away before the body was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
