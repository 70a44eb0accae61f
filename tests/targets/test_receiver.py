"""The ``receiver`` fixture itself: scripting order, seeded randomness, waiting, isolation,
restarting on the same port."""

from __future__ import annotations

import random

import aiohttp
import pytest

from tests.fixtures.receiver import Receiver, Response


async def post_many(receiver: Receiver, n: int, path: str = "/") -> list[int]:
    async with aiohttp.ClientSession() as session:
        statuses = []
        for i in range(n):
            async with session.post(receiver.url(path), data=b"%d" % i) as resp:
                await resp.read()
                statuses.append(resp.status)
        return statuses


async def test_script_then_random_then_default(receiver: Receiver) -> None:
    receiver.script(500, Response(410))
    receiver.fail_randomly(0.5, 503, seed=7)
    receiver.respond(202)
    statuses = await post_many(receiver, 22)
    rng = random.Random(7)
    expected = [503 if rng.random() < 0.5 else 202 for _ in range(20)]
    assert statuses == [500, 410, *expected]
    assert [r.body for r in receiver.requests] == [b"%d" % i for i in range(22)]


async def test_wait_for_filters_by_path_and_times_out_with_a_count(receiver: Receiver) -> None:
    await post_many(receiver, 2, "/a")
    await post_many(receiver, 1, "/b")
    assert [r.path for r in await receiver.wait_for(2, path="/a")] == ["/a", "/a"]
    with pytest.raises(AssertionError, match="got 1 of 2 requests to /b"):
        await receiver.wait_for(2, 0.05, path="/b")


async def test_reset_forgets_requests_and_rules(receiver: Receiver) -> None:
    receiver.script(500)
    receiver.fail_randomly(1.0, 503)
    await post_many(receiver, 1)
    receiver.reset()
    assert receiver.requests == []
    assert await post_many(receiver, 1) == [204]


async def test_non_cloudevent_request_is_recorded_without_parse(receiver: Receiver) -> None:
    await post_many(receiver, 1)
    (req,) = receiver.requests
    assert req.cloudevent is None and req.parse_error is None


def test_bad_fraction_is_rejected() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Receiver().fail_randomly(1.5)


async def test_stopped_receiver_refuses_then_starts_again_on_the_same_url(
    receiver: Receiver,
) -> None:
    url = receiver.url("/fn")
    await post_many(receiver, 1, "/fn")
    await receiver.stop()
    with pytest.raises(aiohttp.ClientConnectorError):
        await post_many(receiver, 1, "/fn")
    await receiver.start()
    assert receiver.url("/fn") == url
    await post_many(receiver, 1, "/fn")
    first, second = receiver.requests
    assert first.at <= second.at
