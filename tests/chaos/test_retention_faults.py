"""Retention under a database crash: PostgreSQL killed (SIGKILL, the postmaster and every
backend) in the middle of a round of pruning. The round fails, the next one after the restart
finishes it, and the ledger of rows reconciles: every row past its age gone, every row kept
(recent ones, and the trails of dead letters) whole."""

from __future__ import annotations

import contextlib
import logging
import shutil

import psutil
import pytest

from eventbus import metrics
from eventbus.store import EmbeddedPostgres, Pruner, RetentionPolicy, Store
from tests.fixtures.postgres import private_data_root, stop_servers_under
from tests.fixtures.wait import eventually

pytestmark = pytest.mark.slow

OLD_EVENTS = 20_000
DEAD = 50
RECENT = 100


def _deleted(table: str) -> float:
    value = metrics.REGISTRY.get_sample_value("eventbus_retention_deleted_total", {"table": table})
    return value or 0.0


async def _fill(store: Store) -> None:
    async with store.pool.acquire() as conn:
        for prefix, count, at in (
            ("old", OLD_EVENTS, "now() - interval '40 days'"),
            ("dead", DEAD, "now() - interval '40 days'"),
            ("new", RECENT, "now()"),
        ):
            series = f"FROM generate_series(1, {count}) n"
            await conn.execute(
                "INSERT INTO events (source, id, received_at, via, event)"
                f" SELECT '/s', '{prefix}-' || n, {at}, 'http', '{{}}' {series}"
            )
            await conn.execute(
                "INSERT INTO matches (source, id, rule, target, at)"
                f" SELECT '/s', '{prefix}-' || n, 'r', 't', {at} {series}"
            )
            await conn.execute(
                "INSERT INTO attempts (source, id, rule, target, attempt, outcome,"
                f" duration_ms, at) SELECT '/s', '{prefix}-' || n, 'r', 't', 1, 'failed', 1,"
                f" {at} {series}"
            )
        await conn.execute(
            "INSERT INTO dead_letters (event_source, event_id, event, rule, target, payload,"
            " is_cloudevent, attempts, history, reason, first_attempt_at)"
            " SELECT '/s', 'dead-' || n, '{}', 'r', 't', '{}', true, 1, '[]',"
            f" 'attempts-exhausted', now() FROM generate_series(1, {DEAD}) n"
        )


async def _ledger(store: Store) -> dict[str, dict[str, int]]:
    """Rows left per table, by the prefix of their event's id."""
    out: dict[str, dict[str, int]] = {}
    async with store.pool.acquire() as conn:
        for table in ("events", "matches", "attempts"):
            rows = await conn.fetch(
                f"SELECT split_part(id, '-', 1) AS kind, count(*) AS n FROM {table} GROUP BY 1"
            )
            out[table] = {r["kind"]: r["n"] for r in rows}
    return out


async def test_postgres_killed_mid_prune(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "eventbus.store._retention")
    root = private_data_root()
    pg = EmbeddedPostgres(root / "postgres")
    await pg.start()
    pruner: Pruner | None = None
    try:
        store = await Store.open(pg.dsn)
        try:
            await _fill(store)
            before = _deleted("attempts")
            policy = RetentionPolicy(audit=30 * 86400.0, every=1)
            pruner = Pruner(store.pool, policy, batch=200, timeout=5)
            pruner.start()
            await eventually(
                lambda: _deleted("attempts") - before >= 1000,
                within=30,
                every=0.005,
                what="the round under way",
            )
            assert pg.pid is not None
            postmaster = psutil.Process(pg.pid)
            backends = postmaster.children(recursive=True)
            for proc in [postmaster, *backends]:  # the postmaster first: it restarts backends
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs([postmaster, *backends], timeout=10)
            await eventually(
                lambda: "retention: pruning failed" in caplog.text,
                within=15,
                what="the round's failure logged",
            )
            await pg.restart()

            async def pruned() -> dict[str, dict[str, int]] | None:
                try:
                    ledger = await _ledger(store)
                except (OSError, ConnectionError):
                    return None
                return None if any("old" in kinds for kinds in ledger.values()) else ledger

            ledger = await eventually(pruned, within=60, every=0.2, what="the old rows pruned")
            assert ledger == {
                table: {"dead": DEAD, "new": RECENT} for table in ("events", "matches", "attempts")
            }
            assert "retention: deleted" in caplog.text
        finally:
            if pruner is not None:
                await pruner.stop()
            await store.close()
    finally:
        try:
            await pg.stop()
        finally:
            stop_servers_under(root)
            shutil.rmtree(root, ignore_errors=True)
