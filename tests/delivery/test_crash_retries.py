"""SIGKILL with retries pending in PostgreSQL, restart: every delivery is sent, none lost, and
none sent more often than at-least-once allows (one extra send per crash at most)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from tests.app.test_crash import _publish
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import ServeProcess
from tests.fixtures.wait import eventually

RULES = """
- name: everything
  targets: [fn]
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigkill_with_pending_retries_then_restart(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    receiver.respond(503)
    delivery = {
        "retry": {"strategy": "fixed", "initial_delay": "2s", "max_attempts": 50, "jitter": False},
        "circuit_breaker": False,
    }
    targets = [{"name": "fn", "type": "http", "url": receiver.url("/fn"), "delivery": delivery}]
    first = serve_process(rules=RULES, targets=targets)
    await first.start()
    accepted = await _publish(first.url, 100, prefix="r")
    assert len(accepted) == 100

    conn = await asyncpg.connect(database_dsn)

    async def pending(n: int) -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM delivery_retries") == n)

    try:
        await eventually(lambda: pending(100), within=20, what="100 retries pending")
        await first.kill()
        receiver.respond(204)
        second = serve_process(rules=RULES, targets=targets)
        await second.start()
        await eventually(lambda: pending(0), within=30, what="no retry pending")
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        await conn.close()
    ok = Counter(r.cloudevent["id"] for r in receiver.requests if r.status == 204)
    assert set(ok) == accepted
    assert max(ok.values()) <= 2
    await second.terminate()
