"""Configuration: what the user writes, read and validated in one place before anything runs.

    settings YAML + EVENTBUS_* ──> load_settings ──> Settings          (_settings)
    connectors/*.yaml ───────────> load_connectors ─> ConnectorSet     (_connectors)
    register_connector            the registry of source and target types (_connectors)
    every user file ─────────────> load_yaml: data + the line of each key (_yaml)
    Duration, parse_duration      ``10s``, ``5m``, ``1d`` in any of them (_units)
    NumbersNotBools               a model whose number fields refuse true and false (_units)
    redact_url                    a configured URL as logs and errors may show it (_redact)
    Secret                        a password, token or key: env, file or literal (_secrets)
    TlsSpec                       the tls block of every client connection -> SSLContext (_tls)
    tls_refusal                   why a TLS session with a server fails, for clients that hide it
    tls_reason                    what a TLS error says (the failed check, the server's alert)
    refuse_nats_plaintext         refuse a NATS server that would take a TLS connection in clear
    NatsAuth, KafkaAuth           broker credentials, shared by bus, sources and targets (_clients)
    OAuth2Spec                    OAuth 2.0 client credentials: HTTP targets, Kafka OAUTHBEARER
    AddressLists                  CIDR allow/deny lists and trusted proxies: settings, webhooks

Where it sits: below the pipeline. It imports nothing of eventbus but the error tree, and no
driver (no broker, database or HTTP client), so the rule engine can read YAML through it. The
connector types are not here: each lives, spec and adapter, in ``eventbus.sources`` or
``eventbus.targets``, which register it with this package's registry when imported, so
``load_connectors`` validates every definition with its type's spec. The composition root
(``eventbus.app``) turns the validated specs into running components.
"""

from __future__ import annotations

from eventbus.config._addresses import AddressLists
from eventbus.config._clients import KafkaAuth, KafkaServers, KafkaTopic, NatsAuth, OAuth2Spec
from eventbus.config._connectors import (
    ConnectorKind,
    ConnectorSet,
    ConnectorSpec,
    SourceSpec,
    TargetSpec,
    check_deliveries_with,
    connector_adapter,
    connector_spec,
    connector_texts,
    load_connectors,
    register_connector,
)
from eventbus.config._redact import redact_url
from eventbus.config._secrets import MIN_SECRET_CHARS, Secret, header_token, long_enough
from eventbus.config._settings import (
    EMBEDDED_NATS_ENV,
    PARENT_ENV,
    RESTARTED_ENV,
    WORKER_ENV,
    ApiKey,
    BusSettings,
    DatabaseSettings,
    KafkaIngestSettings,
    KafkaSettings,
    ListenSettings,
    NatsSettings,
    RetentionSettings,
    RouterSettings,
    Settings,
    load_settings,
    rule_paths,
    service_address,
)
from eventbus.config._tls import TlsSpec, refuse_nats_plaintext, tls_reason, tls_refusal
from eventbus.config._units import Duration, NumbersNotBools, parse_duration
from eventbus.config._yaml import (
    KeyPath,
    NodeBuilder,
    YamlDoc,
    did_you_mean,
    flow_too_deep,
    load_yaml,
    pydantic_errors,
    yaml_error_at,
    yaml_files,
)

__all__ = [
    "EMBEDDED_NATS_ENV",
    "MIN_SECRET_CHARS",
    "PARENT_ENV",
    "RESTARTED_ENV",
    "WORKER_ENV",
    "AddressLists",
    "ApiKey",
    "BusSettings",
    "ConnectorKind",
    "ConnectorSet",
    "ConnectorSpec",
    "DatabaseSettings",
    "Duration",
    "KafkaAuth",
    "KafkaIngestSettings",
    "KafkaServers",
    "KafkaSettings",
    "KafkaTopic",
    "KeyPath",
    "ListenSettings",
    "NatsAuth",
    "NatsSettings",
    "NodeBuilder",
    "NumbersNotBools",
    "OAuth2Spec",
    "RetentionSettings",
    "RouterSettings",
    "Secret",
    "Settings",
    "SourceSpec",
    "TargetSpec",
    "TlsSpec",
    "YamlDoc",
    "check_deliveries_with",
    "connector_adapter",
    "connector_spec",
    "connector_texts",
    "did_you_mean",
    "flow_too_deep",
    "header_token",
    "load_connectors",
    "load_settings",
    "load_yaml",
    "long_enough",
    "parse_duration",
    "pydantic_errors",
    "redact_url",
    "refuse_nats_plaintext",
    "register_connector",
    "rule_paths",
    "service_address",
    "tls_reason",
    "tls_refusal",
    "yaml_error_at",
    "yaml_files",
]
