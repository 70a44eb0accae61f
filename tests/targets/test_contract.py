"""The Target contract, run against every target type (HTTP, Kafka, NATS core and JetStream) on
real servers of their own (``kit``, in conftest.py): the lifecycle, what a delivered attempt
reports and carries, and every way an attempt fails (a payload that cannot be sent, a message
the endpoint refuses, an endpoint that does not answer in time, one that is down) as an
``Outcome`` (never an exception) after which the target keeps working.

What each protocol sends on the wire (headers, keys, modes) and its own failures stay in
test_http.py, test_kafka.py and test_nats.py."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from eventbus.targets import Outcome, Target
from eventbus.targets._base import MAX_ERROR_CHARS
from tests.targets.conftest import Kit, event

# Long enough for a connect or an answer on a loaded machine, short enough to wait out.
TIMEOUT = 1.0


async def send(target: Target, payload: Any = None, *, attempt: int = 1) -> Outcome:
    """Deliver ``event()`` (or ``payload`` on its behalf, as a transform's output) once."""
    original = event()
    return await target.deliver(
        original,
        original if payload is None else payload,
        is_cloudevent=payload is None,
        attempt=attempt,
    )


def assert_retryable_failure(outcome: Outcome) -> None:
    assert not outcome.delivered and outcome.retryable and not outcome.gone, outcome
    assert outcome.status is None and outcome.error


def assert_final_failure(outcome: Outcome) -> None:
    assert not outcome.delivered and not outcome.retryable, outcome
    assert outcome.error is not None and len(outcome.error) <= MAX_ERROR_CHARS


# --- lifecycle --------------------------------------------------------------------------------


async def test_deliver_outside_the_context_raises(kit: Kit) -> None:
    target = kit.target()
    with pytest.raises(RuntimeError, match="not open"):
        await send(target)
    async with target:
        pass
    with pytest.raises(RuntimeError, match="not open"):
        await send(target)


async def test_opening_twice_raises_and_the_target_reopens_after_close(kit: Kit) -> None:
    target = kit.target()
    async with target:
        with pytest.raises(RuntimeError, match="already open"):
            await target.__aenter__()
        assert (await send(target)).delivered
    async with target:
        # another event: the same one again is, to a JetStream target, a duplicate the
        # stream drops (its message id)
        second = event(2)
        assert (await target.deliver(second, second, is_cloudevent=True, attempt=1)).delivered
    # in either order: on Kafka two keys are two partitions
    received = await kit.received(2)
    assert sorted(received, key=lambda e: str(e["id"])) == [event(), event(2)]


async def test_a_target_opens_and_closes_while_its_endpoint_is_down(kit: Kit) -> None:
    # A connection begun in the background on open is abandoned on close, not waited for.
    await kit.down()
    async with kit.target(timeout=TIMEOUT):
        pass


@pytest.mark.parametrize(("field", "value"), [("timeout", 0), ("timeout", -1.0), ("mode", "x")])
def test_bad_common_settings_are_refused_by_the_spec(kit: Kit, field: str, value: Any) -> None:
    # Refused before any adapter exists; load_connectors reports it with file and line.
    with pytest.raises(pydantic.ValidationError, match=field):
        kit.target(**{field: value})


# --- outcomes ---------------------------------------------------------------------------------


async def test_a_delivered_attempt_reports_success_and_the_endpoint_gets_the_event(
    kit: Kit,
) -> None:
    async with kit.target() as target:
        outcome = await send(target)
    assert outcome.delivered and outcome.status == kit.delivered_status
    assert outcome.error is None and not outcome.retryable and not outcome.gone
    assert outcome.retry_after is None and outcome.reply is None
    assert outcome.duration_ms > 0
    assert await kit.received(1) == [event()]


@pytest.mark.parametrize("payload", [{"order": 7, "items": [1, 2]}, [1, "two"], 42])
async def test_a_transformed_payload_arrives_with_the_event_identity(
    kit: Kit, payload: Any
) -> None:
    async with kit.target() as target:
        assert (await send(target, payload)).delivered
    (got,) = await kit.received(1)
    original = event()
    identity = {name: original[name] for name in ("specversion", "id", "source", "type")}
    assert got == {**identity, "datacontenttype": "application/json", "data": payload}


@pytest.mark.parametrize(
    ("original", "payload", "is_cloudevent"),
    [
        (event(), {1, 2}, False),
        ({"id": "no-source"}, "text", False),
        (event(), event(data={1, 2}), True),
    ],
    ids=["not-json", "event-without-identity", "cloudevent-with-bad-data"],
)
async def test_an_unsendable_payload_is_final_and_the_target_keeps_working(
    kit: Kit, original: dict[str, Any], payload: Any, is_cloudevent: bool
) -> None:
    async with kit.target() as target:
        outcome = await target.deliver(original, payload, is_cloudevent=is_cloudevent, attempt=1)
        assert_final_failure(outcome)
        assert outcome.error is not None and outcome.error.startswith("cannot build the")
        assert (await send(target)).delivered
    assert await kit.received(1) == [event()]


async def test_a_message_the_endpoint_refuses_is_final_and_the_target_keeps_working(
    kit: Kit,
) -> None:
    refused = kit.refusing()
    async with kit.target() as target:
        assert_final_failure(await target.deliver(refused, refused, is_cloudevent=True, attempt=1))
        assert (await send(target, attempt=2)).delivered


# --- the endpoint does not answer, or is not there ---------------------------------------------


async def test_an_endpoint_that_does_not_answer_in_time_is_a_retryable_timeout(
    kit: Kit,
) -> None:
    async with kit.target(timeout=TIMEOUT) as target:
        assert (await send(target)).delivered  # connected: what hangs next is the answer
        async with kit.hung():
            outcome = await send(target, attempt=2)
        assert_retryable_failure(outcome)
        assert outcome.error == f"timeout after {TIMEOUT:g}s"
        outcome = await send(target, attempt=3)
        assert outcome.delivered, outcome.error


async def test_an_endpoint_that_is_down_is_retryable_and_the_target_recovers(kit: Kit) -> None:
    await kit.down()  # the address refuses connections from the start
    async with kit.target(timeout=TIMEOUT) as target:
        outcome = await send(target)
        assert_retryable_failure(outcome)
        assert outcome.error is not None and kit.address in outcome.error
        assert kit.secret is None or kit.secret not in outcome.error

        await kit.up()
        outcome = await send(target, attempt=2)
        assert outcome.delivered, outcome.error

        await kit.down()  # lost after it was reached
        assert_retryable_failure(await send(target, attempt=3))

        await kit.up()
        outcome = await send(target, attempt=4)
        assert outcome.delivered, outcome.error
