"""Delivery: the delivery model, policies, per-target protection, the durable retry schedule,
dead letters, the dispatcher that ties them to the targets, and direct invocations of one
target."""

from eventbus.delivery._dispatcher import Dispatcher, from_outside
from eventbus.delivery._guard import CIRCUIT_STATES, Guard
from eventbus.delivery._invoke import (
    Invocation,
    Invoker,
    Refusal,
    invocation_via,
    invoke_rule,
    invoked_target,
    sync_rule_via,
)
from eventbus.delivery._model import DeadLetterReason, Delivery, DeliveryKind
from eventbus.delivery._policy import (
    PRESETS,
    BreakerPolicy,
    DeliveryPolicy,
    RetryPolicy,
    override_checker,
    parse_delivery,
    target_policies,
)
from eventbus.delivery._retry_worker import RetryWorker
from eventbus.delivery._store import DeadLetterCount, DeadLetterFilter, DeliveryStore

__all__ = [
    "CIRCUIT_STATES",
    "PRESETS",
    "BreakerPolicy",
    "DeadLetterCount",
    "DeadLetterFilter",
    "DeadLetterReason",
    "Delivery",
    "DeliveryKind",
    "DeliveryPolicy",
    "DeliveryStore",
    "Dispatcher",
    "Guard",
    "Invocation",
    "Invoker",
    "Refusal",
    "RetryPolicy",
    "RetryWorker",
    "from_outside",
    "invocation_via",
    "invoke_rule",
    "invoked_target",
    "override_checker",
    "parse_delivery",
    "sync_rule_via",
    "target_policies",
]
