"""Which sources exist and how they run: the registry of source types and the runner.

The core never imports a specific connector: connectors register themselves with
:func:`register_source`, and :func:`build_source` turns one YAML entry into a
:class:`~eventbus.sources.Source`. :class:`SourceRunner` runs every source in its own task and
restarts one that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import asyncpg
import pydantic

from eventbus._errors import ConfigError
from eventbus.sources._base import Source, SourceContext, SourceStatus, default_instance_id
from eventbus.sources._checkpoints import Checkpoints
from eventbus.sources._clock import Backoff, Clock, SystemClock
from eventbus.sources._shared import SharedStatuses

__all__ = ["SourceRunner", "build_source", "register_source"]


SourceFactory = Callable[[str, Any], Source]
_REGISTRY: dict[str, tuple[SourceFactory, type[pydantic.BaseModel]]] = {}
_SHARE_EVERY = 1.0  # seconds: how stale another worker's view of these sources may be


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
    With ``shared`` (a worker of ``serve --workers N``) the statuses are kept where the other
    workers read them, and :meth:`statuses` shows every worker's.
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
        shared: SharedStatuses | None = None,
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
        self._shared = shared

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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ctx in self._contexts:
            if ctx.status.state != "failed":
                ctx.status.state = "stopped"
        if self._shared is not None:
            with contextlib.suppress(OSError):
                self._shared.write([ctx.status for ctx in self._contexts])

    def statuses(self) -> list[SourceStatus]:
        """The live status of every source, in configuration order; with ``shared``, merged
        with the other workers' (one entry per source name, see ``merge_statuses``)."""
        own = [ctx.status for ctx in self._contexts]
        return own if self._shared is None else self._shared.read(own)

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
