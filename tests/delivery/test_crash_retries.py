"""SIGKILL with retries pending in PostgreSQL, restart: every delivery is sent, none lost, and
none sent more often than at-least-once allows (one extra send per crash at most)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from tests.app.test_crash import _publish
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import ServeProcess

RULES = """
- name: everything
  targets: [fn]
"""


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
    try:
        for _ in range(200):
            pending = await conn.fetchval("SELECT count(*) FROM delivery_retries")
            if pending == 100:
                break
            await asyncio.sleep(0.1)
        assert pending == 100
        await first.kill()
        receiver.respond(204)
        second = serve_process(rules=RULES, targets=targets)
        await second.start()
        for _ in range(300):
            pending = await conn.fetchval("SELECT count(*) FROM delivery_retries")
            if pending == 0:
                break
            await asyncio.sleep(0.1)
        assert pending == 0
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        await conn.close()
    ok = Counter(r.cloudevent["id"] for r in receiver.requests if r.status == 204)
    assert set(ok) == accepted
    assert max(ok.values()) <= 2
    await second.terminate()
