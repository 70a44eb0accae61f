"""The durable bus between ingest and the router: NATS JetStream (default) or Kafka.

``async with open_bus(config) as bus`` picks the backend from the config type; both backends
implement :class:`Bus` and hand out :class:`BusMessage` with at-least-once delivery.
:class:`NatsServer` runs the embedded ``nats-server`` used when no broker is configured.
See docs/bus.md.
"""

from __future__ import annotations

from eventbus.bus._base import DUPLICATE, Bus, BusMessage, PublishOutcome, bus_message_limit
from eventbus.bus._kafka import KafkaBus, KafkaBusConfig
from eventbus.bus._nats import NatsBus, NatsBusConfig
from eventbus.bus._nats_server import NatsServer

__all__ = [
    "DUPLICATE",
    "Bus",
    "BusMessage",
    "KafkaBus",
    "KafkaBusConfig",
    "NatsBus",
    "NatsBusConfig",
    "NatsServer",
    "PublishOutcome",
    "bus_message_limit",
    "open_bus",
]


def open_bus(config: NatsBusConfig | KafkaBusConfig) -> Bus:
    """The bus for ``config``, not yet connected: enter it with ``async with``.

    Entering raises BusUnavailable when the broker cannot be reached, BusError when the
    stream/topic cannot be created.
    """
    if isinstance(config, KafkaBusConfig):
        return KafkaBus(config)
    return NatsBus(config)
