"""SIGKILL with retries pending in PostgreSQL, restart: every delivery is sent, none lost, and
none sent more often than at-least-once allows (one extra send per crash at most)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from tests.app.test_crash import _publish
from tests.fixtures.receiver import Receiver, Response
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


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigkill_while_a_dead_letters_copy_is_in_flight_then_restart(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, database_dsn: str
) -> None:
    # A retry ran out of attempts: its dead letter was written, then its copy for the
    # dead_letter_target sent from memory. Killed meanwhile, the copy was never sent.
    receiver.respond(503)
    fixed = {"strategy": "fixed", "initial_delay": "1s", "jitter": False}
    async with Receiver() as dlq:
        dlq.respond(Response(503, delay=3.0))  # slow: the copy is in flight when killed
        targets = [
            {
                "name": "fn",
                "type": "http",
                "url": receiver.url("/fn"),
                "timeout": 2,
                "delivery": {
                    "retry": {**fixed, "max_attempts": 2},
                    "circuit_breaker": False,
                    "dead_letter_target": "dlq",
                },
            },
            {
                "name": "dlq",
                "type": "http",
                "url": dlq.url("/dlq"),
                "timeout": 4,
                "delivery": {"retry": {**fixed, "max_attempts": 5}, "circuit_breaker": False},
            },
        ]
        first = serve_process(rules=RULES, targets=targets)
        await first.start()
        assert len(await _publish(first.url, 1, prefix="c")) == 1
        await dlq.wait_for(1, timeout=30)  # the second attempt failed: the copy goes out
        await first.kill()
        dlq.respond(204)
        second = serve_process(rules=RULES, targets=targets)
        await second.start()

        def copied() -> bool:
            return any(r.status == 204 for r in dlq.requests)

        await eventually(copied, within=90, what="the dead letter's copy delivered")
        conn = await asyncpg.connect(database_dsn)
        try:
            await eventually(
                lambda: _count(conn, "dead_letters", 1), within=30, what="one dead letter"
            )
        finally:
            await conn.close()
        await second.terminate()


async def _count(conn: asyncpg.Connection, table: str, n: int) -> bool:
    return bool(await conn.fetchval(f"SELECT count(*) FROM {table}") == n)
