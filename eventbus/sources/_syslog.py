"""The ``syslog`` source: a syslog receiver whose messages become events.

    UDP datagram ─────────────┐
    TCP stream ─> _Framer ────┴─> parse_syslog (RFC 5424 or RFC 3164) ─> ctx.emit
                                   └─ unparseable ─> source_dead_letters

TCP frames are octet-counted (``<len> <msg>``) or newline-terminated, detected per frame as
RFC 6587 describes. Each TCP connection is handled in order and reads nothing more until its
current message is on the bus, so a slow or unavailable bus pushes back on the sender instead
of piling up in memory. UDP cannot push back: datagrams wait in a bounded queue, and when it is
full they are dropped and counted in ``status.errors`` (syslog over UDP is lossy by design), as
are those the kernel dropped because the socket's receive buffer was full (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import uuid
from datetime import datetime
from typing import Any, Literal

import pydantic

from eventbus._errors import BusError, CloudEventError, EventTooLargeForBus, StoreError
from eventbus.cloudevents import as_attribute, new_event
from eventbus.config import SourceSpec
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff

__all__ = ["SyslogSource", "SyslogSourceSpec", "parse_syslog"]

_FACILITIES = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
]
_SEVERITIES = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]

_PRI = re.compile(r"<(\d{1,3})>")
# The BSD header's timestamp as senders write it: "Mmm dd hh:mm:ss" (RFC 3164), with a
# fraction of a second or a year (rsyslog's high-precision and Cisco's formats), or RFC 3339
# (rsyslog's forwarding format, RSYSLOG_ForwardFormat): that one was read as an app named
# "2026-12-05T21" and the rest of the header as the message.
_RFC3164_TIMESTAMP = (
    r"[A-Z][a-z]{2} (?:[ \d]\d|\d)(?: \d{4})? \d\d:\d\d:\d\d(?:\.\d+)?"
    r"|\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)?"
)
# RFC 5424's VERSION is known by what follows it, a TIMESTAMP or "-": a header-less message
# whose text starts with a number ("<14>3 files uploaded", as Python's SysLogHandler sends)
# was read as version 3 and dead-lettered.
_RFC5424_VERSION = re.compile(r"([1-9]\d?) (?=- |\d{4}-\d\d-\d\d)")
_RFC3164_HEADER = re.compile(rf"({_RFC3164_TIMESTAMP}) (\S+) ?(.*)", re.DOTALL)
_RFC3164_TAG = re.compile(r"([^\s:\[\]]{1,48})(?:\[([^\]\s]{1,128})\])?: ?(.*)", re.DOTALL)
# An octet count (RFC 6587) is digits and a space before the message's PRI: a line without a
# PRI that began "3000 records exported" was taken for the count of a 3,000-byte frame, and the
# messages after it were swallowed.
_OCTET_COUNT = re.compile(rb"(\d{1,10}) (?=<)")
# A message without an octet count ends at a line feed or a NUL: Python's SysLogHandler ends
# each message over TCP with a NUL alone, and all of them were read as one line.
_TRAILER = re.compile(rb"[\n\x00]")
_COUNT_ARRIVING = re.compile(rb"\d{1,10} ?")
_UDP_QUEUE = 10_000
_DROPS_EVERY = 2.0  # seconds between reads of the kernel's drop count


def _invalid(detail: str) -> CloudEventError:
    return CloudEventError(detail, title="Invalid syslog message")


def _nil(value: str) -> str | None:
    return None if value == "-" else value


def _parse_sd(text: str) -> tuple[dict[str, dict[str, str]], str]:
    """Parse RFC 5424 STRUCTURED-DATA at the start of ``text``; return it and the rest."""
    if text.startswith("-"):
        return {}, text[1:]
    if not text.startswith("["):
        raise _invalid("STRUCTURED-DATA must be '-' or start with '['")
    elements: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(text) and text[i] == "[":
        end = i + 1
        while end < len(text) and text[end] not in " ]":
            end += 1
        sd_id = text[i + 1 : end]
        if not sd_id or any(c in sd_id for c in '="'):
            raise _invalid(f"invalid SD-ID {sd_id!r}")
        params: dict[str, str] = {}
        i = end
        while i < len(text) and text[i] == " ":
            eq = text.find('="', i + 1)
            if eq < 0:
                raise _invalid(f'SD element {sd_id!r}: expected name="value"')
            name = text[i + 1 : eq]
            value: list[str] = []
            j = eq + 2
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and j + 1 < len(text) and text[j + 1] in '"\\]':
                    j += 1
                value.append(text[j])
                j += 1
            if j >= len(text):
                raise _invalid(f"SD element {sd_id!r}: unterminated value of {name!r}")
            params[name] = "".join(value)
            i = j + 1
        if i >= len(text) or text[i] != "]":
            raise _invalid(f"SD element {sd_id!r}: missing ']'")
        elements[sd_id] = params
        i += 1
    return elements, text[i:]


def _rfc5424(fields: dict[str, Any], rest: str) -> None:
    parts = rest.split(" ", 5)
    if len(parts) < 6:
        raise _invalid("RFC 5424 header needs TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD")
    timestamp, hostname, app, procid, msgid, tail = parts
    if timestamp != "-":
        try:
            datetime.fromisoformat(timestamp)
        except ValueError as exc:
            raise _invalid(f"invalid TIMESTAMP {timestamp!r}") from exc
    sd, message = _parse_sd(tail)
    if message and not message.startswith(" "):
        raise _invalid("STRUCTURED-DATA must be followed by a space before MSG")
    fields.update(
        format="rfc5424",
        timestamp=_nil(timestamp),
        hostname=_nil(hostname),
        app=_nil(app),
        procid=_nil(procid),
        msgid=_nil(msgid),
        structured_data=sd,
        message=message[1:].removeprefix("\ufeff"),
    )


def _rfc3164(fields: dict[str, Any], rest: str) -> None:
    # RFC 3164 is a description of practice, not a grammar: take what is there.
    fields.update(format="rfc3164", timestamp=None, hostname=None, app=None, procid=None)
    fields.update(msgid=None, structured_data={})
    header = _RFC3164_HEADER.fullmatch(rest)
    content = rest
    if header is not None:
        fields["timestamp"], host, content = header.groups()
        if _RFC3164_TAG.fullmatch(f"{host} {content}") and (host.endswith(":") or "[" in host):
            # No HOSTNAME (local senders often leave it out): the word is the TAG
            content = f"{host} {content}" if content else host
        else:
            fields["hostname"] = host
    tag = _RFC3164_TAG.fullmatch(content)
    if tag is not None:
        fields["app"], fields["procid"], content = tag.groups()
    fields["message"] = content


def parse_syslog(raw: bytes) -> dict[str, Any]:
    """Parse one syslog message (RFC 5424, else RFC 3164) into a JSON-ready dict.

    Keys: format, facility, facility_name, severity, severity_name, version, timestamp (as
    sent), hostname, app, procid, msgid, structured_data ({SD-ID: {name: value}}), message;
    absent (NILVALUE) fields are None. Raises CloudEventError when there is no valid PRI or an
    RFC 5424 message is malformed.
    """
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n\x00")
    pri = _PRI.match(text)
    if pri is None:
        raise _invalid("missing PRI: a syslog message starts with '<0..191>'")
    value = int(pri.group(1))
    if value > 191:
        raise _invalid(f"PRI {value} is out of range 0..191")
    rest = text[pri.end() :]
    fields: dict[str, Any] = {
        "facility": value // 8,
        "facility_name": _FACILITIES[value // 8],
        "severity": value % 8,
        "severity_name": _SEVERITIES[value % 8],
        "version": None,
    }
    version = _RFC5424_VERSION.match(rest)
    if version is not None:
        fields["version"] = int(version.group(1))
        _rfc5424(fields, rest[version.end() :])
    else:
        _rfc3164(fields, rest)
    return fields


class _Framer:
    """Splits a TCP byte stream into syslog frames (RFC 6587), bounded by ``limit`` bytes.

    ``feed`` returns (frame, error) pairs: error is None for a good frame, or says why the
    frame was cut (its payload is then what was kept, possibly empty).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._skip = 0
        self._skip_line = False

    def feed(self, data: bytes) -> list[tuple[bytes, str | None]]:
        self._buf += data
        frames: list[tuple[bytes, str | None]] = []
        # Each pass consumes a frame or stops for more input: bounded by the buffer's length.
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return frames
            if self._skip_line:
                trailer = _TRAILER.search(self._buf)
                if trailer is None:
                    self._buf.clear()
                    return frames
                del self._buf[: trailer.end()]
                self._skip_line = False
            del self._buf[: len(self._buf) - len(self._buf.lstrip(b"\r\n\x00"))]
            if not self._buf:
                return frames
            count = _OCTET_COUNT.match(self._buf)
            if count is not None:
                size = int(count.group(1))
                if size > self._limit:
                    del self._buf[: count.end()]
                    self._skip = size
                    frames.append((b"", f"frame of {size} bytes exceeds {self._limit}"))
                    continue
                if len(self._buf) < count.end() + size:
                    return frames
                frames.append((bytes(self._buf[count.end() : count.end() + size]), None))
                del self._buf[: count.end() + size]
                continue
            if _COUNT_ARRIVING.fullmatch(self._buf):
                return frames  # an octet count still arriving, or its space
            trailer = _TRAILER.search(self._buf)
            if trailer is None:
                # a last "\r" may be the start of the CRLF after a message of the limit's size
                if len(self._buf) - self._buf.endswith(b"\r") > self._limit:
                    frames.append((bytes(self._buf[: self._limit]), self._too_long()))
                    self._buf.clear()
                    self._skip_line = True
                return frames
            frame = bytes(self._buf[: trailer.start()]).rstrip(b"\r")
            del self._buf[: trailer.end()]
            if len(frame) > self._limit:
                frames.append((frame[: self._limit], self._too_long()))
            else:
                frames.append((frame, None))

    def close(self) -> list[tuple[bytes, str | None]]:
        """The last frame of a stream that ended without a newline; an octet-counted frame
        cut short by the end is an error saying so (it was "missing PRI", the count read as
        the message's start)."""
        rest = bytes(self._buf).strip(b"\r\n\x00")
        self._buf.clear()
        if not rest or self._skip or self._skip_line:
            return []
        count = _OCTET_COUNT.match(rest)
        if count is not None:
            size, got = int(count.group(1)), len(rest) - count.end()
            return [
                (rest[count.end() :], f"the connection closed {got} bytes into a {size}-byte frame")
            ]
        return [(rest, None)]

    def _too_long(self) -> str:
        return f"message exceeds {self._limit} bytes"


class SyslogSourceSpec(SourceSpec):
    """Settings of a ``type: syslog`` source."""

    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=5514, ge=1, le=65535)
    protocols: tuple[Literal["udp", "tcp"], ...] = pydantic.Field(
        default=("udp", "tcp"), min_length=1
    )
    max_message_bytes: int = pydantic.Field(default=64 * 1024, ge=480, le=1024 * 1024)
    udp_receive_buffer: int = pydantic.Field(default=4 * 1024 * 1024, ge=4096, le=256 * 1024 * 1024)
    """SO_RCVBUF of the UDP socket (the kernel caps it at net.core.rmem_max)."""
    max_connections: int = pydantic.Field(default=1000, ge=1, le=100_000)
    """TCP connections held at once; one past them is closed as it comes (idle connections
    without a bound took every file descriptor of the process: its HTTP, the other sources)."""


def _udp_socket(host: str, port: int, buffer: int) -> socket.socket:
    """The bound UDP socket, its receive buffer asked for ``buffer`` bytes."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for ``sock`` (its receive buffer full), from Linux's
    /proc/net/udp and udp6; None where they cannot be read."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle, None)  # the header
                for line in handle:
                    fields = line.split()
                    if len(fields) > 12 and fields[9] == inode:
                        return int(fields[12])
        except (OSError, ValueError):
            continue
    return None


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[tuple[bytes, str]], ctx: SourceContext) -> None:
        self._queue = queue
        self._ctx = ctx

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self._queue.put_nowait((data, f"{addr[0]}:{addr[1]}"))
        except asyncio.QueueFull:
            self._ctx.status.errors += 1
            self._ctx.status.last_error = "UDP queue full: datagram dropped"


class SyslogSource:
    """Receives syslog over UDP and/or TCP; see the module docstring for the guarantees."""

    def __init__(self, config: SyslogSourceSpec) -> None:
        self.name = config.name
        self.type = config.type
        self.config = config

    async def run(self, ctx: SourceContext) -> None:
        """Listen until cancelled. Raises OSError when the address cannot be bound (the runner
        retries); bus and database failures are retried per message with backoff."""
        cfg = self.config
        connections: set[asyncio.Task[Any]] = set()

        full = False  # said once for each time the connections reach max_connections
        closing = False  # the source stops: its connections are cancelled

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal full
            task = asyncio.current_task()
            assert task is not None
            if len(connections) >= cfg.max_connections:
                writer.close()
                ctx.status.errors += 1
                ctx.status.last_error = (
                    f"TCP connection refused: {cfg.max_connections} connections"
                    " (max_connections) are open"
                )
                if not full:
                    ctx.logger.warning("syslog %s: %s", self.name, ctx.status.last_error)
                full = True
                return
            connections.add(task)
            try:
                await self._connection(ctx, reader, writer)
            except asyncio.CancelledError:
                if not closing:
                    raise
                # Ended by the source's own stop: a task the server made that ends cancelled
                # is logged as an ERROR with its traceback by asyncio (Python 3.11's
                # start_server asks it for its exception), at every stop while a forwarder
                # holds a connection open.
                writer.close()
            finally:
                connections.discard(task)
                if len(connections) < cfg.max_connections * 0.9:
                    full = False  # said again only once it has room again, not per churn

        async with contextlib.AsyncExitStack() as stack:
            waiters: list[asyncio.Future[Any]] = []
            if "tcp" in cfg.protocols:
                server = await asyncio.start_server(on_connection, cfg.host, cfg.port)
                stack.push_async_callback(server.wait_closed)
                stack.callback(server.close)
                waiters.append(asyncio.ensure_future(server.serve_forever()))
            if "udp" in cfg.protocols:
                queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue(_UDP_QUEUE)
                sock = _udp_socket(cfg.host, cfg.port, cfg.udp_receive_buffer)
                transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: _Datagrams(queue, ctx), sock=sock
                )
                stack.callback(transport.close)
                waiters.append(asyncio.ensure_future(self._drain_udp(ctx, queue)))
                waiters.append(asyncio.ensure_future(self._watch_drops(ctx, sock)))
            try:
                await asyncio.gather(*waiters)
            finally:
                # Open connections are not the server's to end (Python 3.11): end them here.
                closing = True
                pending = [*waiters, *connections]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _watch_drops(self, ctx: SourceContext, sock: socket.socket) -> None:
        """Count the datagrams the kernel dropped (the socket's buffer full before eventbus
        read them) in the status: only the in-process queue's were (17,864 of 20,000 were lost
        with errors 0 in a review's burst)."""
        seen = await asyncio.to_thread(_kernel_drops, sock)
        if seen is None:
            return  # not Linux: nothing to read
        while True:
            await asyncio.sleep(_DROPS_EVERY)
            now = await asyncio.to_thread(_kernel_drops, sock)
            if now is not None and now > seen:
                ctx.status.errors += now - seen
                ctx.status.last_error = (
                    f"{now - seen} UDP datagrams dropped by the kernel (receive buffer full)"
                )
                ctx.logger.warning("syslog %s: %s", self.name, ctx.status.last_error)
                seen = now

    async def _drain_udp(self, ctx: SourceContext, queue: asyncio.Queue[tuple[bytes, str]]) -> None:
        while True:
            data, peer = await queue.get()
            limit = self.config.max_message_bytes
            error = f"message exceeds {limit} bytes" if len(data) > limit else None
            await self._handle(ctx, data[:limit], peer, "udp", error)

    async def _connection(
        self, ctx: SourceContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        framer = _Framer(self.config.max_message_bytes)
        try:
            # Ends when the peer closes the connection (read returns b"").
            while data := await reader.read(65536):
                for frame, error in framer.feed(data):
                    await self._handle(ctx, frame, peer, "tcp", error)
            for frame, error in framer.close():
                await self._handle(ctx, frame, peer, "tcp", error)
        except ConnectionError as exc:
            ctx.logger.info("syslog connection from %s ended: %s", peer, exc)
        finally:
            writer.close()

    async def _handle(
        self, ctx: SourceContext, raw: bytes, peer: str, transport: str, error: str | None
    ) -> None:
        """Publish one message, or dead-letter it; retried until one of them succeeds."""
        event: dict[str, Any] | None = None
        if error is None:
            try:
                data = parse_syslog(raw)
            except CloudEventError as exc:
                error = exc.detail
            else:
                try:
                    event = self._event(ctx, data, peer, transport)
                except CloudEventError as exc:  # it raised out of the receiver: messages lost
                    error = exc.detail
        backoff = Backoff(ctx.clock, initial=0.1, maximum=5.0)
        # Bounded by cancellation: the message is never given up while the bus is down.
        while True:
            try:
                if event is not None:
                    await ctx.emit(event)
                else:
                    meta = {"peer": peer, "transport": transport}
                    # a datagram past the dead-letter rate is counted, not waited for: one
                    # sender's garbage held up every sender's messages behind it
                    lossy = transport == "udp"
                    await ctx.dead_letter(raw, error or "unparseable", meta, lossy=lossy)
                return
            except EventTooLargeForBus as exc:  # never passes: kept aside instead
                event, error = None, str(exc)
            except (BusError, StoreError) as exc:
                ctx.report_error(exc)
                await backoff.wait()

    def _event(
        self, ctx: SourceContext, data: dict[str, Any], peer: str, transport: str
    ) -> dict[str, Any]:
        now = ctx.clock.now()
        attributes: dict[str, Any] = {
            "type": "eventbus.syslog.message",
            "source": f"urn:eventbus:source:{self.name}",
            # a control character: no attribute (data keeps the field)
            "subject": as_attribute(data["app"] or data["hostname"]),
            "id": str(uuid.uuid4()),
            "data": {**data, "peer": peer, "transport": transport},
            "max_size": ctx.max_event_size,
        }
        stamp = data["timestamp"]
        # RFC 5424's, or RFC 3339 in a BSD header (rsyslog's forwarding format); the BSD
        # "Mmm dd hh:mm:ss" has no year or zone
        if stamp is not None and stamp[:1].isdigit():
            try:
                return new_event(time=stamp, **attributes)
            except CloudEventError:
                # Python reads it but it is no RFC 3339 time (no offset, a bare date): the
                # time received stands in; data keeps the sender's text.
                pass
        return new_event(time=now, **attributes)
