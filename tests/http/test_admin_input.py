"""Admin routes on a running service (real NATS and PostgreSQL): input the database cannot hold
is a 400 naming the parameter, never a 503 blaming the database; and the read routes answer 503
promptly while PostgreSQL is frozen."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from eventbus.store import EmbeddedPostgres
from tests.fixtures.postgres import private_data_root
from tests.fixtures.service import RunningService, StartService

HUGE = "99999999999999999999"

BAD_INPUT = [
    ("GET", f"/dead-letters/{HUGE}", "dl_id"),
    ("DELETE", f"/dead-letters/{HUGE}", "dl_id"),
    ("POST", f"/dead-letters/{HUGE}/replay", "dl_id"),
    ("GET", f"/dead-letters?id={HUGE}", "id"),
    ("GET", f"/dead-letters?id=1&id=-{HUGE}", "id"),
    ("GET", f"/dead-letters?after={HUGE}", "after"),
    ("GET", "/dead-letters?status=4294967296", "status"),
    ("GET", "/dead-letters?rule=a%00b", "rule"),
    ("GET", "/dead-letters?target=%00", "target"),
    ("GET", "/dead-letters?reason=x%00", "reason"),
    ("DELETE", "/dead-letters?reason=unknwon", "reason"),  # must be one of ..., got 'unknwon'
    ("GET", "/dead-letters?source=%00", "source"),
    ("GET", "/dead-letters?since=0000-01-01", "since"),
    ("GET", "/dead-letters?since=10000-01-01", "since"),
    ("GET", "/dead-letters?until=0001-01-01T00:00:00%2B01:00", "until"),
    ("GET", "/dead-letters?until=9999-12-31T23:59:59-00:01", "until"),
    ("GET", "/dead-letters?since=2024-01-01T00:00:00%2B24:00", "since"),
    ("POST", "/dead-letters/replay?rule=%00", "rule"),
    ("POST", "/dead-letters/replay?since=0001-01-01T00:00:00%2B23:59", "since"),
    ("DELETE", "/dead-letters?target=a%00", "target"),
    ("DELETE", f"/dead-letters?id={HUGE}", "id"),
    ("GET", "/events?source=a%00", "source"),
    ("GET", "/events?type=%00", "type"),
    ("GET", "/events?since=0000-01-01", "since"),
    ("GET", "/events?until=9999-12-31T23:59:59-00:01", "until"),
    ("GET", f"/events?after={HUGE}-1", "after"),
    ("GET", "/events/trail?source=a%00&id=x", "source"),
    ("GET", "/events/trail?source=s&id=%00", "id"),
    ("GET", "/sources/dead-letters?source=%00", "source"),
    ("GET", "/sources/dead-letters?payload_bytes=0", "payload_bytes"),
    ("GET", f"/sources/dead-letters?payload_bytes={HUGE}", "payload_bytes"),
    ("POST", "/targets/a%00b/enable", "target name"),
    # int() takes these, and an odd spelling named, replayed or deleted a real dead letter
    ("GET", "/dead-letters/%EF%BC%97", "dl_id"),  # a fullwidth 7
    ("DELETE", "/dead-letters/1_000", "dl_id"),
    ("POST", "/dead-letters/+7/replay", "dl_id"),
    ("GET", "/dead-letters?id=%E0%A5%AD", "id"),  # a Devanagari 7
    ("DELETE", "/dead-letters?id=%207", "id"),
    # a window ending before it begins selects nothing: a replay or purge by it did nothing
    ("POST", "/dead-letters/replay?since=2027-01-01&until=2020-01-01", "since"),
    ("DELETE", "/dead-letters?since=2027-01-01&until=2020-01-01", "since"),
    ("GET", "/dead-letters?since=2027-01-01&until=2020-01-01", "since"),
    # a misspelt parameter was dropped: the call replayed or deleted more than it asked for
    ("DELETE", "/dead-letters?source=s&reson=non-retryable", "reson"),
    ("POST", "/dead-letters/replay?rule=r&traget=fn", "traget"),
    ("DELETE", "/dead-letters?all=true&limit=5", "limit"),
]


async def _start(eventbus: StartService, **settings: object) -> RunningService:
    return await eventbus(rules="[]", targets=[], settings=settings or None)


async def test_input_the_database_cannot_hold_is_a_400_naming_the_parameter(
    eventbus: StartService,
) -> None:
    svc = await _start(eventbus)
    for method, path, parameter in BAD_INPUT:
        status, headers, problem = await svc.request(method, path)
        assert status == 400, (path, problem)
        assert headers["Content-Type"].startswith("application/problem+json"), path
        assert problem["detail"].startswith(parameter + " "), (path, problem["detail"])
        assert "Retry-After" not in headers, path
    # the extremes that remain are fine
    for path in (
        f"/dead-letters?id={2**63 - 1}&id={-(2**63)}",
        "/dead-letters?since=0001-01-01T00:00:00-01:00&until=9999-12-31T23:59:59%2B01:00",
        "/events/trail?source=caf%C3%A9&id=%F0%9F%98%80",
    ):
        status, _, body = await svc.request("GET", path)
        assert status in (200, 404), (path, body)
    status, _, _ = await svc.request("GET", "/readyz")
    assert status == 200


def _server_processes(data_dir: str) -> list[psutil.Process]:
    """The postmaster running on ``data_dir`` and every process it started."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(data_dir in part for part in proc.info["cmdline"] or ()):
            return [proc, *proc.children(recursive=True)]
    raise AssertionError(f"no PostgreSQL runs on {data_dir}")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_reads_answer_503_promptly_while_postgres_is_frozen(eventbus: StartService) -> None:
    root = private_data_root()
    pg = EmbeddedPostgres(root / "data")
    await pg.start()
    try:
        svc = await _start(eventbus, database={"url": pg.dsn})
        reads = (
            "/dead-letters",
            "/dead-letters/1",
            "/events?type=t",
            "/events/trail?source=s&id=i",
            "/sources/dead-letters",
        )
        for path in reads:
            assert (await svc.request("GET", path))[0] in (200, 404), path
        frozen = _server_processes(str(root))
        for proc in frozen:
            proc.suspend()
        try:
            answers = await asyncio.gather(*(svc.request("GET", path) for path in reads))
        finally:
            for proc in frozen:
                proc.resume()
        for path, (status, headers, problem) in zip(reads, answers, strict=True):
            assert status == 503, (path, problem)
            assert "did not answer within" in problem["detail"], path
            assert headers["Retry-After"], path
        # and once it thaws, the same reads work again
        for path in reads:
            assert (await svc.request("GET", path))[0] in (200, 404), path
        await svc.stop()
    finally:
        await pg.stop()
