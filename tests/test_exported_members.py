"""The public names of every eventbus package, pinned in one table: adding or removing a name is
a deliberate, visible change.

Public for users (documented, kept stable): the error tree in ``eventbus``, the rule engine in
``eventbus.rules`` and the CloudEvents helpers in ``eventbus.cloudevents``. The other packages
declare the names the rest of eventbus may import from them; anything else is private to the
package (its ``_x`` modules).
"""

from __future__ import annotations

import importlib

import pytest

EXPORTS: dict[str, list[str]] = {
    "eventbus": [
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
    ],
    "eventbus.cloudevents": [
        "BATCH_CONTENT_TYPE",
        "DEFAULT_MAX_BATCH_ENTRIES",
        "DEFAULT_MAX_EVENT_SIZE",
        "MAX_DATA_DEPTH",
        "MAX_EXTENSIONS",
        "MAX_HEADER_BYTES",
        "REQUIRED_ATTRIBUTES",
        "SPEC_VERSION",
        "STRUCTURED_CONTENT_TYPE",
        "HttpParse",
        "check_entries",
        "decode",
        "encode",
        "event_key",
        "format_time",
        "from_http",
        "from_kafka",
        "from_nats",
        "header_value",
        "new_event",
        "notification_to_events",
        "oss_records_to_events",
        "parse_http",
        "parse_json",
        "s3_event",
        "s3_records_to_events",
        "to_http",
        "to_http_batch",
        "to_kafka",
        "to_nats",
        "validate",
    ],
    "eventbus.rules": [
        "CompiledPattern",
        "DeliveryCheck",
        "PatternError",
        "Route",
        "Rule",
        "RuleError",
        "RuleSet",
        "RuleSetError",
        "RuleSetHolder",
        "RuleTarget",
        "compile_pattern",
        "compile_rules",
        "load_rules",
        "matches",
    ],
    "eventbus.bus": [
        "Bus",
        "BusMessage",
        "KafkaBus",
        "KafkaBusConfig",
        "NatsBus",
        "NatsBusConfig",
        "NatsServer",
        "open_bus",
    ],
    "eventbus.cli": ["main"],
    "eventbus.config": [
        "ApiKey",
        "BusSettings",
        "ConnectorSet",
        "DatabaseSettings",
        "Duration",
        "HttpTargetSpec",
        "KafkaIngestSettings",
        "KafkaSettings",
        "KafkaTargetSpec",
        "KeyPath",
        "ListenSettings",
        "NatsSettings",
        "NatsTargetSpec",
        "NodeBuilder",
        "RouterSettings",
        "Settings",
        "TargetSpec",
        "YamlDoc",
        "load_connectors",
        "load_settings",
        "load_yaml",
        "parse_duration",
        "pydantic_errors",
        "redact_url",
        "yaml_files",
    ],
    "eventbus.delivery": [
        "PRESETS",
        "BreakerPolicy",
        "DeadLetterFilter",
        "DeadLetterReason",
        "Delivery",
        "DeliveryKind",
        "DeliveryPolicy",
        "DeliveryStore",
        "Dispatcher",
        "Guard",
        "RetryPolicy",
        "RetryWorker",
        "override_checker",
        "parse_delivery",
        "target_policies",
    ],
    "eventbus.http": ["create_app", "http_server"],
    "eventbus.sources": [
        "Backoff",
        "Checkpoints",
        "Clock",
        "Source",
        "SourceContext",
        "SourceRunner",
        "SourceStatus",
        "SystemClock",
        "build_source",
        "list_dead_letters",
        "register_source",
    ],
    "eventbus.store": [
        "READ_TIMEOUT",
        "Attempt",
        "AttemptOutcome",
        "AuditWriter",
        "EmbeddedPostgres",
        "EventTrail",
        "Store",
        "dumps_jsonb",
        "loads_jsonb",
        "migrate",
        "run_db",
        "set_aside",
    ],
    "eventbus.targets": [
        "HttpTarget",
        "HttpTargetConfig",
        "KafkaTarget",
        "KafkaTargetConfig",
        "NatsTarget",
        "NatsTargetConfig",
        "Outcome",
        "Target",
        "sign_webhook",
        "verify_webhook",
    ],
}


def _isort_order(name: str) -> tuple[int, str]:
    # as ruff (RUF022) keeps __all__ sorted: CONSTANTS, then Classes, then the rest
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


@pytest.mark.parametrize("module_name", sorted(EXPORTS))
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__all__ == EXPORTS[module_name]
    assert module.__all__ == sorted(module.__all__, key=_isort_order)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
