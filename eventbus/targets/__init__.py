"""Delivery targets: where routed events go (function endpoints over HTTP, Kafka, NATS).

Every target implements ``Target`` and reports each attempt as an ``Outcome``; the delivery layer
above decides retries and dead letters from it. Each target type is one module holding its spec
and its adapter, registered below under its YAML ``type`` (docs/targets.md, "Writing a target").
"""

from eventbus.targets._base import Answer, Capped, Invocable, Outcome, Requester, Target
from eventbus.targets._http import HttpTarget, HttpTargetSpec
from eventbus.targets._kafka import KafkaTarget, KafkaTargetSpec
from eventbus.targets._nats import NatsTarget, NatsTargetSpec
from eventbus.targets._registry import build_target, register_target
from eventbus.targets._signing import sign_webhook, verify_webhook

register_target("http", HttpTargetSpec, HttpTarget)
register_target("kafka", KafkaTargetSpec, KafkaTarget)
register_target("nats", NatsTargetSpec, NatsTarget)

__all__ = [
    "Answer",
    "Capped",
    "HttpTarget",
    "HttpTargetSpec",
    "Invocable",
    "KafkaTarget",
    "KafkaTargetSpec",
    "NatsTarget",
    "NatsTargetSpec",
    "Outcome",
    "Requester",
    "Target",
    "build_target",
    "register_target",
    "sign_webhook",
    "verify_webhook",
]
