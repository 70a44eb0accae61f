"""Which sources exist and how they run: the registry of source types and the runner.

The core never imports a specific source: the built-in types are registered in
``eventbus/sources/__init__.py`` with :func:`register_source`, and :func:`build_source` turns
one validated definition into a :class:`~eventbus.sources.Source`. The registry proper is
``eventbus.config``'s, so ``load_connectors`` validates every source with its type's spec and
reports file and line. :class:`SourceRunner` runs every source in its own task and restarts one
that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import asyncpg
import pydantic

from eventbus._errors import ConfigError, StoreError
from eventbus._tasks import cancel_and_wait, stop_if_cancelled
from eventbus.cloudevents import DEFAULT_MAX_EVENT_SIZE
from eventbus.config import SourceSpec, connector_adapter, connector_spec, register_connector
from eventbus.sources._base import Source, SourceContext, SourceStatus, default_instance_id
from eventbus.sources._checkpoints import Checkpoints, Lease
from eventbus.sources._clock import Backoff, Clock, SystemClock
from eventbus.sources._shared import SharedStatuses

__all__ = [
    "LEASE",
    "SourceRunner",
    "build_source",
    "in_every_process",
    "one_instance",
    "register_source",
]

S = TypeVar("S", bound=SourceSpec)
_SHARE_EVERY = 1.0  # seconds: how stale another worker's view of these sources may be

LEASE = 30.0
"""Seconds a one-instance source's lease lasts (renewed every third of it): how long the other
instances wait before taking over from one that died or froze."""


def register_source(type_name: str, spec: type[S], adapter: Callable[[S], Source]) -> None:
    """Make ``type: <type_name>`` under ``sources:`` validate with ``spec`` (a SourceSpec with
    ``extra="forbid"``) and run ``adapter(spec)``. Sets ``spec.type``. Raises ValueError when
    the type or the spec is already registered, or the spec does not forbid extra fields."""
    register_connector("source", type_name, spec, adapter)


def build_source(spec: SourceSpec | Mapping[str, Any]) -> Source:
    """Build one source from its validated spec, or from its YAML entry (``name``, ``type`` and
    the type's settings), which is validated first.

    Raises ConfigError naming the source and the offending field (``load_connectors`` reports
    the same problems with file and line).
    """
    if not isinstance(spec, SourceSpec):
        spec = _validate(spec)
    adapter = cast(Callable[[SourceSpec], Source], connector_adapter("source", spec))
    return adapter(spec)


def in_every_process(spec: SourceSpec) -> bool:
    """Whether the source must run in every process of the service, not only where
    ``run_sources`` is on: one that serves requests reaching any process (its adapter sets
    ``in_every_process = True``), rather than reading input that must be read once."""
    return bool(getattr(connector_adapter("source", spec), "in_every_process", False))


def one_instance(source: Source) -> bool:
    """Whether ``source`` reads input every instance of the service could see (a directory, a
    log file, a bucket) and so runs in one instance at a time, under a lease: its adapter sets
    ``one_instance = True``."""
    return bool(getattr(source, "one_instance", False))


def reports_running(source: Source) -> bool:
    """Whether ``source`` shows itself running once it reads its input (connected, subscribed:
    its adapter sets ``reports_running = True``); until then it shows starting, or backoff
    after a failure. Other sources show running once started. A source shown running while it
    still connected had a message published meanwhile taken for received: an MQTT broker keeps
    nothing for a topic not yet subscribed to."""
    return bool(getattr(source, "reports_running", False))


def _validate(entry: Mapping[str, Any]) -> SourceSpec:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"a source must be a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("a source needs a non-empty string 'name'")
    type_name = entry.get("type")
    try:
        model = connector_spec("source", type_name)
    except ConfigError as exc:
        raise ConfigError(f"source {name!r}: field 'type': {exc}") from None
    try:
        # Registration guarantees a source type's spec is a SourceSpec.
        return cast(
            SourceSpec, model.model_validate({k: v for k, v in entry.items() if k != "type"})
        )
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '(root)'!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"source {name!r} ({type_name}): {problems}") from exc


class SourceRunner:
    """Runs sources side by side; one failing never stops the others.

    A source whose ``run`` raises is restarted after a capped exponential backoff (reset once
    it has emitted again); a ConfigError raised at run time marks it ``failed`` for good.
    Leaving the context cancels every source and waits for it to stop. ``publish`` is called
    as ``publish(event, via="source:<name>")`` (:meth:`eventbus.bus.Bus.publish` fits), and
    ``publish_many``, when given, as ``publish_many(events, via=...)`` for a fetched batch
    (:meth:`eventbus.bus.Bus.publish_many` fits).
    A one-instance source (:func:`one_instance`) runs only while ``lease_owner`` (default: the
    instance id) holds its lease of ``lease`` seconds, and stands by while another does.
    With ``shared`` (a worker of ``serve --workers N``) the statuses are kept where the other
    workers read them, and :meth:`statuses` shows every worker's.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        pool: asyncpg.Pool,
        publish: Callable[..., Awaitable[object]],
        publish_many: Callable[..., Awaitable[Sequence[object]]] | None = None,
        clock: Clock | None = None,
        instance_id: str | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        shared: SharedStatuses | None = None,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        lease: float = LEASE,
        lease_owner: str | None = None,
    ) -> None:
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"duplicate source names: {', '.join(duplicates)}")
        self._sources = list(sources)
        self._by_name = {s.name: s for s in sources}
        self._clock = clock or SystemClock()
        self._backoff = (backoff_initial, backoff_max)
        instance = instance_id or default_instance_id()
        self._contexts = [
            SourceContext(
                name=s.name,
                publish=functools.partial(publish, via=f"source:{s.name}"),
                publish_many=None
                if publish_many is None
                else functools.partial(publish_many, via=f"source:{s.name}"),
                pool=pool,
                checkpoints=Checkpoints(pool, s.name),
                status=SourceStatus(name=s.name, type=s.type),
                clock=self._clock,
                instance_id=instance,
                logger=logging.getLogger(f"eventbus.sources.{s.name}"),
                max_event_size=max_event_size,
            )
            for s in sources
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._shared = shared
        self._lease = lease
        # Who holds the leases: the service passes its installation's id (kept in its data
        # directory), stable across restarts, so a process restarted after a crash takes its
        # sources back at once instead of waiting out its own lease.
        self._lease_owner = lease_owner or instance

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._supervise(src, ctx), name=f"source:{src.name}")
            for src, ctx in zip(self._sources, self._contexts, strict=True)
        ]
        if self._shared is not None:
            self._tasks.append(asyncio.create_task(self._share(self._shared), name="sources:share"))
        return self

    async def _share(self, shared: SharedStatuses) -> None:
        own = [ctx.status for ctx in self._contexts]
        while True:
            try:
                shared.write(own)
            except OSError as exc:
                logging.getLogger("eventbus.sources").warning(
                    "cannot share source statuses in %s: %s", shared.directory, exc
                )
            await asyncio.sleep(_SHARE_EVERY)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.gather(*(cancel_and_wait(task) for task in self._tasks))
        for ctx in self._contexts:
            if ctx.status.state != "failed":
                ctx.status.state = "stopped"
        if self._shared is not None:
            with contextlib.suppress(OSError):
                self._shared.write([ctx.status for ctx in self._contexts])

    def source(self, name: str) -> Source | None:
        """The source named ``name``, or None."""
        return self._by_name.get(name)

    def statuses(self) -> list[SourceStatus]:
        """The live status of every source, in configuration order; with ``shared``, merged
        with the other workers' (one entry per source name, see ``merge_statuses``)."""
        own = [ctx.status for ctx in self._contexts]
        return own if self._shared is None else self._shared.read(own)

    async def _supervise(self, source: Source, ctx: SourceContext) -> None:
        if one_instance(source):
            await self._under_lease(source, ctx)
        else:
            await self._restarting(source, ctx)

    async def _under_lease(self, source: Source, ctx: SourceContext) -> None:
        """Run ``source`` while this instance holds its lease; stand by while another does.
        Two instances running one directory, log file or bucket announced everything twice
        (and each forgot the other's checkpoints)."""
        lease = Lease(ctx.pool, ctx.name, self._lease_owner)
        renew_every = self._lease / 3
        try:
            while True:
                taken = asyncio.get_running_loop().time()
                try:
                    held = await lease.take(self._lease)
                except StoreError as exc:
                    ctx.report_error(exc)
                    await self._clock.sleep(renew_every)
                    continue
                if not held:
                    if ctx.status.state != "standby":
                        ctx.status.state = "standby"
                        ctx.logger.info(
                            "source %s: another instance holds its lease; standing by", ctx.name
                        )
                    ctx.recovered()
                    await self._clock.sleep(renew_every)
                    continue
                run = asyncio.create_task(self._restarting(source, ctx), name=f"run:{ctx.name}")
                try:
                    await self._hold(lease, run, ctx, taken)
                finally:
                    await cancel_and_wait(run)
                if run.done() and not run.cancelled():
                    return  # it stopped or failed for good: leave the lease to another
                ctx.status.state = "standby"
                ctx.logger.warning(
                    "source %s: lost its lease (renewal refused or the database out of reach"
                    " for %g s); stopped here, another instance takes over",
                    ctx.name,
                    self._lease,
                )
        finally:
            with contextlib.suppress(StoreError):
                await lease.release(deadline=1.0)  # else it runs out by itself

    async def _hold(
        self, lease: Lease, run: asyncio.Task[None], ctx: SourceContext, taken: float
    ) -> None:
        """Renew ``lease`` while ``run`` runs; return when it ends or the lease is lost: refused
        (another instance took it over) or not renewed in time (another may take it over).

        The lease runs out in the database ``lease`` seconds after the statement that took or
        renewed it began (``taken``, on the loop's clock): this instance stops at 90 % of
        that, whatever its renewals do, each renewal bounded by the time left (a renewal that
        hung for 5 s let the holder run on past the expiry, beside the instance taking over).
        """
        loop = asyncio.get_running_loop()
        deadline = taken + self._lease * 0.9
        while True:
            wait = min(self._lease / 3, deadline - loop.time())
            if wait > 0:
                await asyncio.wait({run}, timeout=wait)
            if run.done():
                return
            began = loop.time()
            if began >= deadline:
                ctx.logger.warning("source %s: its lease was not renewed in time", ctx.name)
                return
            try:
                held = await lease.take(self._lease, deadline=deadline - began)
            except StoreError as exc:
                ctx.logger.warning("source %s: renewing its lease failed: %s", ctx.name, exc)
                continue
            if not held:
                return
            deadline = began + self._lease * 0.9

    async def _restarting(self, source: Source, ctx: SourceContext) -> None:
        backoff = Backoff(self._clock, initial=self._backoff[0], maximum=self._backoff[1])
        try:
            while True:
                stop_if_cancelled()
                events_before = ctx.status.events
                if not reports_running(source):
                    ctx.status.state = "running"
                elif ctx.status.state != "backoff":
                    ctx.status.state = "starting"
                try:
                    await source.run(ctx)
                except asyncio.CancelledError:
                    raise
                except ConfigError as exc:
                    ctx.report_error(exc)
                    ctx.status.state = "failed"
                    ctx.logger.error("source %s failed: %s", ctx.name, exc)
                    return
                except OSError as exc:
                    # The machine's, not a defect (a port taken, a path not there): one line, as
                    # any transient failure, not a traceback at every restart (12 in 30 s)
                    ctx.report_error(exc)
                except Exception as exc:
                    ctx.report_error(exc)
                    ctx.logger.exception("source %s crashed; restarting after backoff", ctx.name)
                else:
                    ctx.status.state = "stopped"
                    return
                if ctx.status.events != events_before:
                    backoff.reset()
                await backoff.wait()
        finally:
            # what its warnings counted and had not told yet (the burst it stopped in)
            ctx.flush_warnings()
