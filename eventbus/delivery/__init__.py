"""Delivery: policies, per-target protection, the durable retry schedule, dead letters, and the
dispatcher that ties them to the targets."""

from eventbus.delivery._dispatcher import Dispatcher, RetryWorker
from eventbus.delivery._guard import Guard
from eventbus.delivery._policy import (
    PRESETS,
    BreakerPolicy,
    DeliveryPolicy,
    RetryPolicy,
    override_checker,
    parse_delivery,
    target_policies,
)
from eventbus.delivery._store import DeadLetterFilter, Delivery, DeliveryStore

__all__ = [
    "PRESETS",
    "BreakerPolicy",
    "DeadLetterFilter",
    "Delivery",
    "DeliveryPolicy",
    "DeliveryStore",
    "Dispatcher",
    "Guard",
    "RetryPolicy",
    "RetryWorker",
    "override_checker",
    "parse_delivery",
    "target_policies",
]
