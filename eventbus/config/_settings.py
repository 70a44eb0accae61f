"""Settings: one YAML file plus ``EVENTBUS_*`` environment overrides, read in this one place.

Where it sits: the composition root (``eventbus.app``) calls ``load_settings`` once at start-up
and hands frozen pieces to each component. Nothing else reads the environment.

Environment overrides follow one rule: ``EVENTBUS_`` + the setting's path in upper case, nested
keys joined by ``__``; the value is parsed as a YAML scalar. For example
``EVENTBUS_DATABASE__URL=postgresql://...``, ``EVENTBUS_BUS__BACKEND=kafka``,
``EVENTBUS_LISTEN__PORT=9090``.

With no bus or database URL configured, the service runs on its embedded default: a real
``nats-server`` and a real PostgreSQL started under ``data_dir``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from eventbus._errors import ConfigError
from eventbus.config._addresses import AddressLists
from eventbus.config._clients import KafkaAuth, KafkaServers, KafkaTopic, NatsAuth
from eventbus.config._connectors import warn_literal_secrets
from eventbus.config._secrets import Secret, header_token, long_enough
from eventbus.config._tls import TlsSpec
from eventbus.config._units import Duration, NumbersNotBools, parse_duration
from eventbus.config._yaml import YamlDoc, did_you_mean, fields_at, load_yaml, pydantic_errors

__all__ = [
    "EMBEDDED_NATS_ENV",
    "PARENT_ENV",
    "RESTARTED_ENV",
    "WORKER_ENV",
    "ApiKey",
    "BusSettings",
    "DatabaseSettings",
    "KafkaIngestSettings",
    "KafkaSettings",
    "ListenSettings",
    "NatsSettings",
    "RetentionSettings",
    "RouterSettings",
    "Settings",
    "load_settings",
]

ENV_PREFIX = "EVENTBUS_"


class _Model(NumbersNotBools):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )


class ListenSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    header_timeout: float = Field(10.0, gt=0, le=3600)
    """Seconds a connection may wait for a complete request head (new or between requests)."""
    body_timeout: float = Field(30.0, gt=0, le=3600)
    """Seconds from a request head to the end of its body, for routes that read one (408)."""
    send_timeout: float = Field(30.0, gt=0, le=3600)
    """Seconds a client may leave an answer unread while more of it waits to be written (the
    connection's send buffer full); then the connection is dropped."""
    max_connections: int = Field(1000, ge=1, le=1_000_000)
    """Open HTTP connections per process; beyond it the longest-idle one is closed (or 503)."""


class NatsSettings(NatsAuth, _Model):
    """The NATS bus; credentials and ``tls`` as every NATS connection (``NatsAuth``)."""

    url: str | None = None
    stream: str = "EVENTBUS"
    subject: str = "eventbus.events"
    durable: str = "eventbus-router"
    ack_wait: float = Field(30.0, gt=0, le=86_400)
    duplicate_window: float = Field(120.0, gt=0, le=7 * 86_400)


class KafkaSettings(KafkaAuth, _Model):
    """The Kafka bus; security as every Kafka connection (``KafkaAuth``)."""

    bootstrap_servers: KafkaServers | None = None
    topic: KafkaTopic = "eventbus.events"
    group_id: str = "eventbus-router"
    partitions: int = Field(6, ge=1)
    idempotent: bool = True
    """Idempotent producer; turn off only for brokers without InitProducerId support."""
    session_timeout: float = Field(10.0, gt=0, le=300)
    """Seconds a silent process keeps its partitions before they move to another."""
    fetch_wait: float = Field(0.5, gt=0, le=30)
    """Longest a fetch waits for new events (the broker should answer as soon as some arrive;
    a broker that waits out the whole time makes this the added latency)."""
    linger_ms: int = Field(0, ge=0, le=1000)
    """Milliseconds the producer waits to batch events before sending them."""


class BusSettings(_Model):
    backend: Literal["nats", "kafka"] = "nats"
    nats: NatsSettings = NatsSettings()
    kafka: KafkaSettings = KafkaSettings()
    max_in_flight: int = Field(1000, ge=1, le=100_000)
    publish_timeout: float = Field(5.0, gt=0, le=600)


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class DatabaseSettings(_Model):
    """An external PostgreSQL: ``password`` (a secret) instead of one in the URL; ``sslmode``
    as libpq's, with the ``tls`` block's CA and client certificate."""

    url: str | None = None
    pool_size: int = Field(10, ge=1, le=200)
    password: Secret | None = None
    sslmode: SslMode | None = None
    tls: TlsSpec | None = None
    connect_timeout: float = Field(10.0, gt=0, le=600)
    """Seconds a start waits for the server to accept connections (one starting beside
    eventbus, as under an orchestrator) before it gives up."""

    @model_validator(mode="after")
    def _tls_needs_ssl(self) -> DatabaseSettings:
        if self.tls is not None and self.sslmode == "disable":
            raise ValueError("tls needs an sslmode other than disable")
        return self

    def ssl_option(self) -> ssl.SSLContext | str | None:
        """asyncpg's ``ssl`` argument: None (the URL's ``sslmode``, else libpq's default
        ``prefer``), the mode's name, or a context built from ``tls``, verifying as the mode
        says (``verify-full`` when ``tls`` is given without one; ``require`` with a ``ca``
        verifies the chain, as libpq's does).

        Raises ConfigError when a file of the TLS block cannot be read.
        """
        if self.tls is None:
            return self.sslmode
        mode = self.sslmode or "verify-full"
        context = self.tls.context("database")
        if mode != "verify-full":
            context.check_hostname = False
        if mode == "require" and self.tls.ca is not None:
            # As libpq: require with a root CA given verifies like verify-ca (the CA was
            # dropped without a word, every certificate taken).
            pass
        elif mode in ("allow", "prefer", "require"):
            # As libpq: encrypted, the server's certificate not checked (a client certificate
            # is still presented).
            context.verify_mode = ssl.CERT_NONE
        return context


class ApiKey(_Model):
    """A key clients of the HTTP API present; ``key`` is a secret of at least 16 characters."""

    name: str
    key: Secret
    scopes: tuple[Literal["publish", "admin"], ...] = Field(("publish",), min_length=1)
    """A key without a scope was refused on every route."""

    @field_validator("key")
    @classmethod
    def _long_enough(cls, key: Secret) -> Secret:
        return header_token(long_enough(key, "an API key"), "an API key")


class KafkaIngestSettings(KafkaAuth, _Model):
    """Consume CloudEvents (Kafka protocol binding) from these topics onto the bus."""

    bootstrap_servers: KafkaServers
    topics: tuple[KafkaTopic, ...] = Field(min_length=1)
    group_id: str = "eventbus-ingest"
    session_timeout: float = Field(10.0, gt=0, le=300)
    """Seconds a silent process keeps its partitions before they move to another."""


class RouterSettings(_Model):
    hop_limit: int = Field(8, ge=1, le=100)
    shutdown_grace: float = Field(20.0, gt=0, le=3600)
    cel: Literal["cel-python", "cel-expr-python"] = "cel-python"
    """The runtime of the rules' ``when`` conditions; cel-expr-python (the ``fast-cel`` extra)
    is 15-130x faster and follows the CEL spec where cel-python does not (docs/rules.md)."""


_MIN_RETENTION = 3600.0


def _kept_for(value: object) -> float | None:
    """A retention age: a duration of at least an hour, or ``forever`` (or null)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "forever"):
        return None
    seconds = parse_duration(value)
    if seconds < _MIN_RETENTION:
        raise ValueError(f"must be at least 1h (or forever), got {value!r}")
    return seconds


KeptFor = Annotated[float | None, BeforeValidator(_kept_for)]


class RetentionSettings(_Model):
    """How long rows are kept in the database before eventbus deletes them (docs/audit.md):
    a duration (``30d``) or ``forever``."""

    audit: KeptFor = 30 * 86400.0
    """Accepted events, rule matches, delivery attempts, refused requests and quarantined
    audit rows; an event's rows stay as long as a dead letter or a waiting retry of it."""
    dead_letters: KeptFor = None
    """Dead letters not replayed or purged (kept for ever by default)."""
    source_dead_letters: KeptFor = 30 * 86400.0
    """Input a source could not turn into an event."""
    every: Duration = Field(3600.0, ge=1, le=7 * 86400)
    """Seconds between two rounds of pruning (one instance prunes at a time)."""


class Settings(_Model):
    listen: ListenSettings = ListenSettings()
    data_dir: Path = Path(".eventbus")
    rules: Path = Path("rules")
    connectors: Path = Path("connectors")

    @field_validator("data_dir", "rules", "connectors", mode="before")
    @classmethod
    def _a_path(cls, value: Any) -> Any:
        # '' is Path('.'): the data directory was the working directory (the servers' files
        # among the project's), and every YAML file there, this one included, rules
        if isinstance(value, str) and not value.strip():
            raise ValueError("an empty path; leave the key out for its default")
        return value

    bus: BusSettings = BusSettings()
    database: DatabaseSettings = DatabaseSettings()
    # These two defaults are eventbus.cloudevents' DEFAULT_MAX_EVENT_SIZE and
    # DEFAULT_MAX_BATCH_ENTRIES, written out so that the configuration imports no pipeline
    # package; tests/config/test_settings.py pins that they agree.
    max_event_size: int = Field(256 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_batch_entries: int = Field(1000, ge=1, le=100_000)
    """Events one batch request (or bucket notification) may carry; more is answered 413."""
    api_keys: tuple[ApiKey, ...] = ()
    allow_unauthenticated: bool = False
    """Serve a non-loopback ``listen.host`` without ``api_keys`` (refused otherwise)."""
    client_addresses: AddressLists = AddressLists()
    """Who may reach any route but the probes (``/healthz``, ``/readyz``): CIDR lists."""
    kafka_ingest: KafkaIngestSettings | None = None
    router: RouterSettings = RouterSettings()
    retention: RetentionSettings = RetentionSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text", "auto"] = "auto"
    """``auto``: text on a terminal (a person reads it), JSON lines otherwise (a collector)."""
    run_sources: bool = True
    """False in the extra worker processes of `serve --workers N`: sources run once (but
    webhooks, which serve requests, run in every worker)."""
    source_lease: float = Field(30.0, ge=1, le=3600)
    """Seconds a directory, log-tail or s3-poll source's lease lasts: how long the other
    instances wait before taking it over from one that died or froze (renewed every third)."""
    worker_hang_timeout: float = Field(30.0, ge=2, le=3600)
    """Seconds a worker of `serve --workers N` may go without its beat (a frozen process, an
    event loop blocked) before its parent kills it and starts it again."""
    worker_restart_delay: float = Field(1.0, ge=0.1, le=30)
    """Seconds before a worker of `serve --workers N` that exited within 10 s of its start is
    started again; doubled at each such exit in a row, up to 30 s."""

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, keys: tuple[ApiKey, ...]) -> tuple[ApiKey, ...]:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError("api key names must be unique")
        named: dict[str, str] = {}
        for k in keys:
            other = named.setdefault(k.key.reveal(), k.name)
            if other != k.name:
                # one of the two took effect (the last: its scopes, its name in the audit)
                raise ValueError(f"api keys {other!r} and {k.name!r} are the same key")
        return keys

    @property
    def embedded_bus(self) -> bool:
        if self.bus.backend == "kafka":
            return False
        return self.bus.nats.url is None

    @property
    def embedded_database(self) -> bool:
        return self.database.url is None


PARENT_ENV = "EVENTBUS_PARENT_PID"
"""The pid of a worker's parent (``serve --workers N``), which the worker must not outlive."""

WORKER_ENV = "EVENTBUS_WORKER"
"""The number of a worker of ``serve --workers N`` (0 to N-1), which its log lines carry."""

RESTARTED_ENV = "EVENTBUS_WORKER_RESTARTED"
"""Set for a worker of ``serve --workers N`` started again: once it has read the rule files,
it asks its parent to have the others read them too."""

EMBEDDED_NATS_ENV = "EVENTBUS_EMBEDDED_NATS_SEED"
"""The NKey seed a worker of ``serve --workers N`` signs in to its parent's embedded
nats-server with (``bus.nats.url`` is set to that server): not a setting, so the settings'
own ``bus.nats`` credentials, ignored with the embedded server, stay ignored."""

# Read by the commands, not settings: where the settings file is, the service and key the
# client commands (publish, dead-letters ...) talk to, a worker's parent and its number.
_NOT_SETTINGS = frozenset(
    {
        "EVENTBUS_CONFIG",
        "EVENTBUS_URL",
        "EVENTBUS_API_KEY",
        PARENT_ENV,
        WORKER_ENV,
        RESTARTED_ENV,
        EMBEDDED_NATS_ENV,
    }
)


def _env_value(raw: str) -> Any:
    """A list or mapping (``[...]``, ``{...}``) is read as YAML; any other value is its text,
    which each setting reads as its type (a port, true). Read as YAML, a password lost what
    follows " #" and one starting with "#" became none at all."""
    if raw.lstrip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    return raw


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings the ``EVENTBUS_*`` variables set, as nested mappings. A shallower one
    (``EVENTBUS_LISTEN='{port: 1}'``) is applied before a deeper one (``EVENTBUS_LISTEN__HOST``),
    which sets a key inside it: in the environment's order, the shallower one set later
    replaced the deeper one's value without a word."""
    out: dict[str, Any] = {}
    named: list[tuple[list[str], str, str]] = []
    for name, raw in env.items():
        # empty is as unset: the file's value or the default applies (it set the setting to
        # null: EVENTBUS_LOG_LEVEL= refused to start, EVENTBUS_DATABASE__URL= chose the
        # embedded PostgreSQL over the file's)
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS or raw == "":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if "" in path:
            raise ConfigError(
                f"environment {name}: names no setting (setting names are joined by '__': "
                f"{ENV_PREFIX}LISTEN__PORT for listen.port)"
            )
        named.append((path, name, raw))
    by_path: dict[tuple[str, ...], str] = {}
    for path, name, raw in sorted(named, key=lambda item: len(item[0])):
        other = by_path.setdefault(tuple(path), name)
        if other != name:  # names differing in case only
            raise ConfigError(f"environment {name}: sets the same setting as {other}")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: conflicts with another override")
        node[path[-1]] = _env_value(raw)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (or ``$EVENTBUS_CONFIG``, or defaults) and the environment.

    Raises ConfigError listing every problem with file, line and field.
    """
    env = os.environ if env is None else env
    if path is None and env.get("EVENTBUS_CONFIG"):
        path = env["EVENTBUS_CONFIG"]
    doc = YamlDoc({}, "<defaults>") if path is None else _read_settings(Path(path))
    overrides = _env_overrides(env)
    data = _merge(doc.data, overrides)
    try:
        settings = Settings.model_validate(data, context={"env": env})
    except ValidationError as exc:
        lines = []
        for err, line in zip(exc.errors(), pydantic_errors(doc, exc, model=Settings), strict=True):
            variable = _variable(env, err["loc"])
            if (
                variable is not None
                and err["type"] == "extra_forbidden"
                # the variable itself names no setting (a typo in a key inside its value is
                # reported as the other errors are); names are read in any case
                and variable.upper()
                == f"ENVIRONMENT {ENV_PREFIX}{'__'.join(str(p) for p in err['loc'])}".upper()
            ):
                # a variable a secret was to be read from ({env: EVENTBUS_DB_PASSWORD})
                # stopped the service with "Extra inputs are not permitted"
                hint = did_you_mean(str(err["loc"][-1]), fields_at(Settings, err["loc"][:-1]))
                lines.append(
                    f"{variable}: not a setting ({'.'.join(map(str, err['loc']))}){hint}: every "
                    f"{ENV_PREFIX}* variable is read as one; a variable a secret is read from "
                    "({env: NAME}) needs a name without that prefix"
                )
                continue
            # an overridden value's error names its variable, not the file's first line
            if variable is None:
                lines.append(line)
                continue
            lines.append(f"{variable}: {line.split(': ', 1)[1]}{_not_yaml(env, variable)}")
        raise ConfigError("\n".join(lines)) from exc
    # A secret set by an EVENTBUS_* variable is already out of the file: no warning.
    warn_literal_secrets(doc, settings, (), given=lambda loc: _overridden(overrides, loc))
    return settings


def service_address(
    path: str | Path, env: Mapping[str, str] | None = None
) -> tuple[Path, str, int]:
    """The data directory and the listen host and port the settings at ``path`` (with the
    ``EVENTBUS_*`` overrides) give ``serve``: what the client commands need to find it. Only
    those are read: loading the settings whole resolves every secret, and a client without
    read access to the service's secret files could not find it. Raises ConfigError."""
    p = Path(path)
    data = _unresolved(p, env)
    try:
        listen = ListenSettings.model_validate(data.get("listen") or {})
        data_dir = Settings.model_fields["data_dir"].default
        if data.get("data_dir") is not None:
            data_dir = Path(str(data["data_dir"]))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{p}: listen.{where}: {first['msg']}") from exc
    return Path(data_dir), listen.host, listen.port


def rule_paths(path: str | Path, env: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """The rules and connectors the settings at ``path`` (with the ``EVENTBUS_*`` overrides)
    give ``serve``, read as ``service_address`` reads (no secret resolved). Raises
    ConfigError."""
    p = Path(path)
    data = _unresolved(p, env)
    found = []
    for key in ("rules", "connectors"):
        value = data.get(key)
        if value is None:
            found.append(Path(str(Settings.model_fields[key].default)))
        elif isinstance(value, str) and value:
            found.append(Path(value))
        else:
            raise ConfigError(f"{p}: {key}: a path (text), not {type(value).__name__}")
    return found[0], found[1]


def _unresolved(p: Path, env: Mapping[str, str] | None) -> dict[str, Any]:
    """The settings at ``p`` with the ``EVENTBUS_*`` overrides, as data: nothing validated,
    no secret resolved. Raises ConfigError."""
    env = os.environ if env is None else env
    return _merge(_read_settings(p).data, _env_overrides(env))


def _read_settings(p: Path) -> YamlDoc:
    """The settings file ``p`` parsed (an empty one as an empty mapping); raises ConfigError
    when it cannot be read or is no mapping."""
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read settings: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: cannot read settings: not UTF-8 text ({exc})") from exc
    doc = load_yaml(text, str(p))
    if doc.data is None:
        doc = YamlDoc({}, str(p), doc.lines)
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{p}:1: settings must be a mapping")
    return doc


def _not_yaml(env: Mapping[str, str], variable: str) -> str:
    """Why the value of ``variable`` (``environment NAME``), which starts as a YAML list or
    mapping does, was read as plain text: where its YAML is broken, never what it holds (a
    key's); the error was only the setting's ("Input should be a valid tuple"). Empty
    otherwise."""
    raw = env.get(variable.removeprefix("environment "), "")
    if raw.lstrip()[:1] not in ("[", "{"):
        return ""
    try:
        yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        # where only: the parser's own words may quote the value ("found undefined alias
        # 'KEY'" for a key starting with "*")
        mark = exc.problem_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        return f" (the value is not valid YAML{where}; it was read as text)"
    except yaml.YAMLError:
        return " (the value is not valid YAML; it was read as text)"
    return ""


def _variable(env: Mapping[str, str], loc: tuple[str | int, ...]) -> str | None:
    """``environment EVENTBUS_X__Y`` when that variable set the value at ``loc`` (or above it,
    a list or mapping of YAML)."""
    by_path = {
        tuple(name[len(ENV_PREFIX) :].lower().split("__")): name
        for name, value in env.items()
        # an empty one set nothing (see _env_overrides): the file's value is at fault
        if name.startswith(ENV_PREFIX) and name not in _NOT_SETTINGS and value != ""
    }
    at = tuple(str(part) for part in loc)
    for depth in range(len(at), 0, -1):
        name = by_path.get(at[:depth])
        if name is not None:
            return f"environment {name}"
    # one that set a key below it (EVENTBUS_LISTEN__PORT__X made listen.port a mapping)
    below = sorted(name for path, name in by_path.items() if path[: len(at)] == at and at)
    return f"environment {below[0]}" if below else None


def _overridden(overrides: Mapping[str, Any], loc: tuple[str | int, ...]) -> bool:
    node: Any = overrides
    for key in loc:
        if not isinstance(node, Mapping):  # a list the environment set holds what is below
            return True
        if key not in node:
            return False
        node = node[key]
    return True
