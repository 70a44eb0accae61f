"""``eventbus serve --workers N`` answers as one service: whichever worker takes a request,
``/metrics`` counts what every worker did, ``/sources`` shows every worker's sources and the
console's live stream shows every event whichever worker routed it (and ends when the service
stops, rather than holding its shutdown); what a previous run left in the shared directory
counts for nothing. The merge of several workers'
statuses of one source, as a table."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from eventbus.sources import SourceStatus
from eventbus.sources._shared import SharedStatuses, merge_statuses
from tests.fixtures.live import watch
from tests.fixtures.service import ServeProcess
from tests.fixtures.wait import eventually

EVENTS = 60
REQUESTS = 20


async def _get(url: str) -> bytes:
    # a connection of its own each time: the kernel hands each new one to either worker
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


def _counter(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_any_worker_answers_for_all(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await _answers_for_all(serve_process, tmp_path, stack)


async def _answers_for_all(
    serve_process: Callable[..., ServeProcess], tmp_path: Path, stack: contextlib.AsyncExitStack
) -> None:
    proc = serve_process(
        rules=(
            "- name: none\n  match: {type: [never]}\n  targets: [fn]\n"
            "- name: doomed\n  match: {type: [doomed]}\n"
            "  targets: [{name: fn, delivery: {retry: none}}]\n"
        ),
        targets=[
            {
                "name": "fn",
                "type": "http",
                "url": "http://127.0.0.1:9/fn",
                # every delivery fails at once, none parked behind an open circuit
                "delivery": {"circuit_breaker": False},
            }
        ],
        sources=[{"name": "tick", "type": "timer", "schedule": "0 3 * * *"}],
        workers=2,
        # an open live stream must not hold the shutdown for this long (terminate waits 30 s)
        settings={"router": {"shutdown_grace": 120}},
    )
    data = Path(str(proc.config).replace("settings-", "data-").removesuffix(".yaml"))
    # a crashed run's leftovers, which must not show
    (data / "workers" / "sources").mkdir(parents=True)
    (data / "workers" / "sources" / "999999.json").write_bytes(
        orjson.dumps([SourceStatus(name="ghost", type="timer").to_dict()])
    )
    await proc.start()

    async def one(i: int, kind: str = "t") -> None:
        await proc.publish(
            {"specversion": "1.0", "id": f"w-{i}", "source": "tests/workers", "type": kind}
        )

    # start() returns once one worker answers: the stream must find both (a worker that
    # starts later is found by the watching one's next scan, up to a second later)
    await eventually(
        lambda: proc.log.read_text().count("eventbus ready") == 2,
        within=60,
        what="both workers ready",
    )
    # each worker's lines say which one logged them (their summaries could not be told apart)
    ready = [line for line in proc.log.read_text().splitlines() if "eventbus ready" in line]
    assert sorted(re.search(r"\[worker (\d)\]", line)[1] for line in ready) == ["0", "1"]
    session = await stack.enter_async_context(aiohttp.ClientSession())
    stream = await stack.enter_async_context(watch(session, proc.url + "/events/live"))
    # one connection per event: both workers take some (all on one: odds 2 ** -59)
    await asyncio.gather(*(one(i) for i in range(EVENTS)))
    # whichever worker routed an event, the one stream saw it
    await stream.until(lambda s: len(s.rows) == EVENTS, within=30)
    assert {row[0]["state"] for row in stream.rows.values()} == {"unmatched"}

    async def routed_all() -> bool:
        text = (await _get(proc.url + "/metrics")).decode()
        return _counter(text, "eventbus_events_routed_total") == EVENTS

    await eventually(routed_all, within=30, what="every event routed, as /metrics counts")
    for _ in range(REQUESTS):
        text = (await _get(proc.url + "/metrics")).decode()
        assert _counter(text, 'eventbus_events_received_total{via="http"}') == EVENTS
        assert _counter(text, "eventbus_events_routed_total") == EVENTS

    async def timer_running_in_every_answer() -> bool:
        # the timer runs in the first worker only; the other shows what its file said up to a
        # second ago (the timer shows starting until it has read its checkpoint)
        for _ in range(REQUESTS):
            sources = orjson.loads(await _get(proc.url + "/sources"))["sources"]
            if [(s["name"], s["state"]) for s in sources] != [("tick", "running")]:
                return False
        return True

    await eventually(timer_running_in_every_answer, what="every worker: the timer running")
    # The console's figures count every worker's deliveries too: events that dead-letter at
    # once (the function refuses connections), on connections either worker takes.
    await asyncio.gather(*(one(EVENTS + i, "doomed") for i in range(EVENTS)))

    def dead_lettered(answer: dict[str, Any]) -> float:
        return float(answer["targets"].get("fn", {}).get("dead-lettered", 0))

    async def all_dead_lettered() -> bool:
        rates = orjson.loads(await _get(proc.url + "/stats/rates"))
        return dead_lettered(rates) == EVENTS

    await eventually(all_dead_lettered, within=30, what="every dead letter counted")
    for _ in range(REQUESTS):
        rates = orjson.loads(await _get(proc.url + "/stats/rates"))
        assert dead_lettered(rates) == EVENTS
        activity = orjson.loads(await _get(proc.url + "/stats/targets"))
        assert activity["targets"]["fn"]["failed"] > 0
    assert await proc.terminate(timeout=30) == 0  # the live stream still open
    assert not (data / "workers").exists()


HELD = 12


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_any_worker_counts_every_workers_deliveries_in_flight(
    serve_process: Callable[..., ServeProcess],
) -> None:
    """A function that holds its answers: the deliveries waiting for it, routed by either
    worker, are all counted by whichever worker answers ``GET /stats/targets``."""
    release = asyncio.Event()
    arrived: list[bytes] = []

    async def hold(request: web.Request) -> web.Response:
        arrived.append(await request.read())
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/slow", hold)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    proc = serve_process(
        rules="- name: held\n  match: {type: [held]}\n  targets: [slow]\n",
        targets=[{"name": "slow", "type": "http", "url": f"http://127.0.0.1:{port}/slow"}],
        workers=2,
    )
    try:
        await proc.start()
        await eventually(
            lambda: proc.log.read_text().count("eventbus ready") == 2,
            within=60,
            what="both workers ready",
        )

        async def one(i: int) -> None:
            event = {"specversion": "1.0", "id": f"h-{i}", "source": "tests/workers"}
            await proc.publish({**event, "type": "held"})

        await asyncio.gather(*(one(i) for i in range(HELD)))
        await eventually(lambda: len(arrived) == HELD, within=30, what="every delivery held")

        async def in_flight() -> int:
            answer = orjson.loads(await _get(proc.url + "/stats/targets"))
            return int(answer["targets"]["slow"]["in_flight"])

        await eventually(lambda: _is(in_flight(), HELD), within=10, what="all held counted")
        answers = [
            orjson.loads(await _get(proc.url + "/stats/targets"))["targets"]["slow"]["in_flight"]
            for _ in range(REQUESTS)
        ]
        assert answers == [HELD] * REQUESTS
        release.set()

        await eventually(lambda: _is(in_flight(), 0), within=30, what="the deliveries done")
        assert await proc.terminate(timeout=30) == 0
    finally:
        release.set()
        await runner.cleanup()


T1 = datetime(2026, 1, 1, tzinfo=UTC)
T2 = datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("copies", "expected"),
    [
        (
            [SourceStatus("k", "kafka", "running", 3, 0, T1, None, 5)],
            SourceStatus("k", "kafka", "running", 3, 0, T1, None, 5),
        ),
        (
            [
                SourceStatus("k", "kafka", "running", 3, 1, T2, "old", 5),
                SourceStatus("k", "kafka", "backoff", 4, 2, T1, "E: down", 9),
            ],
            SourceStatus("k", "kafka", "backoff", 7, 3, T2, "old", 9),
        ),
        (
            [
                SourceStatus("k", "kafka", "stopped", 0, 0, None, None, None),
                SourceStatus("k", "kafka", "running", 1, 0, T1, None, 0),
            ],
            SourceStatus("k", "kafka", "running", 1, 0, T1, None, 0),
        ),
    ],
)
def test_copies_of_a_source_merge_into_one(
    copies: list[SourceStatus], expected: SourceStatus
) -> None:
    other = SourceStatus("t", "timer", "failed", 1, 1, None, "bad", None)
    assert merge_statuses([copies[0], other, *copies[1:]]) == [expected, other]


def test_a_reaped_workers_source_counts_stay_in_the_sums(tmp_path: Path) -> None:
    # The parent removed a dead worker's file: the Kafka ingest's count in GET /sources fell
    # from 324 to 107 while the metric went on counting.
    live = SharedStatuses(tmp_path)
    dead = tmp_path / "4242.json"
    dead.write_bytes(
        orjson.dumps(
            [
                SourceStatus("k", "kafka", "failed", 300, 2, T2, "broker gone", 5).to_dict(),
                SourceStatus("t", "timer", "running", 4, 0, T1, None, None).to_dict(),
            ]
        )
    )
    SharedStatuses.retire(tmp_path, 4242)
    SharedStatuses.retire(tmp_path, 4243)  # one that never wrote a file
    assert not dead.exists()
    own = [SourceStatus("k", "kafka", "running", 7, 0, T1, None, 0)]
    assert live.read(own) == [
        SourceStatus("k", "kafka", "running", 307, 2, T2, None, 0),
        SourceStatus("t", "timer", "stopped", 4, 0, T1, None, None),
    ]
    # a second worker reaped adds to what the first left
    (tmp_path / "4244.json").write_bytes(
        orjson.dumps([SourceStatus("k", "kafka", "running", 10, 0, T1, None, 0).to_dict()])
    )
    SharedStatuses.retire(tmp_path, 4244)
    assert live.read(own)[0].events == 317
