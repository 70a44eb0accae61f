"""Delivery policies: how often and how long a failed delivery is retried, and what protects an
endpoint (circuit breaker, rate limit). Parsed once at load from a target's ``delivery:`` block,
overridden per rule route, and frozen.

    delivery:
      retry: eventbridge            # a preset name, or a mapping:
      retry: {strategy: exponential, initial_delay: 1s, factor: 2, max_delay: 5m,
              max_attempts: 20, max_age: 6h, jitter: true}
      circuit_breaker: {failures: 5, open_for: 60s}   # or false
      rate_limit: 100               # events per second, optional
      disable_on_gone: true         # a 410 stops further deliveries to the target
      dead_letter_target: dlq-topic # optional copy of each dead letter
      on_success: audit-log         # optional destinations (outcome CloudEvents)
      on_failure: alerts

Presets follow the anchors: ``eventbridge`` (up to 185 attempts within 24 h, exponential with
jitter), ``alibaba-backoff`` (3 retries, random 10-20 s apart), ``alibaba-exponential``
(176 retries over 1 day, exponential up to 512 s), ``none`` (one attempt).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from eventbus._errors import ConfigError
from eventbus.config import (
    NumbersNotBools,
    check_deliveries_with,
    did_you_mean,
    parse_duration,
)

__all__ = [
    "PRESETS",
    "BreakerPolicy",
    "DeliveryPolicy",
    "RetryPolicy",
    "override_checker",
    "parse_delivery",
    "target_policies",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again. ``max_attempts`` counts every attempt, the first included."""

    strategy: Literal["exponential", "linear", "fixed", "random"] = "exponential"
    initial_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    max_attempts: int = 10
    max_age: float = 86400.0
    jitter: bool = True
    retry_after_cap: float = 3600.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt ``attempt + 1`` after ``attempt`` failures (attempt ≥ 1)."""
        r = rng or random
        if self.strategy == "fixed":
            base = self.initial_delay
        elif self.strategy == "linear":
            base = self.initial_delay * attempt
        elif self.strategy == "random":
            # initial_delay..max_delay uniformly (Alibaba BACKOFF_RETRY: 10-20 s)
            return r.uniform(self.initial_delay, self.max_delay)
        else:
            # cap the exponent: factor ** 1024 overflows a float long before max_attempts
            base = self.initial_delay * self.factor ** min(attempt - 1, 64)
        base = min(base, self.max_delay)
        if self.jitter:
            # "equal jitter": keeps at least half the backoff, spreads the rest
            return base / 2 + r.uniform(0, base / 2)
        return base

    def next_delay(
        self,
        attempt: int,
        age: float,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when retrying must stop.

        ``attempt`` attempts have been made; ``age`` seconds have passed since the first.
        A server's ``Retry-After`` is honoured (capped by ``retry_after_cap``) when it is
        longer than our own backoff.
        """
        if attempt >= self.max_attempts:
            return None
        delay = self.delay(attempt, rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        if age + delay > self.max_age:
            return None
        return delay


_EVENTBRIDGE = RetryPolicy(
    strategy="exponential",
    initial_delay=1.0,
    factor=2.0,
    max_delay=600.0,
    max_attempts=185,
    max_age=86400.0,
)

PRESETS: Mapping[str, RetryPolicy] = {
    "eventbridge": _EVENTBRIDGE,
    "alibaba-backoff": RetryPolicy(
        strategy="random", initial_delay=10.0, max_delay=20.0, max_attempts=4, jitter=False
    ),
    "alibaba-exponential": replace(_EVENTBRIDGE, max_delay=512.0, max_attempts=177, jitter=False),
    # the defaults of docs/delivery.md for what a mapping from it changes (max_attempts: 5
    # waited at most 5 min between attempts, RetryPolicy's own, where the table says 10)
    "none": replace(_EVENTBRIDGE, max_attempts=1),
}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Open after ``failures`` consecutive failures; probe again after ``open_for`` seconds."""

    failures: int = 5
    open_for: float = 60.0


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    retry: RetryPolicy = PRESETS["eventbridge"]
    breaker: BreakerPolicy | None = BreakerPolicy()
    rate_limit: float | None = None
    disable_on_gone: bool = True
    dead_letter_target: str | None = None
    on_success: str | None = None
    on_failure: str | None = None


class _RetrySpec(NumbersNotBools):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preset: str | None = None
    strategy: Literal["exponential", "linear", "fixed", "random"] | None = None
    initial_delay: float | None = None
    factor: float | None = Field(None, ge=1.0, le=10.0)
    max_delay: float | None = None
    max_attempts: int | None = Field(None, ge=1, le=10_000)
    max_age: float | None = None
    jitter: bool | None = None
    retry_after_cap: float | None = None

    @field_validator("initial_delay", "max_delay", "max_age", "retry_after_cap", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float | None:
        return None if v is None else parse_duration(v)

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown retry preset {v!r}; known: {', '.join(sorted(PRESETS))}")
        return v


class _BreakerSpec(NumbersNotBools):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    failures: int = Field(5, ge=1, le=10_000)
    open_for: float = 60.0

    @field_validator("open_for", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float:
        return parse_duration(v)


class _DeliverySpec(NumbersNotBools):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retry: str | dict[str, Any] | None = None
    circuit_breaker: bool | dict[str, Any] | None = None
    rate_limit: float | None = Field(None, gt=0, le=1_000_000)
    disable_on_gone: bool | None = None
    dead_letter_target: str | None = None
    on_success: str | None = None
    on_failure: str | None = None

    @model_validator(mode="after")
    def _preset_name(self) -> _DeliverySpec:
        if isinstance(self.retry, str) and self.retry not in PRESETS:
            raise ValueError(
                f"unknown retry preset {self.retry!r}; known: {', '.join(sorted(PRESETS))}"
            )
        return self


def _apply_retry(base: RetryPolicy, raw: str | dict[str, Any]) -> RetryPolicy:
    if isinstance(raw, str):
        return PRESETS[raw]
    try:
        spec = _RetrySpec.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_describe(exc, "retry.")) from exc
    policy = PRESETS[spec.preset] if spec.preset else base
    changes = {k: v for k, v in spec.model_dump(exclude={"preset"}).items() if v is not None}
    policy = replace(policy, **changes)
    if policy.max_delay < policy.initial_delay and policy.strategy != "fixed":
        raise ValueError(
            f"max_delay ({policy.max_delay}s) is below initial_delay ({policy.initial_delay}s)"
        )
    return policy


def _breaker(raw: bool | dict[str, Any]) -> BreakerPolicy | None:
    if raw is False:
        return None
    if raw is True:
        return BreakerPolicy()
    try:
        b = _BreakerSpec.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_describe(exc, "circuit_breaker.")) from exc
    return BreakerPolicy(b.failures, b.open_for)


def parse_delivery(
    spec: Mapping[str, Any] | None, base: DeliveryPolicy | None = None, *, where: str = ""
) -> DeliveryPolicy:
    """Build a DeliveryPolicy from a ``delivery:`` mapping layered over ``base``.

    Raises ConfigError naming ``where`` and the field for an unknown preset, a negative or
    malformed duration, an unknown key or an out-of-range value.
    """
    policy = base or DeliveryPolicy()
    if not spec:
        return policy
    try:
        parsed = _DeliverySpec.model_validate(dict(spec))
        if parsed.retry is not None:
            policy = replace(policy, retry=_apply_retry(policy.retry, parsed.retry))
        if parsed.circuit_breaker is not None:
            policy = replace(policy, breaker=_breaker(parsed.circuit_breaker))
    except (ValidationError, ValueError) as exc:
        raise ConfigError(f"{where}: delivery: {_describe(exc)}") from exc
    for name in ("rate_limit", "disable_on_gone", "dead_letter_target", "on_success", "on_failure"):
        value = getattr(parsed, name)
        if value is not None:
            policy = replace(policy, **{name: value})
    return policy


def delivery_problems(
    spec: Mapping[str, Any], known: Collection[str]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Each problem of a target's ``delivery:`` block with the path of its setting in the
    block (empty: none there), for ``load_connectors`` to report on its line: those of the
    block, of its ``retry`` and ``circuit_breaker`` blocks, and its settings naming a target
    not ``known``, all at once."""
    problems: list[tuple[tuple[str | int, ...], str]] = []

    def check(at: tuple[str, ...], run: Callable[[], object]) -> None:
        try:
            run()
        except ValueError as exc:  # ValidationError too
            inner = exc if isinstance(exc, ValidationError) else exc.__cause__
            if isinstance(inner, ValidationError):
                problems.extend(
                    ((*at, *e["loc"]), e["msg"].removeprefix("Value error, "))
                    for e in inner.errors()
                )
            else:
                problems.append((at, str(exc)))

    check((), lambda: _DeliverySpec.model_validate(dict(spec)))
    retry, breaker = spec.get("retry"), spec.get("circuit_breaker")
    if isinstance(retry, dict):
        check(("retry",), lambda: _apply_retry(DeliveryPolicy().retry, retry))
    if isinstance(breaker, dict):
        check(("circuit_breaker",), lambda: _breaker(breaker))
    for field in _REFERENCES:
        name = spec.get(field)
        if isinstance(name, str) and name not in known:
            problems.append(((field,), f"no target {name!r}{did_you_mean(name, known)}"))
    if not problems:
        try:
            parse_delivery(spec)
        except ConfigError as exc:  # what the checks above do not see
            problems.append(((), str(exc.__cause__ or exc)))
    return problems


check_deliveries_with(delivery_problems)

_REFERENCES = ("dead_letter_target", "on_success", "on_failure")
"""Delivery settings that name another target."""


def target_policies(
    specs: Mapping[str, Mapping[str, Any] | None],
    *,
    located: Callable[[str, str], str] = lambda name, problem: problem,
) -> dict[str, DeliveryPolicy]:
    """Each target's policy from its ``delivery:`` block (target name -> block or None).

    Raises ConfigError listing every invalid block, each naming its target (and where it is
    defined, by ``located(name, problem)``), and every setting naming a target not in
    ``specs`` (found only when a delivery failed: a dead letter of its own, unknown-target)."""
    errors = []
    out = {}
    for name, spec in specs.items():
        try:
            out[name] = parse_delivery(spec, where=f"target {name!r}")
        except ConfigError as exc:
            errors.append(located(name, str(exc)))
            continue
        for problem in _unknown_references(out[name], specs):
            errors.append(located(name, f"target {name!r}: delivery: {problem}"))
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def _unknown_references(policy: DeliveryPolicy, known: Collection[str]) -> list[str]:
    """``field: no target 'x'`` for each setting of ``policy`` naming a target not ``known``."""
    problems = []
    for field in _REFERENCES:
        name = getattr(policy, field)
        if name is not None and name not in known:
            problems.append(f"{field}: no target {name!r}{did_you_mean(name, known)}")
    return problems


_TARGET_ONLY = ("rate_limit", "circuit_breaker")
"""Delivery settings of a target only, not of a route: its endpoint's rate and health."""


def override_checker(
    base: Mapping[str, DeliveryPolicy],
) -> Callable[[str, Mapping[str, Any]], None]:
    """A check for the rule loader: does a route's ``delivery`` override parse on top of its
    target's policy? Raises ConfigError ``delivery: <field>: <problem>``; warns of the target's
    own settings (rate limit, circuit breaker), which a route cannot change."""

    def check(target: str, override: Mapping[str, Any]) -> None:
        for name in _TARGET_ONLY:
            if name in override:
                # One guard per target: a route's own setting is ignored, and said so (refused,
                # a rule file that followed the documentation kept the service from starting).
                log.warning(
                    "a route's delivery %s to target %r is ignored: it guards the target's "
                    "endpoint, shared by every route to it; set it in the target's delivery block",
                    name,
                    target,
                )
        try:
            policy = parse_delivery(override, base.get(target, DeliveryPolicy()), where="")
        except ConfigError as exc:
            raise ConfigError(str(exc).removeprefix(": ")) from exc
        unknown = _unknown_references(policy, base)
        if unknown:
            raise ConfigError("; ".join(f"delivery: {problem}" for problem in unknown))

    return check


def _describe(exc: Exception, prefix: str = "") -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix}{msg}".rstrip())
        return "; ".join(parts)
    return str(exc)
