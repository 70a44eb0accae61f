"""The syslog source: parsing and framing (pure), then real UDP and TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from eventbus._errors import CloudEventError, ConfigError
from eventbus.bus._nats_server import free_port
from eventbus.sources import SourceContext, build_source
from eventbus.sources._syslog import _Framer, parse_syslog
from tests.sources._harness import (
    Recorder,
    dead_letters,
    eventually,
    make_context,
    running,
    source_pool,
)

RFC5424 = (
    b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
    b'[exampleSDID@32473 iut="3" eventSource="App\\"x\\]"][examplePriority@32473 class="high"]'
    b" \xef\xbb\xbfAn application event log entry..."
)


def test_rfc5424_with_structured_data() -> None:
    assert parse_syslog(RFC5424) == {
        "format": "rfc5424",
        "facility": 20,
        "facility_name": "local4",
        "severity": 5,
        "severity_name": "notice",
        "version": 1,
        "timestamp": "2003-10-11T22:14:15.003Z",
        "hostname": "mymachine.example.com",
        "app": "evntslog",
        "procid": None,
        "msgid": "ID47",
        "structured_data": {
            "exampleSDID@32473": {"iut": "3", "eventSource": 'App"x]'},
            "examplePriority@32473": {"class": "high"},
        },
        "message": "An application event log entry...",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"<34>1 - - - - - -", {"hostname": None, "message": "", "structured_data": {}}),
        (b"<0>1 2026-01-01T00:00:00+01:00 h a 42 m - hi\n", {"procid": "42", "message": "hi"}),
        (
            b"<13>Feb  5 17:32:18 10.0.0.99 myprog[123]: Use the BFG!\n",
            {
                "format": "rfc3164",
                "timestamp": "Feb  5 17:32:18",
                "hostname": "10.0.0.99",
                "app": "myprog",
                "procid": "123",
                "message": "Use the BFG!",
                "severity_name": "notice",
            },
        ),
        (
            b"<86>sshd: session opened",
            {"hostname": None, "app": "sshd", "message": "session opened"},
        ),
        (b"<191>just text", {"facility_name": "local7", "severity": 7, "message": "just text"}),
        # no HOSTNAME after the timestamp (logger(1) on the same machine): the tag was read as
        # a host named "root:" and the app lost
        (
            b"<13>Dec  4 13:44:00 root: hello",
            {"hostname": None, "app": "root", "message": "hello"},
        ),
        (
            b"<13>Dec  4 13:44:00 sshd[12]: opened",
            {"hostname": None, "app": "sshd", "procid": "12", "message": "opened"},
        ),
        # rsyslog's forwarding format (an RFC 3339 timestamp in the BSD header), and the
        # BSD timestamp with a fraction or a year: the app was "2026-12-05T21" and the rest of
        # the header the message, or nothing was read at all
        (
            b"<13>2026-12-05T21:00:00.123456+00:00 web1 myapp[12]: msg",
            {
                "format": "rfc3164",
                "timestamp": "2026-12-05T21:00:00.123456+00:00",
                "hostname": "web1",
                "app": "myapp",
                "procid": "12",
                "message": "msg",
            },
        ),
        (
            b"<13>2026-12-05T21:00:00Z web1 cron: ran",
            {"timestamp": "2026-12-05T21:00:00Z", "hostname": "web1", "app": "cron"},
        ),
        (  # without a zone (the event's time is then the time received)
            b"<13>2026-12-05T21:43:11 host app: m",
            {"timestamp": "2026-12-05T21:43:11", "hostname": "host", "app": "app"},
        ),
        (
            b"<13>Dec  5 21:00:00.123 web1 app: m",
            {"timestamp": "Dec  5 21:00:00.123", "hostname": "web1", "app": "app", "message": "m"},
        ),
        (
            b"<13>Dec  5 2026 21:00:00 web1 app: m",
            {"timestamp": "Dec  5 2026 21:00:00", "hostname": "web1", "app": "app", "message": "m"},
        ),
        # a day of one digit without its padding space
        (
            b"<13>Dec 6 03:00:00 web1 app[1]: m",
            {"timestamp": "Dec 6 03:00:00", "hostname": "web1", "app": "app", "procid": "1"},
        ),
        # no header, a text starting with a number (Python's SysLogHandler sends such): read
        # as RFC 5424 version 3 and dead-lettered, "header needs TIMESTAMP ..."
        (
            b"<14>3 files uploaded to the archive",
            {"format": "rfc3164", "version": None, "message": "3 files uploaded to the archive"},
        ),
        (b"<12>12 retries left\x00", {"format": "rfc3164", "message": "12 retries left"}),
        (b"<13>5 apples were eaten", {"format": "rfc3164", "message": "5 apples were eaten"}),
        # so is an RFC 5424 header whose TIMESTAMP is no date at all: it cannot be told from
        # such a text, and is kept whole as the message
        (
            b"<34>1 yesterday h a p m - x",
            {"format": "rfc3164", "message": "1 yesterday h a p m - x"},
        ),
        (
            b"<13>1 2003-10-11T22:14:15.003Z host app - - - hi",
            {"format": "rfc5424", "timestamp": "2003-10-11T22:14:15.003Z", "message": "hi"},
        ),
    ],
)
def test_parse_variants(raw: bytes, expected: dict[str, Any]) -> None:
    parsed = parse_syslog(raw)
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"no pri here", "missing PRI"),
        (b"<192>1 - - - - - -", "out of range"),
        (b"<34>1 - host app", "RFC 5424 header needs"),
        (b"<34>1 2026-13-45T00:00:00Z h a p m - x", "invalid TIMESTAMP"),
        (b"<34>1 - h a p m nosd", "STRUCTURED-DATA must be"),
        (b'<34>1 - h a p m [id k="v', "unterminated value"),
        (b'<34>1 - h a p m [id k="v"', "missing ']'"),
        (b'<34>1 - h a p m [id k="v"]x', "followed by a space"),
    ],
)
def test_parse_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(CloudEventError, match=fragment):
        parse_syslog(raw)


def test_framer_mixes_octet_counting_and_newlines_across_chunks() -> None:
    framer = _Framer(limit=480)
    frames = framer.feed(b"14 <1>1 - - - ")
    frames += framer.feed(b"- -<2>line one\r\n")
    frames += framer.feed(b"\n<3>line two\n6")
    frames += framer.feed(b" <4>abcextra")
    frames += framer.close()
    assert frames == [
        (b"<1>1 - - - - -", None),
        (b"<2>line one", None),
        (b"<3>line two", None),
        (b"<4>abc", None),
        (b"extra", None),
    ]


def test_framer_bounds_oversized_frames_and_resynchronizes() -> None:
    framer = _Framer(limit=480)
    frames = framer.feed(b"9999 <" + b"x" * 4999)
    frames += framer.feed(b"x" * 4999 + b"<5>ok\n" + b"y" * 600)
    frames += framer.feed(b"yyy\n<6>fine\n")
    assert frames == [
        (b"", "frame of 9999 bytes exceeds 480"),
        (b"<5>ok", None),
        (b"y" * 480, "message exceeds 480 bytes"),
        (b"<6>fine", None),
    ]


def test_framer_ends_a_message_at_a_nul_as_at_a_line_feed() -> None:
    # Python's SysLogHandler over TCP ends each message with a NUL and no line feed: they were
    # read as one line, over the limit at 1 KiB, the rest up to a line feed thrown away
    framer = _Framer(limit=480)
    frames = framer.feed(b"".join(b"<14>record %d\x00" % i for i in range(300)))
    frames += framer.feed(b"<14>and a line\n<14>last\x00")
    assert frames == [
        *((b"<14>record %d" % i, None) for i in range(300)),
        (b"<14>and a line", None),
        (b"<14>last", None),
    ]
    too_long = framer.feed(b"<14>" + b"x" * 600 + b"\x00<14>after\x00")
    assert too_long == [(b"<14>" + b"x" * 476, "message exceeds 480 bytes"), (b"<14>after", None)]


def test_a_line_starting_with_a_number_is_no_octet_count() -> None:
    # "3000 records exported" (no PRI) was taken for the count of a 3,000-byte frame: the
    # messages after it were swallowed, or merged into one dead letter
    framer = _Framer(limit=1024)
    frames = framer.feed(b"<14>NUM-0\n3000 records exported\n")
    frames += framer.feed(b"".join(b"<14>NUM-%d\n" % i for i in range(1, 101)))
    frames += framer.feed(b"12 records\n11")
    frames += framer.feed(b" ")
    frames += framer.feed(b"<14>counted")
    assert frames == [
        (b"<14>NUM-0", None),
        (b"3000 records exported", None),  # then "missing PRI", its own dead letter
        *((b"<14>NUM-%d" % i, None) for i in range(1, 101)),
        (b"12 records", None),
        (b"<14>counted", None),
    ]


def test_a_message_of_the_limits_size_split_inside_its_crlf_is_whole() -> None:
    # fed in two reads, between the "\r" and the "\n", it was "message exceeds 480 bytes"
    message = b"<14>" + b"x" * 476
    framer = _Framer(limit=480)
    assert framer.feed(message + b"\r") == []
    assert framer.feed(b"\n<14>next\n") == [(message, None), (b"<14>next", None)]


def test_a_frame_cut_short_by_the_connection_says_so() -> None:
    framer = _Framer(limit=1024)
    assert framer.feed(b"100 <14>only part") == []
    assert framer.close() == [
        (b"<14>only part", "the connection closed 13 bytes into a 100-byte frame")
    ]


def _spec(port: int, **extra: Any) -> dict[str, Any]:
    return {"name": "syslog", "type": "syslog", "port": port, **extra}


async def test_udp_and_tcp_messages_become_events(database_dsn: str) -> None:
    port = free_port()
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "syslog", recorder)
        async with running(build_source(_spec(port)), ctx):
            _, writer = await _connect(port)
            writer.write(b"<13>Feb  5 17:32:18 web1 nginx[7]: GET /\n")
            writer.write(b"%d %s" % (len(RFC5424), RFC5424))
            await writer.drain()
            await recorder.wait_for(2)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"<11>1 - h app - - - over udp", ("127.0.0.1", port))
                await recorder.wait_for(3)
                # rsyslog's forwarding format: its RFC 3339 time is the event's
                forwarded = b"<13>2026-12-05T21:00:00.123+01:00 web1 app: m"
                udp.sendto(forwarded, ("127.0.0.1", port))
                await recorder.wait_for(4)
            writer.close()
    tcp1, tcp2, udp_event, forwarded_event = recorder.events
    assert forwarded_event["time"] == "2026-12-05T21:00:00.123+01:00"
    assert tcp1["type"] == "eventbus.syslog.message"
    assert tcp1["source"] == "urn:eventbus:source:syslog"
    assert tcp1["subject"] == "nginx"
    assert tcp1["data"]["hostname"] == "web1"
    assert tcp1["data"]["transport"] == "tcp"
    assert tcp1["data"]["peer"].startswith("127.0.0.1:")
    assert tcp2["time"] == "2003-10-11T22:14:15.003Z"
    assert tcp2["data"]["structured_data"]["examplePriority@32473"] == {"class": "high"}
    assert udp_event["data"]["message"] == "over udp"
    assert udp_event["data"]["transport"] == "udp"


async def test_datagrams_the_kernel_dropped_are_counted(database_dsn: str) -> None:
    # Only the in-process queue's drops were counted: 17,864 of 20,000 datagrams lost to a
    # full socket buffer showed errors 0.
    port = free_port()
    recorder = Recorder()
    spec = _spec(port, protocols=["udp"], udp_receive_buffer=4096)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "syslog", recorder)
        async with running(build_source(spec), ctx):
            await asyncio.sleep(0.2)  # bound
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                # sent without a turn of the loop: nothing is read meanwhile
                for i in range(300):
                    udp.sendto(b"<11>1 - h app - - - burst %d" % i, ("127.0.0.1", port))

            async def counted() -> bool:
                return "dropped by the kernel" in (ctx.status.last_error or "")

            await eventually(counted, within=10, what="the kernel's drops in the status")
            await recorder.wait_for(1)
    assert len(recorder.events) + ctx.status.errors == 300


async def test_unparseable_messages_are_dead_lettered_and_stream_continues(
    database_dsn: str,
) -> None:
    recorder = Recorder()
    async with _over_tcp(database_dsn, recorder) as (pool, _, _, writer):
        writer.write(b"garbage without pri\n<14>fine after garbage\n")
        await writer.drain()
        await recorder.wait_for(1)
        [letter] = await dead_letters(pool, "syslog")
    assert bytes(letter["payload"]) == b"garbage without pri"
    assert "missing PRI" in letter["error"]
    assert '"transport": "tcp"' in letter["meta"]
    assert recorder.events[0]["data"]["message"] == "fine after garbage"


async def test_messages_no_event_attribute_can_hold_as_sent_are_kept(database_dsn: str) -> None:
    # A timestamp Python reads that is no RFC 3339 time (no offset), an APP-NAME with a control
    # character: building the event raised out of the receiver, losing the TCP connection's
    # next messages (and over UDP the queued datagrams), nothing dead-lettered.
    port = free_port()
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "syslog", recorder)
        async with running(build_source(_spec(port)), ctx):
            _, writer = await _connect(port)
            writer.write(b"<34>1 2003-10-11T22:14:15 host app - - - no offset\n")
            writer.write(b"<34>1 - host a\x01pp - - - control\n<14>fine after\n")
            await writer.drain()
            await recorder.wait_for(3)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"<34>1 2003-10-11 host app - - - a date", ("127.0.0.1", port))
                udp.sendto(b"<11>1 - h app - - - next", ("127.0.0.1", port))
                await recorder.wait_for(5)
            writer.close()
        assert await dead_letters(pool, "syslog") == []
    no_offset, control, fine, date, following = recorder.events
    assert no_offset["data"]["timestamp"] == "2003-10-11T22:14:15"
    assert not no_offset["time"].startswith("2003")  # the time received
    assert "subject" not in control and control["data"]["app"] == "a\x01pp"
    assert fine["data"]["message"] == "fine after"
    assert date["data"]["timestamp"] == "2003-10-11"
    assert following["data"]["message"] == "next"


async def test_bus_down_holds_the_message_and_retries(database_dsn: str) -> None:
    recorder = Recorder()
    recorder.down = True
    async with _over_tcp(database_dsn, recorder) as (_, ctx, _, writer):
        writer.write(b"<14>one\n<14>two\n")
        await writer.drain()
        await recorder.wait_refused(2)
        assert ctx.status.state == "backoff"
        recorder.down = False
        await recorder.wait_for(2)
        await eventually(lambda: _running(ctx))
    assert [e["data"]["message"] for e in recorder.events] == ["one", "two"]


async def test_a_stop_with_a_connection_open_logs_no_traceback(
    database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio logged "Exception in callback ... CancelledError" with its traceback at every
    # stop while a forwarder (rsyslog) held its connection open.
    recorder = Recorder()
    async with _over_tcp(database_dsn, recorder, stop_first=True) as (_, _, reader, writer):
        writer.write(b"<14>sent\n<14>held open, partial")
        await writer.drain()
        await recorder.wait_for(1)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the stop
    writer.close()
    await asyncio.sleep(0.1)  # the loop's callbacks of the ended connection run
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_tcp_connections_past_max_connections_are_closed(database_dsn: str) -> None:
    # Idle connections had no bound: enough of them took every file descriptor of the
    # process, and its HTTP and other sources with it.
    port = free_port()
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "syslog", recorder)
        spec = _spec(port, protocols=["tcp"], max_connections=2)
        async with running(build_source(spec), ctx):
            _, first = await _connect(port)
            _, second = await _connect(port)
            for n, writer in enumerate((first, second)):
                writer.write(b"<14>held %d\n" % n)
                await writer.drain()
            await recorder.wait_for(2)  # both connections are the source's
            assert await _held(port) is None  # a third is closed at once
            assert "max_connections" in (ctx.status.last_error or "")
            first.close()
            fourth = await eventually(lambda: _held(port), what="room for a connection again")
            fourth.write(b"<14>after\n")
            await fourth.drain()
            await recorder.wait_for(3)
            second.close()
            fourth.close()
    assert sorted(e["data"]["message"] for e in recorder.events) == ["after", "held 0", "held 1"]


async def _held(port: int) -> asyncio.StreamWriter | None:
    """A connection to ``port`` the listener keeps (nothing read from it for 0.3 s), or None
    when it closes it at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(0.3):
            await reader.read()
    except TimeoutError:
        return writer
    writer.close()
    return None


async def _running(ctx: Any) -> bool:
    return bool(ctx.status.state == "running")


@contextlib.asynccontextmanager
async def _over_tcp(
    database_dsn: str, recorder: Recorder, *, stop_first: bool = False
) -> AsyncIterator[tuple[asyncpg.Pool, SourceContext, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP-only syslog source publishing to ``recorder``, and a connection to it, closed
    before the source stops (with ``stop_first``, left to the caller to close)."""
    port = free_port()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "syslog", recorder)
        async with running(build_source(_spec(port, protocols=["tcp"])), ctx):
            reader, writer = await _connect(port)
            try:
                yield pool, ctx, reader, writer
            finally:
                if not stop_first:
                    writer.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect once the source is listening (it binds right after its task starts)."""

    async def connected() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return None

    return await eventually(connected, within=5, every=0.01, what=f"a listener on port {port}")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"port": 70000}, "field 'port'"),
        ({"protocols": []}, "field 'protocols'"),
        ({"protocols": ["sctp"]}, "field 'protocols.0'"),
        ({"max_message_bytes": 10}, "field 'max_message_bytes'"),
        ({"udp_receive_buffer": 10}, "field 'udp_receive_buffer'"),
        ({"listen": "0.0.0.0"}, "field 'listen'"),
    ],
)
def test_bad_settings_name_the_field(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_source({**_spec(5514), **extra})
