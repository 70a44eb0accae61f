"""What the router does with each event, for watchers (the console's live stream).

:class:`LiveFeed` is the in-process fan-out: ``publish`` never waits and never raises; each
watcher has a bounded queue, and one that does not keep up loses items (counted for it) rather
than slowing the router.

:class:`PeerFeed` joins the feeds of the workers of one ``eventbus serve --workers N``, so
that a watcher connected to any worker sees the events every worker routes. Each worker
listens on a Unix socket named by its pid in a directory the workers share (made by their
parent, private to the user). A worker with watchers connects to every other worker's socket
(again every ``rescan`` seconds, for a worker that restarted); a worker with a connection
sends it what its router does, as length-prefixed JSON frames written in batches. A worker
nobody watches gets no connection and sends nothing. The sender drops items (counted in
``eventbus_live_dropped_total``) when a connection's unsent bytes pass a bound, so a slow
watcher never slows a router.

    worker A router ─> A's LiveFeed ─> A's watchers
                                    └> a sink per subscriber ─ Unix socket ─> B's LiveFeed
                                                                              ─> B's watchers
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from eventbus import metrics
from eventbus._tasks import cancel_and_wait, wait_event

__all__ = ["LiveFeed", "PeerFeed", "Routed", "Watcher"]

log = logging.getLogger("eventbus.router")

_HELLO = b"\x01"  # a subscriber's sign that its sink is in place: items from now on arrive
_FLUSH = 0.005  # seconds a sink gathers frames before writing them in one go
_MAX_FRAME = 64 * 1024 * 1024  # bytes: a longer frame means a broken peer


@dataclass(frozen=True, slots=True)
class Routed:
    """What the router did with one event, as watchers see it: ``state`` is ``routing`` when
    its rules matched and its deliveries started, then (a second item) ``delivered``,
    ``retrying`` or ``dead-lettered``; ``unmatched`` when no rule matched. ``deliveries``
    gives each delivery's (rule, target, state); ``state`` is the worst of them.

    A delivery that ran from the retry schedule and ended (delivered or dead-lettered) is a
    later item of its own: ``received_at`` None (the schedule does not keep it), ``rules``
    and ``deliveries`` that one delivery's, so a watcher updates the event's row with it.
    ``event`` is the router's own dict: read-only."""

    event: dict[str, Any]
    received_at: str | None
    rules: tuple[str, ...]
    state: str
    deliveries: tuple[tuple[str, str, str], ...] = ()


class Watcher:
    """One watcher's bounded queue of the items whose event ``accept`` takes (all without
    one); ``dropped`` counts those it lost by falling behind. ``closed`` is set when the
    service shuts down: the watcher should leave."""

    def __init__(self, size: int, accept: Accept | None = None) -> None:
        self.queue: asyncio.Queue[Routed] = asyncio.Queue(size)
        self.accept = accept
        self.dropped = 0
        self.closed = asyncio.Event()

    async def get(self) -> Routed:
        return await self.queue.get()

    def pending(self, limit: int) -> list[Routed]:
        """Up to ``limit`` items already queued, without waiting."""
        items: list[Routed] = []
        while len(items) < limit and not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


Accept = Callable[[dict[str, Any]], bool]
"""A watcher's filter (an event pattern's ``matches``): applied before its queue, so items it
would not show never take a place in the queue. Runs in ``publish``: must not raise (a
compiled pattern's ``matches`` never does)."""

Sink = Callable[[Routed], None]
"""Takes every item the router publishes; must neither wait nor raise."""


class LiveFeed:
    """Fans routed events out to at most ``max_watchers`` watchers, each with a queue of
    ``per_watcher`` items, and to sinks (other workers' subscriptions). ``publish`` never
    waits and never raises."""

    def __init__(self, *, per_watcher: int = 2000, max_watchers: int = 32) -> None:
        self._per_watcher = per_watcher
        self._max_watchers = max_watchers
        # copy-on-write lists: publish iterates the list it read, untouched by later changes
        self._watchers: list[Watcher] = []
        self._sinks: list[Sink] = []
        self._closed = False
        self.on_watching: Callable[[bool], None] | None = None
        """Called with True when the first watcher arrives, False when the last leaves."""

    @property
    def watched(self) -> bool:
        return bool(self._watchers) or bool(self._sinks)

    @contextmanager
    def watch(self, accept: Accept | None = None) -> Iterator[Watcher]:
        """A new watcher for the block's duration, of the items whose event ``accept``
        takes (all without one). Raises OverflowError when ``max_watchers`` already watch:
        each costs the router a queue put (and a filter call) per event."""
        if len(self._watchers) >= self._max_watchers:
            raise OverflowError(f"{self._max_watchers} watchers already: try again later")
        watcher = Watcher(self._per_watcher, accept)
        if self._closed:
            watcher.closed.set()
        self._watchers = [*self._watchers, watcher]
        if len(self._watchers) == 1 and self.on_watching is not None:
            self.on_watching(True)
        try:
            yield watcher
        finally:
            self._watchers = [w for w in self._watchers if w is not watcher]
            if not self._watchers and self.on_watching is not None:
                self.on_watching(False)

    def publish(self, item: Routed) -> None:
        """Hand ``item`` to this process's watchers and to the sinks."""
        self.deliver(item)
        for sink in self._sinks:
            sink(item)

    def deliver(self, item: Routed) -> None:
        """Hand ``item`` (routed here or by another worker) to this process's watchers."""
        for watcher in self._watchers:
            if watcher.accept is not None and not watcher.accept(item.event):
                continue
            try:
                watcher.queue.put_nowait(item)
            except asyncio.QueueFull:
                watcher.dropped += 1

    def add_sink(self, sink: Sink) -> None:
        self._sinks = [*self._sinks, sink]

    def remove_sink(self, sink: Sink) -> None:
        self._sinks = [s for s in self._sinks if s is not sink]

    def close(self) -> None:
        """The service is shutting down: tell every watcher, now and later, to leave (an
        open stream would otherwise hold the HTTP server's shutdown)."""
        self._closed = True
        for watcher in self._watchers:
            watcher.closed.set()


def _frame(item: Routed) -> bytes:
    body = orjson.dumps(
        (item.received_at, item.rules, item.state, item.event, item.deliveries), default=str
    )
    return len(body).to_bytes(4, "big") + body


def _unframe(body: bytes) -> Routed:
    """The item of one frame's body; ValueError when it is not one."""
    item = orjson.loads(body)
    if not (isinstance(item, list) and len(item) == 5):
        raise ValueError("not a routed item")
    received_at, rules, state, event, deliveries = item
    if not (
        isinstance(received_at, str | None)
        and isinstance(rules, list)
        and isinstance(state, str)
        and isinstance(event, dict)
        and isinstance(deliveries, list)
        and all(isinstance(d, list) and len(d) == 3 for d in deliveries)
    ):
        raise ValueError("not a routed item")
    return Routed(
        event,
        received_at,
        tuple(str(r) for r in rules),
        state,
        tuple((str(rule), str(target), str(s)) for rule, target, s in deliveries),
    )


class _Sink:
    """A subscriber's end in the sending worker: frames gathered for ``_FLUSH`` seconds, then
    written at once; items dropped while ``limit`` bytes wait unsent."""

    def __init__(self, writer: asyncio.StreamWriter, limit: int) -> None:
        self._writer = writer
        self._limit = limit
        self._buffer = bytearray()
        self._flushing: asyncio.TimerHandle | None = None

    def __call__(self, item: Routed) -> None:
        if self._writer.transport.get_write_buffer_size() + len(self._buffer) > self._limit:
            metrics.LIVE_DROPPED.inc()
            return
        try:
            self._buffer += _frame(item)
        except TypeError:  # not JSON (an event the router holds is): never the router's fault
            metrics.LIVE_DROPPED.inc()
            return
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_later(_FLUSH, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        if self._buffer and not self._writer.is_closing():
            self._writer.write(bytes(self._buffer))
        self._buffer.clear()

    def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
        self._writer.close()


class PeerFeed:
    """Joins ``feed`` with the feeds of the other workers listening in ``directory`` (an async
    context manager: listening while inside). ``name`` names this worker's socket (its pid
    by default). See the module docstring."""

    def __init__(
        self,
        feed: LiveFeed,
        directory: Path,
        *,
        name: str | None = None,
        rescan: float = 1.0,
        buffer_limit: int = 4 * 1024 * 1024,
    ) -> None:
        self._feed = feed
        self._dir = directory
        self._name = name or str(os.getpid())
        self._rescan = rescan
        self._buffer_limit = buffer_limit
        self._server: asyncio.AbstractServer | None = None
        self._sinks: set[_Sink] = set()
        self._peers: dict[str, asyncio.Task[None]] = {}  # peer name -> its reader
        self._joiner: asyncio.Task[None] | None = None
        self._joined = asyncio.Event()

    async def __aenter__(self) -> Self:
        path = self._dir / self._name
        path.unlink(missing_ok=True)  # a previous process's of the same pid: it is gone
        self._server = await asyncio.start_unix_server(self._subscribed, path=str(path))
        self._feed.on_watching = self._watching
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._feed.on_watching = None
        for task in self._leave():
            await cancel_and_wait(task)
        if self._server is not None:
            self._server.close()
            for sink in list(self._sinks):
                sink.close()
            await self._server.wait_closed()
        (self._dir / self._name).unlink(missing_ok=True)

    async def joined(self, within: float = 2.0) -> None:
        """Wait (up to ``within`` seconds) until this worker is subscribed to every other
        worker that was listening when its first watcher arrived."""
        await wait_event(self._joined, within)

    # -- the sending side: another worker subscribes ------------------------------------

    async def _subscribed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = _Sink(writer, self._buffer_limit)
        self._sinks.add(sink)
        self._feed.add_sink(sink)
        try:
            writer.write(_HELLO)
            await writer.drain()
            await reader.read()  # nothing comes but the end: the subscriber left
        except OSError:
            pass
        finally:
            self._feed.remove_sink(sink)
            self._sinks.discard(sink)
            sink.close()

    # -- the watching side: subscribe to every other worker ------------------------------

    def _watching(self, active: bool) -> None:
        if active:
            if self._joiner is None:
                self._joiner = asyncio.create_task(self._join(), name="eventbus-live-join")
        else:
            self._leave()

    def _leave(self) -> list[asyncio.Task[None]]:
        """Stop subscribing (at once: a watcher arriving next starts afresh); returns the
        tasks cancelled, for a caller that must wait for them to end."""
        tasks = [t for t in (self._joiner, *self._peers.values()) if t is not None]
        self._joiner = None
        self._joined.clear()
        self._peers.clear()
        for task in tasks:
            task.cancel()
        return tasks

    async def _join(self) -> None:
        while True:
            for path in sorted(self._dir.iterdir()):
                if path.name != self._name and path.name not in self._peers:
                    await self._subscribe(path)
            self._joined.set()
            await asyncio.sleep(self._rescan)

    async def _subscribe(self, path: Path) -> None:
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_unix_connection(str(path))
        except (OSError, TimeoutError):
            _forget_if_gone(path)
            return
        try:
            async with asyncio.timeout(1.0):
                hello = await reader.readexactly(1)
            if hello != _HELLO:
                raise ConnectionError("not a live feed")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("live feed of worker %s: %s", path.name, exc)
            writer.close()
            return
        self._peers[path.name] = asyncio.create_task(
            self._read(path.name, reader, writer), name=f"eventbus-live-{path.name}"
        )

    async def _read(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                if size > _MAX_FRAME:
                    raise ValueError(f"a frame of {size} bytes")
                self._feed.deliver(_unframe(await reader.readexactly(size)))
        except asyncio.IncompleteReadError:
            pass  # the worker stopped; a new one is found at the next scan
        except (OSError, ValueError) as exc:
            log.warning("live feed of worker %s broke: %s", name, exc)
        finally:
            writer.close()
            if self._peers.get(name) is asyncio.current_task():
                del self._peers[name]


def _forget_if_gone(path: Path) -> None:
    """Remove the socket of a worker that is gone (killed before it could remove it)."""
    try:
        os.kill(int(path.name), 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
    except (ValueError, PermissionError):
        pass
