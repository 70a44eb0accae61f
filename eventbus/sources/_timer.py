"""The ``timer`` source: scheduled ticks become CloudEvents, each fired once across instances.

Place in the pipeline: ``_schedule`` says which instants are ticks → this source claims a tick
in Postgres, publishes its event onto the bus and records progress in its checkpoint.

Exactly once across instances sharing one Postgres: a tick is claimed by inserting
``(schedule, fire_time)`` into ``timer_fires`` inside a transaction that stays open while the
event is published and is committed only after the bus has it. The commit is the "published"
mark. Another instance inserting the same tick waits on the uncommitted row: if the claimant
commits, the insert does nothing (already fired); if publishing failed, the claimant rolls back
(the claim is released) and the waiter fires the tick itself. A claimant that dies or hangs
between claim and publish loses its claim once its transaction has been idle for
``claim_lease`` seconds (Postgres ``idle_in_transaction_session_timeout`` ends the session and
rolls back), and a waiting instance takes the tick over; a live claimant whose publish hangs
gives up after half the lease and rolls back itself. A claimant that published but could
not commit leads to a second publish of the same event id, which the bus deduplicates.

Event ids are ``<source name>/<scheduled time, ISO 8601 UTC>`` and ``time`` is the scheduled
time, so every re-fire of a tick is the same event.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import pydantic

from eventbus._errors import BusError, BusUnavailable, CloudEventError, ConfigError, StoreError
from eventbus._tasks import cancel_and_wait
from eventbus.cloudevents import new_event
from eventbus.config import SourceSpec
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff
from eventbus.sources._schedule import Schedule, missed_ticks, parse_schedule

__all__ = ["TimerSource", "TimerSourceSpec"]

_CHECKPOINT = "through"
"""Checkpoint key: every tick at or before this instant has been handled (fired or skipped)."""


class TimerSourceSpec(SourceSpec):
    """YAML settings of a ``type: timer`` source."""

    schedule: str
    timezone: str = "UTC"
    data: Any = None
    event_type: str = "eventbus.timer.tick"
    subject: str | None = None
    missed: Literal["skip", "once", "catch-up"] = "skip"
    max_catch_up: int = pydantic.Field(100, ge=1, le=10_000)
    claim_lease: float = pydantic.Field(30.0, gt=0, le=3600)

    @pydantic.field_validator("schedule")
    @classmethod
    def _schedule_parses(cls, schedule: str) -> str:
        # here, not only below, so the error names the field and its line, not the entry's
        try:
            parse_schedule(schedule)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return schedule

    @pydantic.field_validator("timezone")
    @classmethod
    def _zone_exists(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}") from None
        return timezone

    @pydantic.model_validator(mode="after")
    def _check_schedule(self) -> TimerSourceSpec:
        # An at() in the past is not refused: once fired it stays in the file, and refusing it
        # stopped the next start of the whole service (it fires under missed: once or catch-up
        # when it came due while the service was down; ``run`` warns when it never can).
        try:
            parse_schedule(self.schedule, self.timezone)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        # Refused here, at load, what would fail every tick (an empty subject, a control
        # character in event_type, data too big): the timer loaded and never fired.
        try:
            _tick_event(self, datetime.now(UTC))
        except CloudEventError as exc:
            raise ValueError(f"its ticks cannot be events: {exc.detail}") from exc
        return self


_KEEP_CLAIMS = timedelta(days=7)
_PRUNE_EVERY = 3600.0
_PRUNE_BATCH = 10_000
_LOOK_EVERY = 30.0
"""Seconds at most between two readings of the wall clock while waiting for a tick: a sleep
runs on the monotonic clock, which stands still while the machine is suspended (and ignores a
step of the wall clock), so a ``0 3 * * *`` timer on a laptop suspended 8 hours woke 8 hours
after its 03:00."""
_CONTESTED = 1.0
"""Seconds of claiming a tick past which the wait was for another instance's claim of it, not
the database's own pace (a claim takes milliseconds)."""


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


class TimerSource:
    """Fires the ticks of one schedule as CloudEvents; see the module docstring for guarantees.

    ``run`` returns once a schedule has no more ticks (an ``at()`` that fired); otherwise it
    runs until cancelled. Bus failures release the claim and retry the same tick with backoff;
    StoreError from the checkpoint store propagates to the runner, which restarts the source.
    """

    reports_running = True  # once its checkpoint is read (see SourceRunner)

    def __init__(self, config: TimerSourceSpec) -> None:
        self.name = config.name
        self.type = config.type
        self.config = config
        self._schedule: Schedule = parse_schedule(config.schedule, config.timezone)
        self._pruned: datetime | None = None
        self._pruning: asyncio.Task[None] | None = None

    async def run(self, ctx: SourceContext) -> None:
        try:
            await self._run(ctx)
        finally:
            if self._pruning is not None:
                await cancel_and_wait(self._pruning)

    async def _run(self, ctx: SourceContext) -> None:
        stored = await ctx.checkpoints.get(_CHECKPOINT)
        if stored is None:
            cursor = ctx.clock.now()
            await ctx.checkpoints.put(_CHECKPOINT, _iso(cursor))
            if self._schedule.next_after(cursor) is None:
                ctx.logger.warning(
                    "timer %s: schedule %r lies in the past: nothing to fire",
                    self.name,
                    self.config.schedule,
                )
        else:
            cursor = await self._handle_missed(ctx, datetime.fromisoformat(stored))
        ctx.status.state = "running"
        # Ticks due by this time are fired as due ticks, not missed ones (see below).
        through: datetime | None = None
        while (tick := self._schedule.next_after(cursor)) is not None:
            while (now := ctx.clock.now()) < tick:
                await ctx.clock.sleep(min((tick - now).total_seconds(), _LOOK_EVERY))
            claiming = ctx.clock.now()
            waited = await self._fire(ctx, tick)
            cursor = tick
            await ctx.checkpoints.put(_CHECKPOINT, _iso(cursor))
            # Ticks that came due while this one was being fired (a suspended process, a long
            # bus outage) are missed ticks and follow the schedule's policy; not those that
            # came due while this instance waited for another's claim to end (a frozen
            # claimant, up to claim_lease): this one was up, and they were fired nowhere (a
            # 1 s schedule lost 30 ticks under "skip"). They follow as due ticks.
            if waited >= _CONTESTED:
                # at most claim_lease's worth: a longer wait was not for another's claim (a
                # stalled database, a table locked): those ticks are missed, as in an outage
                lease = timedelta(seconds=self.config.claim_lease)
                through = min(ctx.clock.now(), claiming + lease)
            following = self._schedule.next_after(cursor)
            if through is None or following is None or following > through:
                through = None
                cursor = await self._handle_missed(ctx, cursor)

    async def _handle_missed(self, ctx: SourceContext, cursor: datetime) -> datetime:
        """Apply the missed policy to ticks in ``(cursor, now]``; return the new cursor."""
        now = ctx.clock.now()
        limit = {"skip": 0, "once": 1, "catch-up": self.config.max_catch_up}[self.config.missed]
        due = self._schedule.at_or_before(now)
        if due is None or due <= cursor:
            return cursor
        chosen = missed_ticks(self._schedule, cursor, now, limit)
        ctx.logger.info(
            "timer %s: ticks missed since %s; policy %s takes %d of them (each fired here "
            "unless another instance has)",
            self.name,
            _iso(cursor),
            self.config.missed,
            len(chosen),
        )
        for tick in chosen:
            await self._fire(ctx, tick)
            await ctx.checkpoints.put(_CHECKPOINT, _iso(tick))
        await ctx.checkpoints.put(_CHECKPOINT, _iso(due))
        return due

    async def _fire(self, ctx: SourceContext, tick: datetime) -> float:
        """Fire ``tick`` unless another instance has; retry bus and store failures. Returns the
        seconds spent claiming it: waiting, mostly, for another instance's claim of it."""
        backoff = Backoff(ctx.clock)
        claiming = [0.0]
        while True:
            try:
                fired = await self._claim_and_publish(ctx, tick, claiming)
            except (BusError, StoreError) as exc:
                ctx.report_error(exc)
                await backoff.wait()
                continue
            ctx.recovered()
            if not fired:
                ctx.logger.debug("timer %s: %s fired by another instance", self.name, _iso(tick))
            await self._prune(ctx)
            return claiming[0]

    async def _prune(self, ctx: SourceContext) -> None:
        """Delete this schedule's claims older than ``_KEEP_CLAIMS`` (a tick is claimed again
        only by an instance catching up from the shared checkpoint, past them), at most once
        ``_PRUNE_EVERY`` per process, beside the ticks (a timer every second added 86,400 rows
        a day, for good; the first prune after an upgrade may have millions)."""
        now = ctx.clock.now()
        if self._pruned is not None and (now - self._pruned).total_seconds() < _PRUNE_EVERY:
            return
        self._pruned = now
        if self._pruning is None or self._pruning.done():
            self._pruning = asyncio.create_task(
                self._delete_claims(ctx, now - _KEEP_CLAIMS), name=f"timer-prune-{self.name}"
            )

    async def _delete_claims(self, ctx: SourceContext, before: datetime) -> None:
        # In batches, by the primary key's range (schedule, fire_time); fired_at keeps the
        # claim of an old tick being caught up right now.
        try:
            while True:
                status = await ctx.pool.execute(
                    "DELETE FROM timer_fires WHERE ctid IN (SELECT ctid FROM timer_fires"
                    " WHERE schedule = $1 AND fire_time < $2 AND fired_at < $2 LIMIT $3)",
                    self.name,
                    before,
                    _PRUNE_BATCH,
                )
                if int(status.split()[-1]) < _PRUNE_BATCH:
                    return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            ctx.logger.warning("timer %s: pruning old claims failed: %r", self.name, exc)

    async def _claim_and_publish(
        self, ctx: SourceContext, tick: datetime, claiming: list[float]
    ) -> bool:
        """Claim, publish and commit one tick; False when another instance already fired it.
        Adds the seconds the claim's INSERT took (it waits on another instance's uncommitted
        claim of the same tick) to ``claiming[0]``.

        Raises BusError (claim released; BusUnavailable also when the publish took more than
        half the lease) or StoreError.
        """
        lease_ms = int(self.config.claim_lease * 1000)
        try:
            async with ctx.pool.acquire() as conn, conn.transaction():
                # SET LOCAL takes no bind parameters; lease_ms is an int from validated config.
                await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {lease_ms}")
                began = time.monotonic()
                try:
                    claimed = await conn.fetchval(
                        "INSERT INTO timer_fires (schedule, fire_time, instance, fired_at)"
                        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
                        self.name,
                        tick,
                        ctx.instance_id,
                        ctx.clock.now(),
                    )
                finally:
                    claiming[0] += time.monotonic() - began
                if not claimed:
                    return False
                # Give up well inside the lease and roll back ourselves, so Postgres's own
                # release is left for claimants that cannot (frozen, dead, cut off).
                patience = self.config.claim_lease / 2
                try:
                    async with asyncio.timeout(patience):
                        await ctx.emit(self._event(tick))
                except TimeoutError as exc:
                    raise BusUnavailable(
                        f"timer {self.name}: publishing {_iso(tick)} took over {patience:g} s"
                    ) from exc
        except (
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as exc:
            raise StoreError(f"timer {self.name}: claiming {_iso(tick)}: {exc}") from exc
        return True

    def _event(self, tick: datetime) -> dict[str, Any]:
        return _tick_event(self.config, tick)


def _tick_event(config: TimerSourceSpec, tick: datetime) -> dict[str, Any]:
    when = _iso(tick)
    return new_event(
        type=config.event_type,
        source=f"eventbus://timer/{config.name}",
        id=f"{config.name}/{when}",
        time=when,
        subject=config.subject,
        data=config.data,
    )
