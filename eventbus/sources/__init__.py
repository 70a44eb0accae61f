"""Sources: connectors that turn outside input into CloudEvents on the bus.

Importing this package registers every built-in connector type with the registry in
``_runner`` (the core never imports a specific connector; this registry does). The framework
the connectors plug into: ``_base`` (the contract), ``_checkpoints``, ``_clock``, ``_runner``,
``_shared`` (statuses across worker processes).
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
from eventbus.sources._base import Source, SourceContext, SourceStatus
from eventbus.sources._checkpoints import Checkpoints, list_dead_letters
from eventbus.sources._clock import Backoff, Clock, SystemClock
from eventbus.sources._runner import SourceRunner, build_source, register_source
from eventbus.sources._shared import SharedStatuses

__all__ = [
    "Backoff",
    "Checkpoints",
    "Clock",
    "SharedStatuses",
    "Source",
    "SourceContext",
    "SourceRunner",
    "SourceStatus",
    "SystemClock",
    "build_source",
    "list_dead_letters",
    "register_source",
]
