"""Delivery policies are pure: presets match the anchors, bad settings are refused clearly."""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import pytest

from eventbus._errors import ConfigError
from eventbus.delivery import (
    PRESETS,
    DeliveryPolicy,
    RetryPolicy,
    override_checker,
    parse_delivery,
    target_policies,
)


def _schedule(policy: RetryPolicy, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    delays, elapsed, attempt = [], 0.0, 1
    while (d := policy.next_delay(attempt, elapsed, rng=rng)) is not None:
        delays.append(d)
        elapsed += d
        attempt += 1
    return delays


def test_eventbridge_preset_up_to_185_attempts_within_a_day() -> None:
    delays = _schedule(PRESETS["eventbridge"])
    assert len(delays) + 1 == 185
    assert sum(delays) <= 24 * 3600
    assert delays[0] < delays[5] < delays[10]  # exponential growth
    assert max(delays) <= 600


def test_alibaba_presets() -> None:
    backoff = _schedule(PRESETS["alibaba-backoff"])
    assert len(backoff) == 3 and all(10 <= d <= 20 for d in backoff)
    exponential = _schedule(PRESETS["alibaba-exponential"])
    assert len(exponential) == 176
    assert max(exponential) == 512 and sum(exponential) <= 24 * 3600
    assert _schedule(PRESETS["none"]) == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RetryPolicy(strategy="fixed", initial_delay=3, jitter=False, max_attempts=4), [3, 3, 3]),
        (
            RetryPolicy(
                strategy="linear", initial_delay=2, max_delay=5, jitter=False, max_attempts=5
            ),
            [2, 4, 5, 5],
        ),
        (
            RetryPolicy(initial_delay=1, factor=3, max_delay=20, jitter=False, max_attempts=5),
            [1, 3, 9, 20],
        ),
        (
            RetryPolicy(initial_delay=10, jitter=False, max_attempts=100, max_age=35, max_delay=10),
            [10, 10, 10],
        ),
    ],
)
def test_strategies_and_limits(policy: RetryPolicy, expected: list[float]) -> None:
    assert _schedule(policy) == expected


def test_jitter_keeps_at_least_half_the_backoff() -> None:
    policy = RetryPolicy(initial_delay=8, factor=1, max_delay=8, max_attempts=1000)
    rng = random.Random(3)
    delays = [policy.delay(1, rng) for _ in range(200)]
    assert all(4 <= d <= 8 for d in delays) and len(set(delays)) > 100


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(initial_delay=1, jitter=False, retry_after_cap=60, max_attempts=5)
    assert policy.next_delay(1, 0, retry_after=30) == 30
    assert policy.next_delay(1, 0, retry_after=7200) == 60
    assert policy.next_delay(1, 0, retry_after=0.1) == 1


def test_overrides_layer_on_the_target_policy() -> None:
    base = parse_delivery({"retry": "alibaba-backoff", "rate_limit": 5})
    over = parse_delivery({"retry": {"max_attempts": 2}, "circuit_breaker": False}, base)
    assert over.retry.strategy == "random" and over.retry.max_attempts == 2
    assert over.rate_limit == 5 and over.breaker is None
    assert parse_delivery(None, base) is base
    assert parse_delivery({}) == DeliveryPolicy()
    # from "none", what it does not change is delivery.md's defaults (eventbridge's), not
    # RetryPolicy's own (max_delay 5 min where the table said 10)
    few = parse_delivery({"retry": {"preset": "none", "max_attempts": 5}}).retry
    assert few == replace(PRESETS["eventbridge"], max_attempts=5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"retry": "forever"}, "unknown retry preset 'forever'"),
        ({"retry": {"preset": "nope"}}, "retry.preset: unknown retry preset 'nope'"),
        ({"retry": {"initial_delay": -1}}, "retry.initial_delay: duration must not be negative"),
        ({"retry": {"max_delay": "ten minutes"}}, "retry.max_delay: not a duration"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"retry": {"initial_delay": "1m", "max_delay": "10s"}}, "max_delay (10.0s) is below"),
        ({"retry": {"factor": 0.5}}, "retry.factor"),
        ({"circuit_breaker": {"failures": 0}}, "circuit_breaker.failures"),
        ({"circuit_breaker": {"open_for": "-5s"}}, "circuit_breaker.open_for"),
        ({"rate_limit": -3}, "rate_limit"),
        ({"retries": 3}, "retries: Extra inputs are not permitted"),
        # pydantic took true for 1: one event a second, one attempt, a breaker opened by one
        ({"rate_limit": True}, "rate_limit: a number, not true or false"),
        ({"retry": {"max_attempts": True}}, "retry.max_attempts: a number, not true or false"),
        ({"retry": {"factor": True}}, "retry.factor: a number, not true or false"),
        ({"circuit_breaker": {"failures": False}}, "circuit_breaker.failures: a number, not true"),
    ],
)
def test_bad_policies_are_refused_with_the_field(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_delivery(spec, where="connectors/t.yaml:3 target 'fn'")
    text = str(info.value)
    assert text.startswith("connectors/t.yaml:3 target 'fn': delivery: ")
    assert message in text


def test_huge_attempt_counts_do_not_overflow() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=1, max_attempts=5000, max_age=10**9)
    assert policy.next_delay(2000, 0.0, rng=random.Random(1)) is not None


def test_a_routes_own_guard_settings_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # refused at first, a rule file following the documentation stopped the service's start
    check = override_checker({"fn": parse_delivery({"rate_limit": 5})})
    with caplog.at_level(logging.WARNING):
        check("fn", {"rate_limit": 1, "circuit_breaker": False, "retry": "none"})
    assert "delivery rate_limit to target 'fn' is ignored" in caplog.text
    assert "delivery circuit_breaker to target 'fn' is ignored" in caplog.text


def test_settings_naming_a_target_that_does_not_exist_are_refused_at_load() -> None:
    # they passed `rules validate` and the start; each dead letter then went to a dead letter
    # of its own, unknown-target, and no failure event reached anyone
    specs = {
        "fn": {"dead_letter_target": "dlq", "on_success": "audit", "on_failure": "alerts"},
        "audit": {"on_failure": "audti"},
        "alerts": None,
    }
    with pytest.raises(ConfigError) as caught:
        target_policies(specs, located=lambda name, problem: f"c.yaml:{len(name)}: {problem}")
    assert str(caught.value).splitlines() == [
        "c.yaml:2: target 'fn': delivery: dead_letter_target: no target 'dlq'",
        "c.yaml:5: target 'audit': delivery: on_failure: no target 'audti' (did you mean 'audit'?)",
    ]
    check = override_checker(target_policies({"fn": None, "alerts": None}))
    check("fn", {"on_failure": "alerts"})
    with pytest.raises(ConfigError, match=r"^delivery: on_success: no target 'nope'$"):
        check("fn", {"on_success": "nope"})


def test_a_bad_delivery_block_is_located() -> None:
    with pytest.raises(ConfigError, match=r"^c\.yaml:7: target 'fn': delivery: unknown retry"):
        target_policies({"fn": {"retry": "eventbrige"}}, located=lambda n, p: f"c.yaml:7: {p}")
