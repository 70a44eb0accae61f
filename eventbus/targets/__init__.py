"""Delivery targets: where routed events go (function endpoints over HTTP, Kafka, NATS).

Every target implements ``Target`` and reports each attempt as an ``Outcome``; the delivery layer
above decides retries and dead letters from it.
"""

from eventbus.targets._base import Answer, Outcome, Requester, Target
from eventbus.targets._http import HttpTarget, HttpTargetConfig
from eventbus.targets._kafka import KafkaTarget, KafkaTargetConfig
from eventbus.targets._nats import NatsTarget, NatsTargetConfig
from eventbus.targets._signing import sign_webhook, verify_webhook

__all__ = [
    "Answer",
    "HttpTarget",
    "HttpTargetConfig",
    "KafkaTarget",
    "KafkaTargetConfig",
    "NatsTarget",
    "NatsTargetConfig",
    "Outcome",
    "Requester",
    "Target",
    "sign_webhook",
    "verify_webhook",
]
