"""Sources: connectors that turn outside input into CloudEvents on the bus.

Importing this package registers every built-in connector type with the framework in
``_base`` (the core never imports a specific connector; this registry does).
"""

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
