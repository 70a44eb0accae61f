"""Sources: connectors that turn outside input into CloudEvents on the bus.

Importing this package registers every built-in connector type with the framework in
``_base`` (the core never imports a specific connector; this registry does).
"""

# Imported for their side effect: each connector module registers its source type.
from eventbus.sources import (  # noqa: F401
    _amqp_src,
    _dirwatch,
    _kafka_src,
    _logs,
    _mqtt_src,
    _nats_src,
    _s3poll,
    _syslog,
    _timer,
)
from eventbus.sources._base import (
    Backoff,
    Checkpoints,
    Clock,
    ManualClock,
    Source,
    SourceContext,
    SourceRunner,
    SourceStatus,
    SystemClock,
    build_source,
    list_dead_letters,
    register_source,
)

__all__ = [
    "Backoff",
    "Checkpoints",
    "Clock",
    "ManualClock",
    "Source",
    "SourceContext",
    "SourceRunner",
    "SourceStatus",
    "SystemClock",
    "build_source",
    "list_dead_letters",
    "register_source",
]
