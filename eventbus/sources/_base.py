"""The source framework: what every source plugs into, in front of the bus.

    input (bucket, file, socket, timer, queue)
      -> Source.run(ctx)            a source turns input into CloudEvents
      -> ctx.emit(event)            publishes onto the durable bus (returns once durable)
      -> ctx.checkpoints.put(...)   only then the source records its progress in Postgres

A crash between publish and checkpoint re-emits the same input on restart (at-least-once);
nothing is ever checkpointed before it is on the bus, so nothing is lost. Input that cannot
become an event is kept in ``source_dead_letters`` with its error and never blocks the stream.

Here: the contract (:class:`Source`, :class:`SourceContext`, :class:`SourceStatus`). Around it:
``_checkpoints`` (what sources keep in Postgres), ``_clock`` (time and backoff), ``_runner``
(the registry of source types and the runner).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from eventbus._bucket import TokenBucket
from eventbus._burst import Burst
from eventbus._errors import BusError, StoreError, error_text
from eventbus.cloudevents import DEFAULT_MAX_EVENT_SIZE
from eventbus.sources._checkpoints import Checkpoints
from eventbus.sources._clock import Clock, SystemClock
from eventbus.store import set_aside

__all__ = [
    "MAX_SET_ASIDE",
    "Source",
    "SourceContext",
    "SourceStatus",
    "UnreadablePaths",
    "default_instance_id",
]

MAX_SET_ASIDE = 256 * 1024
"""Bytes of an input kept with its dead letter at most."""
SET_ASIDE_RATE = 100.0
"""Dead letters a source writes per second at most, after a burst of ``SET_ASIDE_BURST``; the
input behind them waits (a TCP sender is pushed back, a UDP one's datagrams dropped and
counted). A syslog port sent garbage wrote 1,700 rows and as many warnings a second."""
SET_ASIDE_BURST = 1000.0
SET_ASIDE_SAID_EVERY = 10.0
"""Seconds between a source's warnings about its dead letters (each names how many more)."""


@dataclass
class SourceStatus:
    """The live state of one source, as ``GET /sources`` shows it."""

    name: str
    type: str
    state: str = "starting"
    events: int = 0
    errors: int = 0
    last_event_at: datetime | None = None
    last_error: str | None = None
    lag: float | int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (datetimes as ISO 8601 strings)."""
        return {
            "name": self.name,
            "type": self.type,
            "state": self.state,
            "events": self.events,
            "errors": self.errors,
            "last_event_at": None if self.last_event_at is None else self.last_event_at.isoformat(),
            "last_error": self.last_error,
            "lag": self.lag,
        }


@dataclass
class SourceContext:
    """Everything a running source may use; built by :class:`SourceRunner` (or a test)."""

    name: str
    publish: Callable[[dict[str, Any]], Awaitable[object]]
    """Returns once the event is durable: True when the bus already held its source+id."""
    pool: asyncpg.Pool
    checkpoints: Checkpoints
    status: SourceStatus
    clock: Clock = field(default_factory=SystemClock)
    instance_id: str = field(default_factory=lambda: default_instance_id())
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("eventbus.sources"))
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE
    """The service's ``max_event_size``: an input making a larger event is dead-lettered."""
    publish_many: Callable[[Sequence[dict[str, Any]]], Awaitable[Sequence[object]]] | None = None
    """Many events in one call, one outcome per event in order: an exception where ``publish``
    would have raised, else the event is durable. None: ``publish`` for each, concurrently."""
    _failure: BaseException | None = field(default=None, init=False, repr=False)
    """What the source backs off from (``report_error``), until it has recovered."""
    _set_aside: TokenBucket = field(
        default_factory=lambda: TokenBucket(SET_ASIDE_RATE, SET_ASIDE_BURST),
        init=False,
        repr=False,
    )
    _said: Burst = field(init=False, repr=False)
    _unkept: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._said = Burst(self._tell, SET_ASIDE_SAID_EVERY)

    async def emit(self, event: dict[str, Any]) -> bool:
        """Publish ``event`` onto the bus and count it.

        Returns once the event is durable: True when the bus already held its source+id (a
        duplicate, stored earlier within the duplicate window). Raises BusUnavailable/BusError
        otherwise, in which case the caller must not acknowledge or checkpoint the input
        behind it. A source that had failed (:meth:`report_error`) has recovered: its
        ``last_error`` is cleared.
        """
        duplicate = await self.publish(event) is True
        self.status.events += 1
        self.status.last_event_at = self.clock.now()
        self.recovered()
        return duplicate

    async def emit_many(self, events: Sequence[dict[str, Any]]) -> list[BaseException | None]:
        """:meth:`emit` for many events at once (a broker's fetched batch): one outcome per
        event, in order: None once it is durable (stored, or a duplicate the bus held), else
        the BusUnavailable/BusError ``emit`` would have raised. Only what is durable is
        counted; the caller must not acknowledge the input behind a failed one."""
        if not events:
            return []
        if self.publish_many is not None:
            got: Sequence[object] = await self.publish_many(events)
        else:
            got = await asyncio.gather(*map(self.publish, events), return_exceptions=True)
        outcomes = [o if isinstance(o, BaseException) else None for o in got]
        stored = outcomes.count(None)
        if stored:
            self.status.events += stored
            self.status.last_event_at = self.clock.now()
            self.recovered()
        return outcomes

    def recovered(self) -> None:
        """The source has done a whole round of its work since it failed (an event published,
        a scan or a timer's turn complete): ``state`` is running, and a failure's
        ``last_error`` is cleared (a quiet source kept it, and showed backoff, until its next
        event, hours later)."""
        if self.status.state == "backoff":
            self.status.state = "running"
        if self._failure is not None:
            self._failure = None
            self.status.last_error = None

    def connected(self) -> None:
        """The source's broker took it (connected, subscribed, consuming): ``state`` is running,
        and a broker failure it backed off from is cleared (``last_error`` kept the old
        connection's error, the source running and quiet, until its next event). A bus or
        database failure stays until an event is published."""
        self.status.state = "running"
        if self._failure is not None and not isinstance(self._failure, (BusError, StoreError)):
            self.recovered()

    async def dead_letter(
        self,
        payload: bytes | str,
        error: str,
        meta: Mapping[str, Any] | None = None,
        *,
        lossy: bool = False,
    ) -> None:
        """Keep input that could not become an event, with its error (``source_dead_letters``):
        its first ``MAX_SET_ASIDE`` bytes, and ``size`` (its length) in ``meta`` when it was
        longer (a 32 MiB MQTT message was kept whole, in memory and in the table). At most
        ``SET_ASIDE_RATE`` a second: past it the caller waits, or with ``lossy`` (input that
        may be lost anyway: a datagram) the input is counted in ``errors`` and not kept, so
        that one sender's garbage holds up no other sender's messages.

        Raises StoreError when the row could not be written; the caller must then not skip the
        input.
        """
        raw = payload.encode() if isinstance(payload, str) else payload
        if len(raw) > MAX_SET_ASIDE:
            meta = {**(meta or {}), "size": len(raw), "kept": MAX_SET_ASIDE}
            raw = raw[:MAX_SET_ASIDE]
        if not self._set_aside.take():
            if lossy:
                self.status.errors += 1
                self.status.last_error = error
                self._unkept += 1
                self._say(error)
                return
            await self._turn()
        await set_aside(self.pool, self.name, raw, error, meta)
        if isinstance(self._failure, StoreError):
            # the database it backed off from took this row: recovered (a hiccup while writing
            # one left it in backoff until its next event); a bus still down is not
            self.recovered()
        self.status.errors += 1
        self.status.last_error = error
        self._say(error)

    def _say(self, error: str) -> None:
        """Warn of a dead letter, once in ``SET_ASIDE_SAID_EVERY`` s with how many more came:
        those are told at the end of the period (after a burst, the one warning said nothing
        of the 1,499 that followed it) or when the source stops (:meth:`flush_warnings`)."""
        self._said(error)

    def _tell(self, error: str, more: int) -> None:
        parts = []
        if more:
            parts.append(f"and {more} more since the last warning")
        if self._unkept:
            parts.append(f"{self._unkept} not kept: over {self._set_aside.rate:g} a second")
        said = f" ({'; '.join(parts)})" if parts else ""
        self.logger.warning("source %s: dead-lettered input: %s%s", self.name, error, said)
        self._unkept = 0

    def flush_warnings(self) -> None:
        """The source stops: what its warnings counted and did not tell yet is told now."""
        self._said.flush()

    async def _turn(self) -> None:
        """Wait for a dead letter's place within ``SET_ASIDE_RATE``."""
        while True:
            if self._set_aside.take():
                return
            await asyncio.sleep(self._set_aside.wait())

    def report_error(self, exc: BaseException) -> None:
        """Record a transient failure the source is about to back off from."""
        self.status.state = "backoff"
        self.status.errors += 1
        self.status.last_error = error_text(exc)
        self._failure = exc
        self.logger.warning("source %s: %s", self.name, self.status.last_error)


def default_instance_id() -> str:
    """A process-unique id: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Source(Protocol):
    """A running source. ``run`` returns only when cancelled (or raises)."""

    name: str
    type: str

    async def run(self, ctx: SourceContext) -> None: ...


class UnreadablePaths:
    """Matching paths a file source skips because they cannot be read (a symlink loop, no
    permission): that file, not the whole scan. Each is warned about once."""

    def __init__(self, log: logging.Logger, source: str) -> None:
        self._log = log
        self._source = source
        self._seen: set[str] = set()

    def skip(self, path: str, exc: OSError) -> None:
        if path not in self._seen:
            self._seen.add(path)
            self._log.warning(
                "%s: skipping %s: %s", self._source, _shown(path), exc.strerror or exc
            )

    def named(self, path: str) -> bool:
        """Whether ``path`` is UTF-8 text, as every event and checkpoint that names it must be;
        one that is not (the OS hands it over with surrogates) is skipped, warned about once.
        It stopped the source for good: each scan failed on it, and no other file got
        through until it was removed."""
        try:
            path.encode()
        except UnicodeEncodeError:
            if path not in self._seen:
                self._seen.add(path)
                self._log.warning(
                    "%s: skipping %s: its name is not UTF-8, which no event can carry; rename it",
                    self._source,
                    _shown(path),
                )
            return False
        return True


def _shown(path: str) -> str:
    """``path`` as a log line can hold it: bytes that are not UTF-8 as ``\\xNN``."""
    return path.encode(errors="surrogateescape").decode(errors="backslashreplace")
