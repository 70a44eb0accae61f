"""The timer source against real Postgres and the real NATS bus, on a ManualClock (no sleeps)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from eventbus._errors import ConfigError
from eventbus.sources import Source, SourceContext, build_source
from eventbus.sources._timer import TimerSource
from tests.fixtures.wait import eventually
from tests.sources._harness import WAIT, ManualClock, running, source_pool
from tests.sources.test_queue_support import bus_tap, context

START = datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC)


def timer(name: str, **settings: Any) -> Source:
    spec = {"name": name, "type": "timer", "schedule": "rate(1 minute)", **settings}
    return build_source(spec)


async def fires(pool: asyncpg.Pool, name: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT fire_time FROM timer_fires WHERE schedule = $1 ORDER BY fire_time", name
    )
    return [row["fire_time"].astimezone(UTC).strftime("%H:%M") for row in rows]


async def _fired(pool: asyncpg.Pool, name: str, expected: list[str]) -> bool:
    return await fires(pool, name) == expected


async def settle(clock: ManualClock, sleepers: int = 1) -> None:
    """Wait until every running instance is asleep again, i.e. has handled what was due."""
    async with asyncio.timeout(WAIT):
        await clock.wait_for_sleepers(sleepers)


async def test_ticks_arrive_on_the_bus_with_documented_attributes(
    database_dsn: str, nats_url: str
) -> None:
    clock = ManualClock(START)
    source = timer(
        "nightly",
        schedule="*/1 * * * *",
        timezone="Europe/Berlin",
        data={"job": "report"},
        event_type="com.example.report.due",
        subject="reports",
    )
    assert isinstance(source, TimerSource)
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "nightly", tap, type="timer", clock=clock)
        async with running(source, ctx):
            await settle(clock)
            clock.advance(30)
            await settle(clock)
            clock.advance(60)
            await settle(clock)
        events = await tap.take(2)
        assert [e["id"] for e in events] == [
            "nightly/2026-01-01T10:01:00Z",
            "nightly/2026-01-01T10:02:00Z",
        ]
        first = events[0]
        assert first["time"] == "2026-01-01T10:01:00Z"
        assert first["type"] == "com.example.report.due"
        assert first["source"] == "eventbus://timer/nightly"
        assert first["subject"] == "reports"
        assert first["data"] == {"job": "report"}
        assert ctx.status.events == 2
        assert await ctx.checkpoints.get("through") == "2026-01-01T10:02:00Z"


async def test_ticks_due_while_the_machine_slept_fire_when_it_wakes(
    database_dsn: str, nats_url: str
) -> None:
    # Suspended 8 hours while sleeping toward 11:00: a sleep is on the monotonic clock, which
    # stood still, and the timer woke at 19:00 (8 hours after its tick) when it slept the whole
    # wait at once. It reads the wall clock at least every 30 s.
    clock = ManualClock(START)
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "hourly", tap, type="timer", clock=clock)
        async with running(timer("hourly", schedule="0 * * * *", missed="skip"), ctx):
            await settle(clock)
            clock.suspend(8 * 3600)  # from 10:00:30 to 18:00:30
            clock.advance(30)
            await eventually(lambda: _fired(pool, "hourly", ["11:00"]), what="the 11:00 tick")
            await settle(clock)
        assert [e["time"][11:16] for e in await tap.take(1)] == ["11:00"]


async def test_two_instances_fire_each_tick_exactly_once(database_dsn: str, nats_url: str) -> None:
    clock = ManualClock(START)
    async with (
        source_pool(database_dsn) as pool_a,
        source_pool(database_dsn) as pool_b,
        bus_tap(nats_url) as tap,
    ):
        ctx_a = context(pool_a, "shared", tap, type="timer", clock=clock, instance_id="a")
        ctx_b = context(pool_b, "shared", tap, type="timer", clock=clock, instance_id="b")
        async with running(timer("shared"), ctx_a), running(timer("shared"), ctx_b):
            await settle(clock, 2)
            for _ in range(5):
                clock.advance(60)
                await settle(clock, 2)
        # Counted at the publish call, before the bus could deduplicate anything.
        assert tap.published == 5
        assert ctx_a.status.events + ctx_b.status.events == 5
        assert await fires(pool_a, "shared") == ["10:01", "10:02", "10:03", "10:04", "10:05"]
        events = await tap.take(5)
        assert len({e["id"] for e in events}) == 5


async def test_claims_older_than_a_week_are_deleted(database_dsn: str, nats_url: str) -> None:
    # One row per tick, kept for good: a timer every second added 86,400 rows a day.
    clock = ManualClock(START)
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        await pool.execute(
            "INSERT INTO timer_fires (schedule, fire_time, instance, fired_at) VALUES"
            " ('pruned', $1, 'old', $1), ('other', $1, 'old', $1)",
            START - timedelta(days=8),
        )
        ctx = context(pool, "pruned", tap, type="timer", clock=clock)
        async with running(timer("pruned"), ctx):
            await settle(clock)
            clock.advance(60)
            await settle(clock)

            async def pruned() -> bool:
                return await fires(pool, "pruned") == ["10:01"]

            await eventually(pruned, what="the old claim deleted, beside the ticks")
        assert len(await fires(pool, "other")) == 1  # another schedule's are its own


@pytest.mark.parametrize(
    ("missed", "expected"),
    [
        ("skip", ["10:01", "10:12"]),
        ("once", ["10:01", "10:11", "10:12"]),
        ("catch-up", ["10:01", "10:09", "10:10", "10:11", "10:12"]),
    ],
)
async def test_downtime_follows_the_missed_policy(
    database_dsn: str, nats_url: str, missed: str, expected: list[str]
) -> None:
    clock = ManualClock(START)
    name = f"policy-{missed}"
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, name, tap, type="timer", clock=clock)
        async with running(timer(name, missed=missed, max_catch_up=3), ctx):
            await settle(clock)
            clock.advance(60)
            await settle(clock)
        clock.advance(600)  # down from 10:01:30 to 10:11:30: ten ticks missed
        async with running(timer(name, missed=missed, max_catch_up=3), ctx):
            await settle(clock)
            clock.advance(60)
            await settle(clock)
        assert await fires(pool, name) == expected
        events = await tap.take(len(expected))
        assert [e["time"][11:16] for e in events] == expected


async def test_two_instances_catching_up_fire_each_missed_tick_once(
    database_dsn: str, nats_url: str
) -> None:
    clock = ManualClock(START)
    async with (
        source_pool(database_dsn) as pool_a,
        source_pool(database_dsn) as pool_b,
        bus_tap(nats_url) as tap,
    ):
        await pool_a.execute(
            "INSERT INTO source_checkpoints (source, key, value)"
            " VALUES ('both', 'through', '\"2026-01-01T09:55:00Z\"')"
        )
        ctx_a = context(pool_a, "both", tap, type="timer", clock=clock, instance_id="a")
        ctx_b = context(pool_b, "both", tap, type="timer", clock=clock, instance_id="b")
        catch_up = timer("both", missed="catch-up")
        async with running(catch_up, ctx_a), running(timer("both", missed="catch-up"), ctx_b):
            await settle(clock, 2)
        assert tap.published == 5
        assert await fires(pool_a, "both") == ["09:56", "09:57", "09:58", "09:59", "10:00"]


async def test_bus_down_releases_the_claim_and_retries(database_dsn: str, nats_url: str) -> None:
    clock = ManualClock(START)
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "flaky", tap, type="timer", clock=clock)
        async with running(timer("flaky"), ctx):
            await settle(clock)
            tap.down = True
            clock.advance(30)
            await tap.wait_refused(1)
            await settle(clock)  # backing off
            assert ctx.status.state == "backoff"
            assert await fires(pool, "flaky") == []
            assert await ctx.checkpoints.get("through") == "2026-01-01T10:00:30Z"
            tap.down = False
            clock.advance(5)
            await tap.wait_published(1)
            await settle(clock)
        assert ctx.status.state == "running"
        assert await fires(pool, "flaky") == ["10:01"]
        assert [e["id"] for e in await tap.take(1)] == ["flaky/2026-01-01T10:01:00Z"]


async def test_claimant_whose_publish_hangs_gives_the_tick_up(
    database_dsn: str, nats_url: str
) -> None:
    clock = ManualClock(START)
    hung = asyncio.Event()

    async def hang(event: dict[str, Any]) -> None:
        hung.set()
        await asyncio.Event().wait()

    async with (
        source_pool(database_dsn) as pool_a,
        source_pool(database_dsn) as pool_b,
        bus_tap(nats_url) as tap,
    ):
        ctx_a = context(pool_a, "lease", tap, type="timer", clock=clock, instance_id="a")
        ctx_a.publish = hang
        ctx_b = context(pool_b, "lease", tap, type="timer", clock=clock, instance_id="b")
        async with running(timer("lease", claim_lease=2, missed="once"), ctx_a):
            await settle(clock)
            clock.advance(30)
            async with asyncio.timeout(WAIT):
                await hung.wait()
            # B starts late, so 10:01 is a missed tick it fires under "once"; it waits on A's
            # claim until A gives up.
            async with running(timer("lease", claim_lease=2, missed="once"), ctx_b):
                await tap.wait_published(1)
            # A's rollback is what lets B's claim through, so B may publish before A, still
            # handing its connection back to the pool, has reported the error.
            await eventually(
                lambda: ctx_a.status.state == "backoff", within=WAIT, what="A backing off"
            )
            # (a lease of 2 s: at 0.5 s, on a loaded machine, PostgreSQL's own timeout of the idle
            # transaction could end A's connection before A rolled back by itself)
            assert "took over 1 s" in (ctx_a.status.last_error or "")
        assert await fires(pool_b, "lease") == ["10:01"]
        row = await pool_b.fetchrow("SELECT instance FROM timer_fires WHERE schedule = 'lease'")
        assert row is not None and row["instance"] == "b"
        assert [e["id"] for e in await tap.take(1)] == ["lease/2026-01-01T10:01:00Z"]


async def _frozen_claim(
    dsn: str, schedule: str, tick: datetime, released_after_ms: int
) -> asyncpg.Connection:
    """A claim of ``tick`` held by a session that never publishes nor commits: exactly what
    TimerSource does before publishing, then nothing (a frozen or dead claimant). PostgreSQL
    ends the session after ``released_after_ms``."""
    frozen = await asyncpg.connect(dsn)
    await frozen.execute("BEGIN")
    await frozen.execute(f"SET LOCAL idle_in_transaction_session_timeout = {released_after_ms}")
    await frozen.execute(
        "INSERT INTO timer_fires (schedule, fire_time, instance) VALUES ($1, $2, 'x')",
        schedule,
        tick.replace(tzinfo=UTC),
    )
    return frozen


async def test_dead_claimant_loses_its_claim_after_the_lease(
    database_dsn: str, nats_url: str
) -> None:
    """A claim held by a session that never publishes nor commits (a frozen or dead process)
    is released by Postgres after the lease, and the tick is fired by a live instance."""
    clock = ManualClock(START)
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        frozen = await _frozen_claim(database_dsn, "frozen", datetime(2026, 1, 1, 10, 1), 500)
        try:
            ctx = context(pool, "frozen", tap, type="timer", clock=clock)
            async with running(timer("frozen", claim_lease=0.5), ctx):
                await settle(clock)
                clock.advance(30)
                await tap.wait_published(1)
                await settle(clock)
            assert frozen.is_closed() or not frozen.is_in_transaction()
        finally:
            await frozen.close()
        assert await fires(pool, "frozen") == ["10:01"]
        assert [e["id"] for e in await tap.take(1)] == ["frozen/2026-01-01T10:01:00Z"]


async def test_ticks_due_while_waiting_on_a_frozen_claimant_are_fired_not_skipped(
    database_dsn: str, nats_url: str
) -> None:
    """This instance was up while another's claim held it back: the ticks that came due
    meanwhile were fired nowhere, and "skip" dropped them (a 1 s schedule lost up to 30). Those
    within claim_lease of the claim are fired late; later ones, due while the wait was no
    longer for a claim (a stalled database), are missed ticks."""
    clock = ManualClock(START)  # 10:00:30
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        frozen = await _frozen_claim(database_dsn, "held", datetime(2026, 1, 1, 10, 0, 31), 3000)
        try:
            ctx = context(pool, "held", tap, type="timer", clock=clock)
            every = timer("held", schedule="* * * * * *", claim_lease=3, missed="skip")
            async with running(every, ctx):
                await settle(clock)
                clock.advance(1)  # 10:00:31 is due: the claim waits on the frozen one's
                await asyncio.sleep(0.5)
                clock.advance(10)  # 10:00:32 to 10:00:41 come due meanwhile
                await tap.wait_published(3)
                await settle(clock)
        finally:
            await frozen.close()
        # 32 and 33 lie within the lease of 31's claim; 34 to 41 are missed (skip)
        expected = ["10:00:31", "10:00:32", "10:00:33", "10:00:34"]
        rows = await pool.fetch(
            "SELECT fire_time FROM timer_fires WHERE schedule = 'held' ORDER BY fire_time"
        )
        fired = [r["fire_time"].astimezone(UTC).strftime("%H:%M:%S") for r in rows]
        assert fired == expected
        events = await tap.take(len(expected))
        assert [e["time"][11:19] for e in events] == expected


async def test_at_schedule_fires_once_then_stops(database_dsn: str, nats_url: str) -> None:
    clock = ManualClock(datetime(2030, 6, 1, 6, 59, tzinfo=UTC))
    source = timer("launch", schedule="at(2030-06-01T09:00:00)", timezone="Europe/Paris")
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "launch", tap, type="timer", clock=clock)
        task = asyncio.create_task(source.run(ctx))
        await settle(clock)
        clock.advance(60)
        async with asyncio.timeout(WAIT):
            await task  # returns: no ticks left
        assert [e["time"] for e in await tap.take(1)] == ["2030-06-01T07:00:00Z"]


async def test_a_fired_at_schedule_loads_and_stays_done_after_a_restart(
    database_dsn: str, nats_url: str
) -> None:
    # Once its time had passed, the at() refused to load: the next start of the service
    # exited (every rule, target and source down) until someone removed it from the file.
    clock = ManualClock(datetime(2019, 12, 31, 23, 59, tzinfo=UTC))
    spec = {"schedule": "at(2020-01-01T00:00:00)", "missed": "once"}  # past, for the loader
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx = context(pool, "once", tap, type="timer", clock=clock)
        task = asyncio.create_task(timer("once", **spec).run(ctx))
        await settle(clock)
        clock.advance(120)
        async with asyncio.timeout(WAIT):
            await task
        assert len(await tap.take(1)) == 1
        again = context(pool, "once", tap, type="timer", clock=clock)
        async with asyncio.timeout(WAIT):
            await timer("once", **spec).run(again)  # built, and done at once
        assert tap.published == 1 and again.status.errors == 0


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"schedule": "61 * * * *"}, "field 'schedule'.*invalid cron expression"),
        ({"schedule": "rate(5 fortnights)"}, "rate unit 'fortnights'"),
        (
            {"schedule": "rate(5 minutes)", "timezone": "Mars/Base"},
            "field 'timezone'.*unknown time zone",
        ),
        ({"schedule": "rate(1 minute)", "missed": "all"}, "field 'missed'"),
        ({"schedule": "rate(1 minute)", "max_catch_up": 0}, "field 'max_catch_up'"),
        ({"schedule": "rate(1 minute)", "cron": "x"}, "field 'cron'"),
        ({}, "field 'schedule'"),
        # loaded, then failed at every tick and never fired
        ({"schedule": "rate(1 minute)", "subject": ""}, "ticks cannot be events.*'subject'"),
        ({"schedule": "rate(1 minute)", "event_type": "a\tb"}, "control character"),
        ({"schedule": "rate(1 minute)", "data": "x" * 300_000}, "262144-byte limit"),
    ],
)
def test_bad_timer_config_names_the_source(settings: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=f"source 'bad-timer' \\(timer\\): .*{fragment}"):
        build_source({"name": "bad-timer", "type": "timer", **settings})


async def test_store_failure_does_not_lose_the_tick(database_dsn: str, nats_url: str) -> None:
    """Postgres refusing the claim is a transient failure: backoff, then the tick fires."""
    clock = ManualClock(START)
    async with source_pool(database_dsn) as pool, bus_tap(nats_url) as tap:
        ctx: SourceContext = context(pool, "pgdown", tap, type="timer", clock=clock)
        async with running(timer("pgdown"), ctx):
            await settle(clock)
            await pool.execute("ALTER TABLE timer_fires RENAME TO timer_fires_away")
            clock.advance(30)
            await settle(clock)
            assert ctx.status.state == "backoff"
            assert "timer_fires" in (ctx.status.last_error or "")
            await pool.execute("ALTER TABLE timer_fires_away RENAME TO timer_fires")
            clock.advance(5)
            await tap.wait_published(1)
            # its claim commits once the tick is on the bus: stopped before (a loaded run),
            # the claim rolled back, to be fired again at the next start
            await eventually(
                lambda: _fired(pool, "pgdown", ["10:01"]), what="the tick's claim committed"
            )
