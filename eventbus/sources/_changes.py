"""The poll loop of sources that report what is new or changed since their checkpoints.

    scan (every ``interval`` s) ─> compare each item's marker with checkpoint ``<prefix><name>``
      ─> ctx.emit, oldest first ─> checkpoint ``<prefix><name>`` = marker

Place in the pipeline: inside the ``directory`` and ``s3-poll`` sources, between what they list
(files, bucket objects) and the bus. A marker (size and mtime, ETag and LastModified) is
checkpointed only after its event is on the bus: a restart emits nothing twice and misses
nothing; a crash in between re-emits that one item (at-least-once). Items that disappear are
not reported; their checkpoints are deleted once a scan no longer lists them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from eventbus._errors import CloudEventError, EventTooLargeForBus
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff

__all__ = ["poll_changes"]

T = TypeVar("T")

_STARTED = "started"
"""The checkpoint saying a ``start_at: end`` source's first scan was taken as its start."""


async def poll_changes(
    ctx: SourceContext,
    *,
    prefix: str,
    interval: float,
    transient: tuple[type[Exception], ...],
    scan: Callable[[], Awaitable[Iterable[tuple[str, Any, T]]]],
    order: Callable[[T], Any],
    event: Callable[[T, bool], Awaitable[dict[str, Any]]],
    start_at_end: bool = False,
    emit: Callable[[dict[str, Any]], Awaitable[object]] | None = None,
    went: Callable[[list[str]], None] | None = None,
) -> None:
    """Poll until cancelled.

    ``scan`` lists every item present as ``(name, marker, item)``; an item whose marker differs
    from its checkpoint becomes ``event(item, known)`` (``known``: it had a checkpoint), in the
    order of ``order(item)``. ``status.lag`` counts the changed items not yet checkpointed.
    ``transient`` failures, like bus and store errors the caller lists there, are reported in
    ``ctx.status`` and retried with backoff, progress rebuilt from the checkpoints; anything
    else propagates (the runner marks the source failed). With ``start_at_end``, what the
    first scan of the source's first start lists is checkpointed without events (a marker
    checkpoint says it was done, so a later start reports what came meanwhile). ``emit``
    publishes each event (``ctx.emit`` unless given); ``went`` is told the names of the items
    a scan no longer lists, as their checkpoints are deleted.
    """
    seen: dict[str, Any] | None = None
    backoff = Backoff(ctx.clock, maximum=max(interval, 30.0))
    while True:
        try:
            if seen is None:
                seen = await ctx.checkpoints.items(prefix)
                if start_at_end and await ctx.checkpoints.get(_STARTED) is None:
                    baseline = {prefix + name: marker for name, marker, _ in await scan()}
                    await ctx.checkpoints.put_many(baseline)
                    await ctx.checkpoints.put(_STARTED, True)
                    seen.update(baseline)
            await _emit_changes(
                ctx, prefix, seen, await scan(), order, event, emit or ctx.emit, went
            )
        except transient as exc:
            # Progress is rebuilt from checkpoints, so nothing half-done is trusted.
            ctx.report_error(exc)
            seen = None
            await backoff.wait()
            continue
        backoff.reset()
        ctx.recovered()
        await ctx.clock.sleep(interval)


async def _emit_changes(
    ctx: SourceContext,
    prefix: str,
    seen: dict[str, Any],
    present: Iterable[tuple[str, Any, T]],
    order: Callable[[T], Any],
    event: Callable[[T, bool], Awaitable[dict[str, Any]]],
    emit: Callable[[dict[str, Any]], Awaitable[object]],
    went: Callable[[list[str]], None] | None,
) -> None:
    listed = {prefix + name: (marker, item) for name, marker, item in present}
    changed = [
        (key, marker, item) for key, (marker, item) in listed.items() if seen.get(key) != marker
    ]
    # Oldest first, so consumers see changes in the order they happened.
    changed.sort(key=lambda change: order(change[2]))
    remaining = len(changed)
    ctx.status.lag = remaining
    for key, marker, item in changed:
        try:
            await emit(await event(item, key in seen))
        except (CloudEventError, EventTooLargeForBus) as exc:
            # No event can say it (a name with a control character, say), or the bus cannot
            # carry it: kept aside, and the items after it go on (it raised out of the source,
            # which stopped for good, or held the source on it for ever).
            await ctx.dead_letter(key.removeprefix(prefix), str(exc), {"key": key})
        await ctx.checkpoints.put(key, marker)
        seen[key] = marker
        remaining -= 1
        ctx.status.lag = remaining
    # Forget what is gone (a drop folder's processed files): the checkpoints, and this map,
    # grew with every name ever seen. One that comes back is reported as created.
    gone = [key for key in seen if key not in listed]
    if gone:
        await ctx.checkpoints.delete_many(gone)
        for key in gone:
            del seen[key]
        if went is not None:
            went([key.removeprefix(prefix) for key in gone])
