"""Fuzzing what a function endpoint answers to the HTTP target (its own HTTP/1.1 client, over a
real loopback socket): whatever bytes come back (status lines, headers, chunk framing and
garbage in any order, cut anywhere, the connection then closed or left open), ``deliver``
returns an outcome within its timeout and raises nothing, a delivered outcome has a 2xx status,
and the same target then delivers to a well-behaved endpoint."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.targets import HttpTarget, HttpTargetSpec, Outcome
from tests.fuzz._inputs import FUZZ

_pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 204 No Content\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.0 500 Oops\r\n",
            b"HTTP/1.1 429 Slow\r\nRetry-After: 3\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: -1\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Content-Type: application/cloudevents+json\r\n",
            b"ce-specversion: 1.0\r\nce-id: r\r\nce-source: /s\r\nce-type: t\r\n",
            b"Connection: close\r\n",
            b"\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            b'{"specversion":"1.0","id":"r","source":"/s","type":"t"}',
        ]
    ),
)

_GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


async def _serve_once(answer: bytes, close: bool) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            if not close:
                await reader.read()  # hold the connection open until the client lets go
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _check(answer: bytes, close: bool) -> None:
    event = {"specversion": "1.0", "id": "e", "source": "/fuzz", "type": "t", "data": 1}
    bad, bad_port = await _serve_once(answer, close)
    good, good_port = await _serve_once(_GOOD, True)
    try:
        async with (
            HttpTarget(
                HttpTargetSpec(name="bad", url=f"http://127.0.0.1:{bad_port}/", timeout=1)
            ) as first,
            HttpTarget(HttpTargetSpec(name="good", url=f"http://127.0.0.1:{good_port}/")) as second,
        ):
            outcome = await asyncio.wait_for(
                first.deliver(event, event, is_cloudevent=True, attempt=1), 5
            )
            assert isinstance(outcome, Outcome)
            assert not outcome.delivered or 200 <= (outcome.status or 0) < 300, outcome
            assert outcome.delivered or outcome.error, outcome
            after = await second.deliver(event, event, is_cloudevent=True, attempt=1)
            assert after.delivered, after
    finally:
        bad.close()
        good.close()


@settings(FUZZ, max_examples=60)
@given(pieces=st.lists(_pieces, max_size=8), close=st.booleans())
def test_any_answer_from_a_function(pieces: list[bytes], close: bool) -> None:
    asyncio.run(_check(b"".join(pieces), close))
