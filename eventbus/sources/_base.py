"""The source framework: what every source connector plugs into, in front of the bus.

    input (bucket, file, socket, timer, queue)
      -> Source.run(ctx)            a connector turns input into CloudEvents
      -> ctx.emit(event)            publishes onto the durable bus (returns once durable)
      -> ctx.checkpoints.put(...)   only then the connector records its progress in Postgres

A crash between publish and checkpoint re-emits the same input on restart (at-least-once);
nothing is ever checkpointed before it is on the bus, so nothing is lost. Input that cannot
become an event is kept in ``source_dead_letters`` with its error and never blocks the stream.

The core never imports a specific connector: connectors register themselves with
:func:`register_source`, and :func:`build_source` turns one YAML entry into a :class:`Source`.
:class:`SourceRunner` runs every source in its own task and restarts one that fails.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import heapq
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self

import asyncpg
import orjson
import pydantic

from eventbus._errors import ConfigError, StoreError
from eventbus.store import READ_TIMEOUT, run_db, set_aside

__all__ = [
    "Backoff",
    "Checkpoints",
    "Clock",
    "ManualClock",
    "Source",
    "SourceContext",
    "SourceRunner",
    "SourceStatus",
    "SystemClock",
    "build_source",
    "list_dead_letters",
    "register_source",
]


# What asyncpg raises when Postgres rejects a statement or the connection is gone.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class Checkpoints:
    """Durable key/value progress of one source (table ``source_checkpoints``).

    Values are anything orjson can serialize. Every method raises StoreError when Postgres
    cannot be reached or rejects the statement.
    """

    def __init__(self, pool: asyncpg.Pool, source: str) -> None:
        self._pool = pool
        self._source = source

    async def get(self, key: str) -> Any | None:
        """Return the stored value for ``key``, or None when nothing was stored."""
        try:
            text = await self._pool.fetchval(
                "SELECT value::text FROM source_checkpoints WHERE source = $1 AND key = $2",
                self._source,
                key,
            )
        except _DB_ERRORS as exc:
            raise StoreError(f"reading checkpoint {self._source}/{key}: {exc}") from exc
        return None if text is None else orjson.loads(text)

    async def items(self, prefix: str = "") -> dict[str, Any]:
        """Return every stored key starting with ``prefix`` and its value."""
        try:
            rows = await self._pool.fetch(
                "SELECT key, value::text AS value FROM source_checkpoints"
                " WHERE source = $1 AND starts_with(key, $2)",
                self._source,
                prefix,
            )
        except _DB_ERRORS as exc:
            raise StoreError(f"reading checkpoints of {self._source}: {exc}") from exc
        return {row["key"]: orjson.loads(row["value"]) for row in rows}

    async def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (upsert); durable when this returns."""
        await self.put_many({key: value})

    async def put_many(self, values: Mapping[str, Any]) -> None:
        """Store several keys in one transaction: all of them are durable, or none."""
        rows = [(self._source, k, orjson.dumps(v).decode()) for k, v in values.items()]
        if not rows:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO source_checkpoints (source, key, value, updated_at)"
                    " VALUES ($1, $2, $3::jsonb, now())"
                    " ON CONFLICT (source, key) DO UPDATE"
                    " SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
                    rows,
                )
        except _DB_ERRORS as exc:
            raise StoreError(f"writing checkpoints of {self._source}: {exc}") from exc


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


class Clock(Protocol):
    """Where sources read the time and wait: real in production, manual in tests."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (cancellable)."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class ManualClock:
    """A clock that only moves when told to, so timing logic is tested without real sleeps.

    ``sleep`` blocks until :meth:`advance` moves the clock past its deadline; sleepers wake in
    deadline order.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._slept = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many ``sleep`` calls are waiting right now."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + timedelta(seconds=max(seconds, 0.0))
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        self._slept.set()
        await fut

    def advance(self, seconds: float) -> None:
        """Move the clock forward and wake every sleeper whose deadline has passed."""
        self._now += timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Return once at least ``count`` sleepers are waiting (wrap in ``asyncio.timeout``)."""
        while self.sleepers < count:
            self._slept.clear()
            await self._slept.wait()


class Backoff:
    """Capped exponential backoff on a :class:`Clock`: initial, 2x, 4x ... up to ``maximum``."""

    def __init__(self, clock: Clock, *, initial: float = 0.5, maximum: float = 30.0) -> None:
        self._clock = clock
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def reset(self) -> None:
        """Start again from ``initial`` (call after a success)."""
        self._next = self._initial

    async def wait(self) -> None:
        """Sleep the current delay on the clock, then double it (up to ``maximum``)."""
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        await self._clock.sleep(delay)


@dataclass
class SourceContext:
    """Everything a running source may use; built by :class:`SourceRunner` (or a test)."""

    name: str
    publish: Callable[[dict[str, Any]], Awaitable[None]]
    pool: asyncpg.Pool
    checkpoints: Checkpoints
    status: SourceStatus
    clock: Clock = field(default_factory=SystemClock)
    instance_id: str = field(default_factory=lambda: default_instance_id())
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("eventbus.sources"))

    async def emit(self, event: dict[str, Any]) -> None:
        """Publish ``event`` onto the bus and count it.

        Returns once the event is durable; raises BusUnavailable/BusError otherwise, in which
        case the caller must not acknowledge or checkpoint the input behind it.
        """
        await self.publish(event)
        self.status.events += 1
        self.status.last_event_at = self.clock.now()
        if self.status.state == "backoff":
            self.status.state = "running"

    async def dead_letter(
        self, payload: bytes | str, error: str, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Keep input that could not become an event, with its error (``source_dead_letters``).

        Raises StoreError when the row could not be written; the caller must then not skip the
        input.
        """
        raw = payload.encode() if isinstance(payload, str) else payload
        await set_aside(self.pool, self.name, raw, error, meta)
        self.status.errors += 1
        self.status.last_error = error
        self.logger.warning("source %s: dead-lettered input: %s", self.name, error)

    def report_error(self, exc: BaseException) -> None:
        """Record a transient failure the source is about to back off from."""
        self.status.state = "backoff"
        self.status.errors += 1
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        self.logger.warning("source %s: %s", self.name, self.status.last_error)


def default_instance_id() -> str:
    """A process-unique id: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Source(Protocol):
    """A running connector. ``run`` returns only when cancelled (or raises)."""

    name: str
    type: str

    async def run(self, ctx: SourceContext) -> None: ...


SourceFactory = Callable[[str, Any], Source]
_REGISTRY: dict[str, tuple[SourceFactory, type[pydantic.BaseModel]]] = {}


def register_source(
    type_name: str, config_model: type[pydantic.BaseModel]
) -> Callable[[type], type]:
    """Class decorator: make ``type: <type_name>`` in connector YAML build this class.

    The class is called as ``cls(name, config)`` with ``config`` an instance of
    ``config_model``. Raises ValueError when the type is already registered or the model does
    not forbid extra fields (a typo in YAML must be an error, not silently ignored).
    """
    if type_name in _REGISTRY:
        raise ValueError(f"source type {type_name!r} is already registered")
    if config_model.model_config.get("extra") != "forbid":
        raise ValueError(f"config model of source type {type_name!r} must set extra='forbid'")

    def decorate(cls: type) -> type:
        _REGISTRY[type_name] = (cls, config_model)
        return cls

    return decorate


def build_source(spec: Mapping[str, Any]) -> Source:
    """Build one source from its YAML entry (``name``, ``type`` and type-specific settings).

    Raises ConfigError naming the source and the offending field.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a source must be a mapping, got {type(spec).__name__}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("a source needs a non-empty string 'name'")
    type_name = spec.get("type")
    if type_name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(
            f"source {name!r}: field 'type': unknown type {type_name!r} (known: {known})"
        )
    factory, model = _REGISTRY[type_name]
    settings = {k: v for k, v in spec.items() if k not in ("name", "type")}
    try:
        config = model.model_validate(settings)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '(root)'!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"source {name!r} ({type_name}): {problems}") from exc
    return factory(name, config)


class SourceRunner:
    """Runs sources side by side; one failing never stops the others.

    A source whose ``run`` raises is restarted after a capped exponential backoff (reset once
    it has emitted again); a ConfigError raised at run time marks it ``failed`` for good.
    Leaving the context cancels every source and waits for it to stop. ``publish`` is called
    as ``publish(event, via="source:<name>")`` (:meth:`eventbus.bus.Bus.publish` fits).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        pool: asyncpg.Pool,
        publish: Callable[..., Awaitable[None]],
        clock: Clock | None = None,
        instance_id: str | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"duplicate source names: {', '.join(duplicates)}")
        self._sources = list(sources)
        self._clock = clock or SystemClock()
        self._backoff = (backoff_initial, backoff_max)
        instance = instance_id or default_instance_id()
        self._contexts = [
            SourceContext(
                name=s.name,
                publish=functools.partial(publish, via=f"source:{s.name}"),
                pool=pool,
                checkpoints=Checkpoints(pool, s.name),
                status=SourceStatus(name=s.name, type=s.type),
                clock=self._clock,
                instance_id=instance,
                logger=logging.getLogger(f"eventbus.sources.{s.name}"),
            )
            for s in sources
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._supervise(src, ctx), name=f"source:{src.name}")
            for src, ctx in zip(self._sources, self._contexts, strict=True)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ctx in self._contexts:
            if ctx.status.state != "failed":
                ctx.status.state = "stopped"

    def statuses(self) -> list[SourceStatus]:
        """The live status of every source, in configuration order."""
        return [ctx.status for ctx in self._contexts]

    async def _supervise(self, source: Source, ctx: SourceContext) -> None:
        backoff = Backoff(self._clock, initial=self._backoff[0], maximum=self._backoff[1])
        while True:
            events_before = ctx.status.events
            ctx.status.state = "running"
            try:
                await source.run(ctx)
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:
                ctx.report_error(exc)
                ctx.status.state = "failed"
                ctx.logger.error("source %s failed: %s", ctx.name, exc)
                return
            except Exception as exc:
                ctx.report_error(exc)
                ctx.logger.exception("source %s crashed; restarting after backoff", ctx.name)
            else:
                ctx.status.state = "stopped"
                return
            if ctx.status.events != events_before:
                backoff.reset()
            await backoff.wait()


async def list_dead_letters(
    pool: asyncpg.Pool, source: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Newest first: ``id, source, received_at, error, meta`` and the payload as ``payload``
    (UTF-8 text) or ``payload_base64`` (binary). Raises StoreError on database failure (also
    after ``READ_TIMEOUT`` seconds), StoreDataError for a ``source`` the database refuses, and
    ValueError for a limit outside 1..1000."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be between 1 and 1000, got {limit}")
    rows = await run_db(
        "listing source dead letters",
        pool.fetch(
            "SELECT id, source, received_at, payload, error, meta::text AS meta"
            " FROM source_dead_letters WHERE ($1::text IS NULL OR source = $1)"
            " ORDER BY id DESC LIMIT $2",
            source,
            limit,
        ),
        deadline=READ_TIMEOUT,
    )
    result = []
    for row in rows:
        item: dict[str, Any] = {
            "id": row["id"],
            "source": row["source"],
            "received_at": row["received_at"].isoformat(),
            "error": row["error"],
            "meta": orjson.loads(row["meta"]),
        }
        payload: bytes = row["payload"]
        try:
            item["payload"] = payload.decode()
        except UnicodeDecodeError:
            item["payload_base64"] = base64.b64encode(payload).decode()
        result.append(item)
    return result
