"""Slow and surplus HTTP clients: a header deadline, a body deadline and a connection cap,
around uvicorn's own HTTP protocol (h11 or httptools).

Where it sits: at the very front of the HTTP edge, between the listening socket and the ASGI
application (``_ingest`` in front of ``_api``); ``http_server`` builds one ``ConnectionGuard``
per server.

- **Header deadline** (``listen.header_timeout``): a connection that has no request inside the
  application (new, or idle after a response) is closed once it has waited that long for a
  complete request head, however slowly it trickles bytes.
- **Body deadline** (``listen.body_timeout``): an application that reads a request body gets it
  whole within that many seconds of the request head, or the request is answered 408 and the
  connection closed.
- **Send deadline** (``listen.send_timeout``): a connection whose writes are paused (its send
  buffer full: the client does not read its answers, while pipelining more requests, say) is
  dropped once it has stayed so that long. The request stuck writing held its connection,
  and a slot of the cap, for good.
- **Head size**: a request head (request line and headers) over 16 KiB is answered 431 and the
  connection closed. h11 has this limit built in (and answers 400); httptools has none, so a
  client could otherwise fill memory with one endless head until the deadline.
- **Connection cap** (``listen.max_connections``): a connection beyond the cap sheds the one
  that has waited longest without a request in the application (an idle keep-alive or a slow
  head); failing that, the request whose body has come slowest, once it has been reading its
  body for a second (a client trickling bodies filled the cap for the body deadline, health
  probes included, and again at each deadline); when every connection has a request in
  progress otherwise, the new one is answered 503.

Why a wrapper around the protocol: uvicorn 0.54 offers ``timeout_keep_alive`` (armed only after
a response, and cancelled by any byte that arrives) and ``limit_concurrency`` (answered 503 once
a request head is complete, so a head that never completes is never refused), in both of its
HTTP implementations; nothing bounds the time a client takes to send its request head. What it
does offer publicly is ``Config(http=<protocol class>)``, constructed with the same keyword
arguments as its own classes. ``ConnectionGuard.protocol`` is such a class: it owns one
instance of uvicorn's protocol per connection and forwards every ``asyncio.Protocol`` callback
to it unchanged, so nothing private of uvicorn is touched.

The application tells the guard when a request is inside it: while forwarding received bytes
the wrapper sets a context variable to its connection, and the task uvicorn creates for a
request (or a pipelined one, started from the previous request's task) copies that context.
This relies on uvicorn's default ``reset_contextvars=False`` and on uvicorn starting a
request's task while it parses the bytes; ``tests/http/test_connections.py`` pins both behaviours
for h11 and httptools, on asyncio's loop and (through ``eventbus serve``) on uvloop.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, cast

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from eventbus import metrics
from eventbus.http._problem import PROBLEM, Problem
from eventbus.http._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ConnectionGuard"]

_CONNECTION: ContextVar[_Connection | None] = ContextVar("eventbus_connection", default=None)

MAX_HEAD = 16 * 1024  # bytes of a request head; h11's own default limit
# Bytes that may arrive while a request whose body is all in is in the application: the next
# request's head, and whatever of its body came in the same reads (uvicorn stops reading once
# that head is complete). A head that never completes is dropped past this.
MAX_PIPELINED = MAX_HEAD + 256 * 1024
_TOO_LARGE = f"the request head exceeds {MAX_HEAD} bytes"
# A request is shed for a slow body only once it has been reading it this long: every body
# has received nothing at its start.
_SHED_BODY_AFTER = 1.0
# At the cap, a connection waiting this long for its request is shed before a slow body; one
# that has waited less is most likely a client whose request is on its way.
_SHED_WAITING_AFTER = 1.0


def _refuse(transport: asyncio.Transport, status: bytes, problem: Problem) -> None:
    """Answer ``problem`` on a connection no request of which reached uvicorn, and close it."""
    start, body = _answer(problem, None)
    head = b"".join(b"%s: %s\r\n" % header for header in start["headers"])
    transport.write(b"HTTP/1.1 " + status + b"\r\n" + head + b"\r\n" + body["body"])
    transport.close()


def _answer(problem: Problem, instance: str | None) -> tuple[Message, Message]:
    """The two ASGI messages of a problem answer that also closes the connection."""
    body = problem.body(instance)
    start = {
        "type": "http.response.start",
        "status": problem.status,
        "headers": [
            (b"content-type", PROBLEM.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *((k.lower().encode(), v.encode()) for k, v in problem.headers.items()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class ConnectionGuard:
    """The limits of one HTTP server: ``Config(app=guard.wrap(app), http=guard.protocol())``.

    Timeouts are in seconds; ``max_connections`` counts every open connection of this server.
    """

    def __init__(
        self,
        *,
        header_timeout: float,
        body_timeout: float,
        max_connections: int,
        send_timeout: float = 30.0,
    ) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.send_timeout = send_timeout
        self._open: set[_Connection] = set()
        # connections without a request in the application, the one waiting longest first
        self._waiting: dict[_Connection, None] = {}
        self._reading: set[_Connection] = set()  # whose request waits for more of its body

    def protocol(self, http: str = "auto") -> type[asyncio.Protocol]:
        """The protocol class for ``uvicorn.Config(http=...)``, wrapping uvicorn's ``http``
        implementation (``auto``, ``h11`` or ``httptools``)."""
        inner: type[asyncio.Protocol] = import_from_string(HTTP_PROTOCOLS[http])
        guard = self

        class GuardedProtocol(_Connection):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(guard, inner(**kwargs))

        return GuardedProtocol

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` with the body deadline, telling each connection (of a server using
        ``protocol``) when its requests are in the application."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            connection = _CONNECTION.get()
            if connection is None:  # not served through ``protocol``: no limits to apply
                await app(scope, receive, send)
                return
            connection.entered()
            if _head_size(scope) > MAX_HEAD:
                # whole in one read, its task started before the connection could count it
                connection.left(0)
                metrics.HTTP_CONNECTIONS_DROPPED.labels("head_too_large").inc()
                for message in _answer(Problem(431, _TOO_LARGE), scope["path"]):
                    await send(message)
                return
            request = _Request(connection, self.body_timeout, receive, send, scope)
            connection.latest = request
            try:
                await request.run(app)
            finally:
                connection.left(request.unread)

        return guarded

    def _admit(self, connection: _Connection) -> bool:
        """Count ``connection`` in, making room at the cap (see :meth:`_shed`); False (refuse
        it) when every connection has a request under way."""
        if len(self._open) >= self.max_connections and not self._shed():
            metrics.HTTP_CONNECTIONS_DROPPED.labels("refused").inc()
            return False
        self._open.add(connection)
        return True

    def _shed(self) -> bool:
        """Close one connection to make room: the one waiting longest for a request if it has
        waited ``_SHED_WAITING_AFTER`` s, else the slowest body, else the one waiting longest
        however briefly; False when there is none of them. The slow bodies were looked at only
        with none waiting: a client reconnecting as fast as it was dropped shed each newer
        connection, a health probe's before its request arrived, while trickled bodies held
        the rest of the cap."""
        oldest = next(iter(self._waiting), None)
        if oldest is None or not oldest.waited(_SHED_WAITING_AFTER):
            slowest = self._slowest_body()
            if slowest is not None:
                metrics.HTTP_CONNECTIONS_DROPPED.labels("shed_body").inc()
                slowest.close()
                return True
        if oldest is None:
            return False
        metrics.HTTP_CONNECTIONS_DROPPED.labels("shed").inc()
        oldest.close()
        return True

    def _slowest_body(self) -> _Connection | None:
        """The connection whose request has received its body slowest, of those reading one
        for at least ``_SHED_BODY_AFTER`` s. A scan of those reading a body, made only at the
        cap when no connection has waited long for its request (of every connection, it cost
        a refused one 61 us at 1,000)."""
        now = asyncio.get_running_loop().time()
        slowest, lowest = None, float("inf")
        for candidate in self._reading:
            rate = candidate.body_rate(now)
            if rate is not None and rate < lowest:
                slowest, lowest = candidate, rate
        return slowest

    def _waits(self, connection: _Connection, waiting: bool) -> None:
        if waiting and connection in self._open:
            self._waiting[connection] = None
        else:
            self._waiting.pop(connection, None)

    def _reads(self, connection: _Connection, reading: bool) -> None:
        if reading and connection in self._open:
            self._reading.add(connection)
        else:
            self._reading.discard(connection)

    def _release(self, connection: _Connection) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)
        self._reading.discard(connection)


class _Connection(asyncio.Protocol):
    """One connection: uvicorn's protocol inside, the deadlines around it.

    One timer per connection, re-armed only when it fires early (the connection became busy or
    waited anew meanwhile): a request costs no timer of its own on the hot path."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live = False  # admitted, handed to the inner protocol, not yet lost
        self._requests = 0  # this connection's requests inside the application
        self._waiting_since = 0.0
        self._head_bytes = 0  # received since the connection began waiting for a request
        self._head_room = MAX_HEAD  # of which this many may arrive (a skipped body counts too)
        self._head_check = False
        self._reading: _Request | None = None  # a request waiting for more of its body
        self.latest: _Request | None = None  # the request that entered the application last
        self._pipelined = 0  # bytes received since it did, once its body was all in
        self._write_paused_at: float | None = None  # since when the client reads nothing
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though uvloop's do not subclass asyncio.Transport
        self._transport = transport = cast(asyncio.Transport, transport)
        if not self._guard._admit(self):
            limit = self._guard.max_connections
            refusal = Problem(
                503,
                f"too many open connections (listen.max_connections is {limit})",
                headers={"Retry-After": "1"},
            )
            _refuse(transport, b"503 Service Unavailable", refusal)
            return
        self._loop = asyncio.get_running_loop()
        self._live = True
        self._wait_for_request(0)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._live:
            return
        token = _CONNECTION.set(self)
        try:
            self._inner.data_received(data)
        finally:
            _CONNECTION.reset(token)
        if self._requests and self.latest is not None and self.latest.body_done:
            # A request in the application, its body all in: these bytes are a next request
            # (pipelined), whose head must not grow without end while this one is served.
            self._pipelined += len(data)
            if self._pipelined > MAX_PIPELINED:
                metrics.HTTP_CONNECTIONS_DROPPED.labels("head_too_large").inc()
                self.close()
            return
        if self._requests == 0:
            self._head_bytes += len(data)
            if self._head_bytes > self._head_room and not self._head_check:
                # These bytes may hold the end of a head and the start of its body: look again
                # once the request's task, which uvicorn started while parsing them (just now,
                # or for an earlier chunk), has run its first step: callbacks run in the order
                # they were scheduled.
                assert self._loop is not None
                self._head_check = True
                self._loop.call_soon(self._check_head)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._live else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._live:
            return
        self._live = False
        if self._timer is not None:
            self._timer.cancel()
        self._guard._release(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._live:
            assert self._loop is not None
            self._write_paused_at = self._loop.time()
            self._check_by(self._write_paused_at + self._guard.send_timeout)
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._live:
            self._write_paused_at = None
            self._inner.resume_writing()

    def entered(self) -> None:
        """A request of this connection is in the application."""
        self._requests += 1
        self._pipelined = 0
        self._guard._waits(self, False)

    def left(self, unread: int) -> None:
        """A request left the application with ``unread`` bytes of its body still to come,
        which the parser skips before the next head."""
        self._requests -= 1
        if self._requests == 0 and self._live:
            self._wait_for_request(unread)

    def waited(self, seconds: float) -> bool:
        """Whether it has been waiting for a request at least ``seconds``."""
        return self._loop is not None and self._loop.time() - self._waiting_since >= seconds

    def body_rate(self, now: float) -> float | None:
        """Bytes per second of the body its request is reading, once it has been reading it
        for ``_SHED_BODY_AFTER`` s; None otherwise."""
        request = self._reading
        if request is None or not self._live:
            return None
        reading_for = now - request.began
        return request.received / reading_for if reading_for >= _SHED_BODY_AFTER else None

    def reading(self, request: _Request | None) -> None:
        """``request`` waits for more of its body (None: no longer)."""
        self._reading = request
        self._guard._reads(self, request is not None)
        if request is not None and self._live:
            self._check_by(request.deadline)

    def close(self) -> None:
        """Drop the connection now, unsent bytes included (a stalled reader must not keep it);
        it stops counting against the cap at once."""
        self._guard._release(self)
        if self._transport is not None:
            self._transport.abort()

    def _wait_for_request(self, unread: int) -> None:
        assert self._loop is not None
        self._waiting_since = self._loop.time()
        self._head_bytes = 0
        self._head_room = MAX_HEAD + unread
        self._guard._waits(self, True)
        self._check_by(self._waiting_since + self._guard.header_timeout)

    def _check_head(self) -> None:
        self._head_check = False
        if not self._live or self._requests or self._head_bytes <= self._head_room:
            return
        assert self._transport is not None
        if not self._transport.is_closing():  # else the parser refused it already (h11: 400)
            metrics.HTTP_CONNECTIONS_DROPPED.labels("head_too_large").inc()
            too_large = Problem(431, _TOO_LARGE)
            _refuse(self._transport, b"431 Request Header Fields Too Large", too_large)

    def _check_by(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline``; an earlier one looks again when it does."""
        assert self._loop is not None
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        assert self._loop is not None
        self._timer = None
        if not self._live:
            return
        if self._write_paused_at is not None:
            send_by = self._write_paused_at + self._guard.send_timeout
            if send_by <= self._loop.time():
                metrics.HTTP_CONNECTIONS_DROPPED.labels("send_timeout").inc()
                self.close()
                return
            self._check_by(send_by)  # and whatever else is due, below
        if self._requests == 0:
            deadline = self._waiting_since + self._guard.header_timeout
        elif self._reading is not None:
            deadline = self._reading.deadline
        else:
            return  # the application has the request; it arms the timer again when due
        if deadline > self._loop.time():
            self._check_by(deadline)
        elif self._reading is not None:
            self._reading.expire()
        else:
            metrics.HTTP_CONNECTIONS_DROPPED.labels("header_timeout").inc()
            self.close()


def _head_size(scope: Scope) -> int:
    """About the size of the request head the scope came from (request line and headers)."""
    line = len(scope["method"]) + len(scope["raw_path"] or b"") + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length a request head declares: 0 without a body, None when chunked."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return 0


class _Request:
    """One request in the application: its ``receive`` and ``send``, and the body deadline."""

    def __init__(
        self, connection: _Connection, timeout: float, receive: Receive, send: Send, scope: Scope
    ) -> None:
        self._connection = connection
        self._timeout = timeout
        self._receive = receive
        self._send = send
        self._scope = scope
        self.began = asyncio.get_running_loop().time()
        self.deadline = self.began + timeout
        self._declared = _declared_length(scope["headers"])
        self.received = 0  # body bytes the application has received
        self._body_done = self._declared == 0
        self._started = False  # the application began its answer
        self._expired = False  # the deadline passed: the client got its 408 (or a close)
        self._answering: asyncio.Task[None] | None = None

    @property
    def body_done(self) -> bool:
        """The application has the whole body (or the request has none)."""
        return self._body_done

    @property
    def unread(self) -> int:
        """Declared body bytes the application has not received (at most: some may already
        be buffered); 0 for a body of unknown length, whose connection closes instead."""
        if self._body_done or self._declared is None:
            return 0
        return max(self._declared - self.received, 0)

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self._scope, self.receive, self.send)
        except Exception:
            # after the deadline the application was told the client left; how it gives up
            # (Starlette raises ClientDisconnect) does not matter any more
            if not self._expired:
                raise

    async def receive(self) -> Message:
        if self._expired:
            return {"type": "http.disconnect"}
        if self._body_done:
            return await self._receive()
        self._connection.reading(self)
        try:
            message = await self._receive()
        finally:
            self._connection.reading(None)
        self.received += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self._expired:
            return  # the application's answer to the disconnect; the client has its 408
        if not self._started and not self._body_done and self._declared is None:
            # The rest of a chunked body will be skipped, and nothing tells where it ends: the
            # connection closes after this answer rather than let it pass for a request head.
            headers = [*message.get("headers", ()), (b"connection", b"close")]
            message = {**message, "headers": headers}
        self._started = True
        await self._send(message)

    def expire(self) -> None:
        """The body is late: answer 408 and close (or just close, once an answer began); the
        application's pending ``receive`` then returns ``http.disconnect``."""
        self._expired = True
        metrics.HTTP_CONNECTIONS_DROPPED.labels("body_timeout").inc()
        if self._started:
            self._connection.close()
        else:
            self._answering = asyncio.get_running_loop().create_task(self._answer_late())

    async def _answer_late(self) -> None:
        late = Problem(408, f"the request body did not arrive within {self._timeout:g} s")
        for message in _answer(late, self._scope["path"]):
            await self._send(message)
