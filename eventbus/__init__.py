"""eventbus: a self-hosted event bus and trigger router.

Sources and publishers put CloudEvents on a durable bus (NATS JetStream or Kafka); rules
(EventBridge patterns, CEL, JSONPath transforms) route them to targets (HTTP functions, Kafka
topics, NATS subjects) with retries, dead letters and a PostgreSQL audit trail.

The package's stable Python surface is small: the error tree below, the rule engine in
``eventbus.rules`` and the CloudEvents helpers in ``eventbus.cloudevents``.
"""

from eventbus._errors import (
    BusError,
    BusUnavailable,
    CloudEventError,
    ConfigError,
    DeliveryError,
    EventBusError,
    PatternError,
    RuleError,
    RuleSetError,
    StoreDataError,
    StoreError,
    StoreUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "BusUnavailable",
    "CloudEventError",
    "ConfigError",
    "DeliveryError",
    "EventBusError",
    "PatternError",
    "RuleError",
    "RuleSetError",
    "StoreDataError",
    "StoreError",
    "StoreUnavailable",
    "__version__",
]
