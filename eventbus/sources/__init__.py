"""Sources: the connectors that turn outside input into CloudEvents on the bus.

Each source type is one module holding its spec and its adapter, named after its YAML ``type``
and registered below (the core never imports a specific source; this registry does). The
framework the sources plug into: ``_base`` (the contract), ``_checkpoints``, ``_clock``,
``_runner`` (the registry and the runner), ``_shared`` (statuses across worker processes);
``_queues`` and ``_changes`` are what the queue sources and the polling sources share.
"""

from eventbus.sources._base import Source, SourceContext, SourceStatus
from eventbus.sources._checkpoints import Checkpoints, list_dead_letters
from eventbus.sources._clock import Backoff, Clock, SystemClock
from eventbus.sources._directory import DirectorySource, DirectorySourceSpec
from eventbus.sources._hook_request import HookRequest
from eventbus.sources._kafka import KafkaSource, KafkaSourceSpec
from eventbus.sources._log_tail import LogTailSource, LogTailSourceSpec
from eventbus.sources._mqtt import MqttSource, MqttSourceSpec, duplicate_sessions
from eventbus.sources._nats import (
    JetStreamSource,
    JetStreamSourceSpec,
    NatsSource,
    NatsSourceSpec,
)
from eventbus.sources._rabbitmq import RabbitMQSource, RabbitMQSourceSpec
from eventbus.sources._runner import (
    SourceRunner,
    build_source,
    in_every_process,
    register_source,
)
from eventbus.sources._s3_poll import S3PollSource, S3PollSourceSpec
from eventbus.sources._shared import SharedStatuses
from eventbus.sources._syslog import SyslogSource, SyslogSourceSpec
from eventbus.sources._timer import TimerSource, TimerSourceSpec
from eventbus.sources._webhook import WebhookSource, WebhookSourceSpec, body_limit

register_source("directory", DirectorySourceSpec, DirectorySource)
register_source("jetstream", JetStreamSourceSpec, JetStreamSource)
register_source("kafka", KafkaSourceSpec, KafkaSource)
register_source("log-tail", LogTailSourceSpec, LogTailSource)
register_source("mqtt", MqttSourceSpec, MqttSource)
register_source("nats", NatsSourceSpec, NatsSource)
register_source("rabbitmq", RabbitMQSourceSpec, RabbitMQSource)
register_source("s3-poll", S3PollSourceSpec, S3PollSource)
register_source("syslog", SyslogSourceSpec, SyslogSource)
register_source("timer", TimerSourceSpec, TimerSource)
register_source("webhook", WebhookSourceSpec, WebhookSource)

__all__ = [
    "Backoff",
    "Checkpoints",
    "Clock",
    "HookRequest",
    "MqttSourceSpec",
    "SharedStatuses",
    "Source",
    "SourceContext",
    "SourceRunner",
    "SourceStatus",
    "SystemClock",
    "WebhookSource",
    "body_limit",
    "build_source",
    "duplicate_sessions",
    "in_every_process",
    "list_dead_letters",
    "register_source",
]
