"""A lean HTTP/1.1 client for the function targets: one POST, one answer, kept-alive connections.

Place in the pipeline: under ``HttpTarget``, the last hop. Delivering an event is always the
same exchange (a POST with a body in memory, an answer read up to a bound), so the general
clients' machinery (redirects, cookies, streaming bodies, per-request tracing and middleware)
is CPU spent per event for nothing: aiohttp took ~110 µs of CPU per request on the pipeline
benchmark's machine, most of the HTTP target's share (bench/RESULTS.md, the pipeline section).
Here a request is one ``transport.write`` of bytes built in one pass, and the answer is parsed
by ``httptools`` (llhttp, the parser uvicorn runs with) straight from the protocol callbacks.

``Pool`` keeps idle connections per origin (host, port and TLS context: targets with different
client certificates never share a connection) for ``keepalive`` seconds and caps the
connections in use, and the idle ones over all origins. Failures are the ``HttpError``
subclasses below, each saying what went wrong in words an operator can act on; ``HttpTarget``
maps them into outcomes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import httptools

from eventbus.config import tls_reason

__all__ = [
    "CertificateError",
    "ConnectError",
    "Disconnected",
    "DnsError",
    "Headers",
    "HttpError",
    "MalformedResponse",
    "Origin",
    "Pool",
    "PoolClosed",
    "Response",
]

MAX_HEADER_BYTES = 64 * 1024
"""An answer whose status line and headers exceed this is refused as malformed."""


class HttpError(Exception):
    """A request that got no usable answer; ``str()`` says why."""


class DnsError(HttpError):
    def __init__(self, host: str) -> None:
        super().__init__(f"DNS lookup failed for {host}")
        self.host = host


class ConnectError(HttpError):
    def __init__(self, host: str, port: int, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {os_error.strerror or os_error}")
        self.host = host
        self.port = port
        self.os_error = os_error


class CertificateError(HttpError):
    """The server's certificate was rejected: retrying cannot fix it."""


class Disconnected(HttpError):
    """The server closed the connection before a whole answer arrived."""


class TlsRefused(Disconnected):
    """The server ended the TLS session with an alert refusing this client (its certificate
    missing, from a CA the server does not know, or refused): it is refused again until an
    operator fixes the certificate."""


_REFUSING_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "HANDSHAKE_FAILURE")


def _disconnected(exc: Exception | None) -> Disconnected:
    """Why a connection closed before its answer came: the TLS alert the server ended it
    with, where it sent one (the reason was dropped: "server disconnected" and retried, for a
    server that wanted a client certificate)."""
    if not isinstance(exc, ssl.SSLError) or not exc.reason:
        return Disconnected("server disconnected before answering")
    reason, said = exc.reason, tls_reason(exc)  # TLSV13_ALERT_CERTIFICATE_REQUIRED
    if "ALERT" in reason and any(alert in reason for alert in _REFUSING_ALERTS):
        return TlsRefused(f"the server refused the TLS connection: {said}")
    return Disconnected(f"server disconnected before answering: {said}")


class MalformedResponse(HttpError):
    """The answer is not HTTP/1.x as the parser reads it."""


class PoolClosed(HttpError):
    """The pool was closed (its targets are shutting down) before the request could go out."""


class Headers(dict[str, str]):
    """Response headers under lower-case names, looked up in any case; a repeated header's
    values are joined with ``", "`` as RFC 9110 allows."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: Headers
    content: bytes
    complete: bool
    """False when the body was cut off at the read bound (the connection is then dropped)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go and how to reach it; equal origins share connections."""

    host: str
    port: int
    tls: ssl.SSLContext | None

    def __hash__(self) -> int:
        return hash((self.host, self.port, id(self.tls)))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Origin)
            and self.host == other.host
            and self.port == other.port
            and self.tls is other.tls
        )


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection carrying one exchange at a time."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._lost: Exception | None = None  # what connection_lost was told
        self.reusable = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._max_body = 0
        self._reset()

    def _reset(self) -> None:
        self._answered = False
        self._refusal: str | None = None
        self._header_bytes = 0
        self._unparsed = 0
        self._reason = b""
        self._headers = Headers()
        self._status = 0
        self._body: list[bytes] = []
        self._size = 0
        self._pieces = 0  # calls of on_body
        self._framing = 0  # bytes after the head that were not body: chunk lines, trailers
        self._headers_done = False

    # --- the exchange -------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Whether the connection can carry a request: not closed by either side."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, request: bytes, body: bytes, max_body: int) -> Response:
        transport = self.transport
        if transport is None or not self.open:
            # lost before the request went (a TLS 1.3 server refuses the client's
            # certificate once the client's side of the handshake is done)
            raise _disconnected(self._lost)
        self.reusable = False
        self._reset()
        self._max_body = max_body
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        if len(body) <= 16 * 1024:
            transport.write(request + body)
        else:  # no copy of a big body just to save one write
            transport.write(request)
            transport.write(body)
        try:
            return await waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _finish(self, complete: bool) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        response = Response(
            self._status,
            self._reason.decode("latin-1").strip(),
            self._headers,
            b"".join(self._body),
            complete,
        )
        waiter.set_result(response)

    def _fail(self, exc: HttpError) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost = exc
        self.reusable = False
        if self._waiter is None or self._waiter.done():
            return
        if (
            exc is None
            and self._headers_done
            and "content-length" not in self._headers
            and ("chunked" not in self._headers.get("transfer-encoding", "").lower())
        ):
            self._finish(complete=True)  # a body delimited by the (orderly) end of the connection
        elif self._headers_done:
            self._fail(MalformedResponse("the connection closed in the middle of the body"))
        else:
            self._fail(_disconnected(exc))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: this connection's framing cannot be trusted
            return
        size = self._size
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedResponse("the server switched protocols"))
            return
        except httptools.HttpParserError as exc:
            # An error raised in a callback reaches here wrapped: its reason was kept aside.
            self._fail(MalformedResponse(self._refusal or f"unreadable answer: {exc}"))
            return
        if not self._headers_done:
            # The parser holds a header line until it is whole: bound what it holds, too.
            self._unparsed += len(data)
            if self._unparsed > MAX_HEADER_BYTES:
                self._fail(MalformedResponse(f"headers larger than {MAX_HEADER_BYTES} bytes"))
        elif not self._waiter.done():
            # After the head, the parser also holds a trailer line until it is whole (an
            # endless one took hundreds of MB and the loop, copying it): bound what is not body,
            # a head's worth besides a little per chunk.
            self._framing += len(data) - max(0, self._size - size)
            if self._framing > 2 * MAX_HEADER_BYTES + 64 * self._pieces:
                self._fail(MalformedResponse(f"trailers larger than {MAX_HEADER_BYTES} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the exchange

    # --- httptools callbacks ------------------------------------------------------------------

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refusal = f"headers larger than {MAX_HEADER_BYTES} bytes"
            raise httptools.HttpParserError(self._refusal)

    def on_message_begin(self) -> None:
        if self._answered:
            # A second answer to one request (or bytes after the answer that read as one):
            # nothing after the first can be trusted, so the connection is not used again.
            self.reusable = False
            self._refusal = "more than one answer to one request"
            raise httptools.HttpParserError(self._refusal)

    def on_status(self, status: bytes) -> None:
        self._count(len(status))
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        known = dict.get(self._headers, key)
        dict.__setitem__(self._headers, key, text if known is None else f"{known}, {text}")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if not 100 <= self._status <= 599:  # httptools takes any three digits
            self._refusal = f"status {self._status} is not an HTTP status"
            raise httptools.HttpParserError(self._refusal)
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            return
        self._pieces += 1
        room = self._max_body - self._size
        if len(body) > room:
            # Past the bound: keep what fits, answer now, and drop the connection (the rest of
            # the body is never read).
            if room > 0:
                self._body.append(body[:room])
            self._size = self._max_body
            self._finish(complete=False)
            self.close()
            return
        self._body.append(body)
        self._size += len(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            self._reset()  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return
        self._answered = True
        # An answer that came before the whole body was written leaves the connection in an
        # unknown state (did the server read the rest?): not reused.
        transport = self.transport
        self.reusable = (
            self._parser.should_keep_alive()
            and transport is not None
            and transport.get_write_buffer_size() == 0
        )
        self._finish(complete=True)


def _literal_address(host: str, port: int) -> list[Any]:
    """The ``getaddrinfo`` entry of an IP address written as the host, without asking the
    resolver (a thread hop per new connection); [] for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return []
    if ip.version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


_SETTLED = 0.5
"""A connection idle this long (s) is checked for a close the loop has not read yet."""


@dataclass(slots=True)
class Ticket:
    """How far one request got in the pool: ``admitted`` once it holds one of the pool's
    ``limit`` places (a request that fails before then never reached its server)."""

    admitted: bool = False


class Pool:
    """Connections for every HTTP target of an event loop.

    At most ``limit`` connections carry a request at once (a request beyond that waits for a
    free one); idle connections are kept per origin for ``keepalive`` seconds and reused most
    recent first, at most ``limit`` of them over all origins (the longest idle is closed for a
    newer one): a burst to each of a thousand hosts kept up to ``limit`` sockets per host
    open, idle, for ``keepalive`` seconds.
    """

    def __init__(self, limit: int, keepalive: float) -> None:
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self._keepalive = keepalive
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._idle_order: dict[_Connection, None] = {}  # every idle one, the longest idle first
        self._busy: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def full(self) -> bool:
        """Whether ``limit`` requests are in flight: another one would wait for a place."""
        return self._slots.locked()

    async def request(
        self,
        origin: Origin,
        request: bytes,
        body: bytes,
        *,
        max_body: int,
        ticket: Ticket | None = None,
    ) -> Response:
        """Send ``request`` (the request line and headers, ending with the blank line) and
        ``body``; raises ``HttpError`` (``PoolClosed`` once the pool is closed). ``ticket``
        is marked admitted once the request holds a place in the pool."""
        async with self._slots:
            if ticket is not None:
                ticket.admitted = True
            self._check_open()
            conn = await self._reusable(origin)
            if conn is not None:
                # A server that closes as the request is written may have read it (a function
                # that crashed, a worker killed at its timeout): sent again on a new connection,
                # a POST ran twice, for a synchronous call too, and uncounted (a function saw 5
                # requests of 3 audited attempts). Disconnected is the attempt's failure.
                return await self._exchange(conn, request, body, max_body)
            conn = await self._connect(origin)
            if self.closed:  # closed while connecting
                conn.close()
                self._check_open()
            return await self._exchange(conn, request, body, max_body)

    def _check_open(self) -> None:
        if self.closed:
            raise PoolClosed("the HTTP connection pool is closed")

    async def _exchange(
        self, conn: _Connection, request: bytes, body: bytes, max_body: int
    ) -> Response:
        self._busy.add(conn)
        try:
            return await conn.exchange(request, body, max_body)
        finally:
            self._busy.discard(conn)
            self._release(conn)

    async def _reusable(self, origin: Origin) -> _Connection | None:
        """An idle connection to ``origin`` still open. One idle for a while is first given a
        turn of the loop, in which a close the server sent meanwhile (its idle timeout, often
        shorter than ours) is read; the rest of that race fails the attempt."""
        while (conn := self._take_idle(origin)) is not None:
            if time.monotonic() - conn.idle_since < _SETTLED:
                return conn
            try:
                # Two turns: in the first, asyncio's loop resumes this task before the read
                # callback that sees the close, which runs after it in the same turn.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                self._check_open()
            except BaseException:
                conn.close()  # neither idle nor busy: nobody else would close it
                raise
            if conn.open:
                return conn
            conn.close()
        return None

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            del self._idle_order[conn]
            if conn.open:
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        if not conn.reusable or conn.closed or self.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, deque()).append(conn)
        self._idle_order[conn] = None
        if len(self._idle_order) > self.limit:
            self._close_idle(next(iter(self._idle_order)))
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        horizon = time.monotonic() - self._keepalive
        for origin, idle in list(self._idle.items()):
            # The oldest are on the left: close from there until one is young enough.
            while idle and (idle[0].closed or idle[0].idle_since <= horizon):
                conn = idle.popleft()
                del self._idle_order[conn]
                conn.close()
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive / 2, self._expire)

    def _close_idle(self, conn: _Connection) -> None:
        """Close the idle ``conn`` (the longest idle of its origin too: at its left end)."""
        del self._idle_order[conn]
        idle = self._idle[conn.origin]
        idle.remove(conn)
        if not idle:
            del self._idle[conn.origin]
        conn.close()

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        addresses = _literal_address(origin.host, origin.port)
        if not addresses:
            try:
                addresses = await loop.getaddrinfo(
                    origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except socket.gaierror as exc:
                raise DnsError(origin.host) from exc
        if not addresses:
            raise DnsError(origin.host)
        error: OSError | None = None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin),
                    sock=sock,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls is not None else None,
                )
                return conn
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise CertificateError(
                    f"TLS certificate rejected: {exc.verify_message or exc}"
                ) from exc
            except ssl.SSLError as exc:
                sock.close()
                raise ConnectError(origin.host, origin.port, exc) from exc
            except OSError as exc:
                sock.close()
                error = error or exc  # try the next address; the first failure is reported
            except BaseException:
                sock.close()
                raise
        assert error is not None
        raise ConnectError(origin.host, origin.port, error) from error

    async def close(self) -> None:
        """Close every connection; requests in flight fail as disconnected."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        self._idle_order.clear()
        for conn in list(self._busy):
            conn.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks
