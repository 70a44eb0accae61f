"""The HTTP target's own client (``_http1``) against a raw TCP server on loopback that answers
with hand-written bytes: the framings, interim answers, bounds and connection reuse that a
well-behaved aiohttp receiver never produces."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from eventbus.targets import HttpTarget, HttpTargetSpec, Outcome
from eventbus.targets._http import MAX_RESPONSE_BYTES
from eventbus.targets._http1 import MAX_HEADER_BYTES, Disconnected, Origin, Pool, PoolClosed
from tests.fixtures.certs import make_pki
from tests.fixtures.wait import eventually

Answer = Callable[[int], bytes | None]
"""Given the request's number on its connection (1, 2, ...), the bytes to send back; None
closes the connection without answering."""


class RawServer:
    """Reads whole requests (headers and Content-Length body) and answers with ``answer``."""

    def __init__(
        self, answer: Answer, *, close_after: bool = False, tls: ssl.SSLContext | None = None
    ) -> None:
        self.answer = answer
        self.tls = tls
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def url(self, path: str = "/fn") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                number += 1
                sent = self.answer(number)
                if sent is None:
                    break
                writer.write(sent)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Any]]:
    servers: list[RawServer] = []

    async def start(answer: Answer, **kw: Any) -> RawServer:
        server = RawServer(answer, **kw)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


EVENT = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "/tests/http1",
    "type": "com.example.created",
    "data": {"n": 1},
}


async def deliver(url: str, times: int = 1, **kw: Any) -> list[Outcome]:
    async with HttpTarget(HttpTargetSpec(name="fn", url=url, **kw)) as target:
        return [
            await target.deliver(EVENT, EVENT, is_cloudevent=True, attempt=1) for _ in range(times)
        ]


def always(data: bytes) -> Answer:
    return lambda _: data


async def test_the_request_is_well_formed_http(raw: Callable[..., Any]) -> None:
    server = await raw(always(b"HTTP/1.1 204 No Content\r\n\r\n"))
    [outcome] = await deliver(server.url("/fn/a?x=1"))
    assert outcome.delivered and outcome.status == 204
    [request] = server.requests
    head, body = request.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /fn/a?x=1 HTTP/1.1"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Host"] == f"127.0.0.1:{server.port}"
    assert fields["Content-Length"] == str(len(body)) and body == b'{"n":1}'
    assert fields["ce-id"] == "evt-1" and fields["Content-Type"] == "application/json"


async def test_chunked_answer_with_a_reply(raw: Callable[..., Any]) -> None:
    reply = b'{"specversion":"1.0","id":"r1","source":"/fn","type":"done"}'
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (reply[:10], reply[10:]))
    server = await raw(
        always(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/cloudevents+json\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
    )
    [outcome] = await deliver(server.url())
    assert outcome.delivered and outcome.reply is not None and outcome.reply["id"] == "r1"


async def test_answer_delimited_by_the_end_of_the_connection(raw: Callable[..., Any]) -> None:
    server = await raw(
        always(b"HTTP/1.1 503 Busy\r\nConnection: close\r\nRetry-After: 7\r\n\r\nback soon"),
        close_after=True,
    )
    outcomes = await deliver(server.url(), times=2)
    assert [o.error for o in outcomes] == ["HTTP 503 Busy: back soon"] * 2
    assert outcomes[0].retry_after == 7.0
    assert server.connections == 2  # "Connection: close" is honoured: no reuse


async def test_interim_answers_are_skipped(raw: Callable[..., Any]) -> None:
    server = await raw(
        always(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        )
    )
    [outcome] = await deliver(server.url())
    assert outcome.delivered and outcome.status == 202


async def test_kept_alive_connection_is_reused(raw: Callable[..., Any]) -> None:
    server = await raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    outcomes = await deliver(server.url(), times=5)
    assert all(o.delivered for o in outcomes)
    assert server.connections == 1 and len(server.requests) == 5


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    raw: Callable[..., Any],
) -> None:
    # The server closes each connection after its answer (as at its idle timeout): the next
    # request goes out on a new one, once.
    server = await raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), close_after=True)
    async with HttpTarget(HttpTargetSpec(name="fn", url=server.url())) as target:
        for _ in range(3):
            outcome = await target.deliver(EVENT, EVENT, is_cloudevent=True, attempt=1)
            assert outcome.delivered, outcome
            await asyncio.sleep(0.6)  # idle past the point where a close is looked for
    assert server.connections == 3 and len(server.requests) == 3


def _idle_closing_server(
    idle: float, stop: threading.Event
) -> tuple[socket.socket, list[bytes], threading.Thread]:
    """A server in a thread of its own (it must act while the test's loop is blocked): it
    answers each request 204 and closes a connection idle for ``idle`` seconds, until
    ``stop`` is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    requests: list[bytes] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(idle)
                while True:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        break
                    if not data:
                        break
                    requests.append(data)
                    conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, requests, thread


async def test_a_close_that_came_while_the_loop_was_busy_is_seen_before_reuse() -> None:
    # The server closed the idle connection while this loop was busy (its read of the close
    # still pending): one turn of asyncio's loop resumed the task before that read, so the
    # request went out on the closed connection and failed the attempt.
    stop = threading.Event()
    listener, requests, thread = _idle_closing_server(0.3, stop)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/fn"
    try:
        async with HttpTarget(HttpTargetSpec(name="fn", url=url)) as target:
            first = await target.deliver(EVENT, EVENT, is_cloudevent=True, attempt=1)
            time.sleep(0.8)  # noqa: ASYNC251 - the loop busy (on purpose) while the server closes
            second = await target.deliver(EVENT, EVENT, is_cloudevent=True, attempt=1)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert first.delivered and second.delivered, second
    assert len(requests) == 2


async def test_a_request_the_server_read_and_dropped_is_not_sent_again(
    raw: Callable[..., Any],
) -> None:
    # The server reads the second request on the kept-alive connection and drops it (a crash,
    # a worker killed at its timeout): it may have acted on it. It was sent again on a new
    # connection, uncounted, for a synchronous call too.
    server = await raw(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if n == 1 else None
    )
    first, second = await deliver(server.url(), times=2)
    assert first.delivered
    assert not second.delivered and second.error == "server disconnected before answering"
    assert second.retryable and len(server.requests) == 2


async def test_a_server_that_never_answers_is_a_retryable_failure(
    raw: Callable[..., Any],
) -> None:
    server = await raw(lambda _: None)
    [outcome] = await deliver(server.url())
    assert not outcome.delivered and outcome.retryable
    assert outcome.error == "server disconnected before answering"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"garbage\r\n\r\n", "unreadable answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed in the middle of the body"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n", "headers larger"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            "switched",
        ),
        # httptools takes any three digits; a synchronous caller's answer then failed
        (b"HTTP/1.1 999 Weird\r\nContent-Length: 0\r\n\r\n", "status 999 is not an HTTP"),
        (b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", "status 99 is not an HTTP"),
    ],
    ids=["garbage", "short-body", "huge-headers", "upgrade", "status-999", "status-099"],
)
async def test_malformed_answers_are_retryable_failures(
    raw: Callable[..., Any], answer: bytes, reason: str
) -> None:
    server = await raw(always(answer), close_after=True)
    [outcome] = await deliver(server.url())
    assert not outcome.delivered and outcome.retryable
    assert outcome.error is not None and outcome.error.startswith("malformed response")
    assert reason in outcome.error


async def test_bytes_after_the_answer_are_not_read_as_the_next_answer(
    raw: Callable[..., Any],
) -> None:
    # The first answer comes with the start of a second one in the same write: the first is
    # used, the connection is not (the second request must not read the stray 500).
    stray = b"HTTP/1.1 500 Stray\r\nX-Pad: "
    server = await raw(lambda n: b"HTTP/1.1 204 No Content\r\n\r\n" + (stray if n == 1 else b""))
    outcomes = await deliver(server.url(), times=2)
    assert [o.status for o in outcomes] == [204, 204], outcomes
    assert server.connections == 2


async def test_an_endless_trailer_is_refused(raw: Callable[..., Any]) -> None:
    # After the head, httptools holds a trailer line until it is whole: an endless one took
    # hundreds of MB (and the loop, copying it) until the timeout.
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await raw(always(head + b"2\r\nok\r\n0\r\nX-T: " + b"a" * (4 * MAX_HEADER_BYTES)))
    [outcome] = await deliver(server.url(), timeout=30)
    assert outcome.error == f"malformed response: trailers larger than {MAX_HEADER_BYTES} bytes"
    # a body of many small chunks, with a trailer, is no such thing
    chunks = b"".join(b"1\r\n%c\r\n" % c for c in b"x" * 20_000)
    server = await raw(always(head + chunks + b"0\r\nX-T: t\r\n\r\n"))
    [outcome] = await deliver(server.url())
    assert outcome.delivered, outcome


async def test_an_endless_header_line_is_refused(raw: Callable[..., Any]) -> None:
    # One header value that never ends: refused once it passes the bound, not held until the
    # timeout.
    server = await raw(always(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (2 * MAX_HEADER_BYTES)))
    [outcome] = await deliver(server.url(), timeout=30)
    assert outcome.error == f"malformed response: headers larger than {MAX_HEADER_BYTES} bytes"
    assert outcome.duration_ms < 10_000


async def test_an_interim_answer_then_a_drop_is_not_sent_again() -> None:
    # The server did answer the second request (100 Continue) before dropping the kept-alive
    # connection: it may have acted on it, so the attempt fails rather than going out twice.
    requests = 0

    async def continue_then_drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal requests
        try:
            for answer in (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\n",
            ):
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(b'{"n":1}'))
                requests += 1
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(continue_then_drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        first, second = await deliver(f"http://127.0.0.1:{port}/fn", times=2)
    finally:
        server.close()
    assert first.delivered
    assert not second.delivered and second.error == "server disconnected before answering"
    assert requests == 2


async def test_a_reset_in_the_middle_of_an_unframed_body_is_not_an_answer(
    raw: Callable[..., Any],
) -> None:
    async def reset_after_partial_body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"partial')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server = await asyncio.start_server(reset_after_partial_body, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        [outcome] = await deliver(f"http://127.0.0.1:{port}/fn")
    finally:
        server.close()
    assert not outcome.delivered and outcome.retryable, outcome
    assert outcome.error == "malformed response: the connection closed in the middle of the body"


async def test_an_oversized_answer_is_cut_and_its_connection_dropped(
    raw: Callable[..., Any],
) -> None:
    size = MAX_RESPONSE_BYTES + 4096
    server = await raw(
        always(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
    )
    outcomes = await deliver(server.url(), times=2)
    assert [o.status for o in outcomes] == [500, 500]
    assert all(o.error is not None and len(o.error) < 2000 for o in outcomes)
    assert server.connections == 2  # the unread rest made the first connection unusable


async def test_a_refused_connection_names_the_endpoint(refused_port: int) -> None:
    [outcome] = await deliver(f"http://127.0.0.1:{refused_port}/fn")
    assert outcome.error == f"connection refused by 127.0.0.1:{refused_port}"
    assert outcome.retryable


async def test_an_unknown_host_is_a_dns_failure() -> None:
    [outcome] = await deliver("http://no-such-host.invalid/fn", timeout=5)
    assert outcome.error == "DNS lookup failed for no-such-host.invalid" and outcome.retryable


def test_headers_the_client_writes_itself_are_refused() -> None:
    from eventbus._errors import ConfigError

    with pytest.raises(ConfigError, match="may not set Content-Length"):
        HttpTarget(
            HttpTargetSpec(name="fn", url="http://127.0.0.1:1/", headers={"Content-Length": "5"})
        )


async def test_idle_connections_expire_and_a_closed_pool_refuses(
    raw: Callable[..., Any],
) -> None:
    server = await raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    pool = Pool(limit=4, keepalive=0.2)
    origin = Origin("127.0.0.1", server.port, None)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    assert (await pool.request(origin, request, b"", max_body=10)).status == 200
    await asyncio.sleep(0.6)  # past the keep-alive: the idle connection is closed
    assert (await pool.request(origin, request, b"", max_body=10)).status == 200
    assert server.connections == 2
    await pool.close()
    with pytest.raises(PoolClosed):
        await pool.request(origin, request, b"", max_body=10)


async def test_idle_connections_over_all_origins_are_capped_the_longest_idle_closed(
    raw: Callable[..., Any],
) -> None:
    # Idle connections were capped per origin only: a burst to each of many hosts kept up to
    # the pool's limit of sockets per host open, idle, for the whole keep-alive.
    servers = [await raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) for _ in range(4)]
    pool = Pool(limit=2, keepalive=30)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    try:
        for server in servers:
            origin = Origin("127.0.0.1", server.port, None)
            assert (await pool.request(origin, request, b"", max_body=10)).status == 200
        # two kept, the longest idle closed for each new one: round again, each needs a new one
        for server in (*servers, servers[0]):
            origin = Origin("127.0.0.1", server.port, None)
            assert (await pool.request(origin, request, b"", max_body=10)).status == 200
        assert [s.connections for s in servers] == [3, 2, 2, 2]
    finally:
        await pool.close()


async def test_closing_the_pool_ends_a_request_in_flight(raw: Callable[..., Any]) -> None:
    # The second request rides the kept-alive connection and gets no answer; closing the pool
    # ends it as disconnected, without sending it again on a new connection.
    server = await raw(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if n == 1 else b"")
    pool = Pool(limit=4, keepalive=5)
    origin = Origin("127.0.0.1", server.port, None)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    assert (await pool.request(origin, request, b"", max_body=10)).status == 200
    waiting = asyncio.create_task(pool.request(origin, request, b"", max_body=10))
    await eventually(lambda: len(server.requests) == 2, within=5, what="the request sent")
    await pool.close()
    with pytest.raises(Disconnected):
        await asyncio.wait_for(waiting, 5)
    await asyncio.sleep(0.1)
    assert len(server.requests) == 2 and server.connections == 1


def test_under_uvloop_with_reuse_and_mutual_tls(tmp_path: Path) -> None:
    # `eventbus serve` runs on uvloop, whose transports are its own classes (not asyncio's) and
    # whose TLS goes through the context's wrap_bio: the same exchanges there, plain and over
    # mutual TLS with a server name other than the address connected to.
    pki = make_pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_tls.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    answer = always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def scenario() -> tuple[list[Outcome], list[Outcome], Outcome, int, int]:
        plain, secured = RawServer(answer), RawServer(answer, tls=server_tls)
        await plain.start()
        await secured.start()
        try:
            over_http = await deliver(plain.url(), times=3)
            tls = {
                "ca": str(pki.ca),
                "cert": str(pki.client_cert),
                "key": str(pki.client_key),
                "server_name": "broker.test",
            }
            url = f"https://127.0.0.1:{secured.port}/fn"
            over_tls = await deliver(url, times=3, tls=tls)
            [refused] = await deliver(url, tls={"ca": str(pki.other_ca)})
            return over_http, over_tls, refused, plain.connections, secured.connections
        finally:
            await plain.stop()
            await secured.stop()

    over_http, over_tls, refused, plain_connections, tls_connections = uvloop.run(scenario())
    assert all(o.delivered for o in over_http + over_tls), over_http + over_tls
    # three requests over one kept-alive connection each (a refused handshake never reaches
    # the server's handler)
    assert plain_connections == 1 and tls_connections == 1
    assert not refused.retryable and refused.error is not None
    assert refused.error.startswith("TLS certificate rejected")
