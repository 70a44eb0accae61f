"""The composition root: builds every component from the settings, starts them in order and
stops them in reverse.

    start:  [embedded nats-server] [embedded PostgreSQL] -> Store (migrations, audit writer)
            -> Bus -> connectors + rules -> targets -> Dispatcher + RetryWorker -> Router
            -> sources
    stop:   sources -> Router (finish in-flight, ack nothing undelivered) -> RetryWorker
            -> targets -> Bus -> Store (flush audit) -> embedded servers

With no bus or database URL configured the service starts a real ``nats-server`` and a real
PostgreSQL under ``data_dir`` (the embedded default); with URLs it connects to them instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.util
import logging
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from eventbus import metrics
from eventbus._errors import (
    ConfigError,
    EventBusError,
    RuleError,
    RuleSetError,
    StoreError,
    StoreUnavailable,
)
from eventbus._files import replace_file
from eventbus._rates import Rates, deliveries_by_target, gauge_by_target
from eventbus._supervisor import Supervised, Supervisor
from eventbus._tasks import cancel_and_wait, in_daemon_thread, report_stuck
from eventbus.bus import (
    DUPLICATE,
    Bus,
    KafkaBus,
    KafkaBusConfig,
    NatsBus,
    NatsBusConfig,
    NatsServer,
    PublishOutcome,
    bus_message_limit,
    open_bus,
)
from eventbus.config import (
    EMBEDDED_NATS_ENV,
    ConnectorSet,
    KafkaAuth,
    NatsAuth,
    Secret,
    Settings,
    SourceSpec,
    load_connectors,
    redact_url,
)
from eventbus.delivery import (
    CIRCUIT_STATES,
    DeadLetterCount,
    DeadLetterFilter,
    DeliveryPolicy,
    DeliveryStore,
    Dispatcher,
    Invocation,
    Invoker,
    Refusal,
    RetryWorker,
    from_outside,
    invocation_via,
    invoke_rule,
    override_checker,
    sync_rule_via,
    target_policies,
)
from eventbus.router import LiveFeed, PeerFeed, Router, Watcher
from eventbus.rules import (
    Route,
    Rule,
    RuleSet,
    RuleSetHolder,
    compile_rules,
    load_rules,
    routing,
)
from eventbus.sources import (
    MqttSourceSpec,
    SharedStatuses,
    Source,
    SourceRunner,
    SourceStatus,
    WebhookSource,
    body_limit,
    build_source,
    duplicate_sessions,
    in_every_process,
    list_dead_letters,
)
from eventbus.store import (
    EmbeddedPostgres,
    EventCursor,
    EventTrail,
    Pruner,
    RetentionPolicy,
    Store,
    set_aside,
)
from eventbus.targets import Target, build_target

__all__ = ["CONNECTORS_SNAPSHOT", "FINGERPRINTS", "Embedded", "Service", "start_embedded"]

FINGERPRINTS = "rules"
"""The folder of the shared directory of ``serve --workers N`` where each worker keeps the
fingerprint of the rules it routes by (a file named by its pid)."""

PEERS_RELOAD_WITHIN = 10.0
"""Seconds a reload asked over HTTP of one worker of ``serve --workers N`` waits for the
others to route by the same rules before it answers (it answered at once: the events sent
next, handed to a worker still on the old rules, went by them)."""

CONNECTORS_SNAPSHOT = "connectors.json"
"""The file of the shared directory of ``serve --workers N`` holding the connectors' texts as
the parent read them (``connector_texts``): every worker starts with those, one restarted
after an edit too, so that all run one configuration (the edit applies at the next start of
the service, as in one process)."""

log = logging.getLogger("eventbus")

_SUMMARY_EVERY = 60.0  # seconds between activity summaries in the log
REPLAYS_LISTED = 1000  # replayed dead letters named in the answer (all are counted)


@contextmanager
def _unsaid_here() -> Iterator[None]:
    """Drop what this thread logs at warning or below while the block runs: a reload building
    the adapters repeated each one's start-time warnings (credentials over plain http, TLS
    verification off) at every reload, in every worker. Other threads log as before."""
    here = threading.get_ident()

    def elsewhere(record: logging.LogRecord) -> bool:
        return record.thread != here or record.levelno > logging.WARNING

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(elsewhere)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(elsewhere)


def _count_duplicate(via: str) -> None:
    metrics.EVENTS_DUPLICATE.labels(via).inc()


def _count_rule_failure(rule: str, what: str) -> None:
    metrics.RULE_FAILURES.labels(rule, what).inc()


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def build_adapters(
    found: ConnectorSet, runs: Callable[[SourceSpec], bool] = lambda _: True
) -> tuple[dict[str, Target], list[Source]]:
    """The adapters of every target of ``found`` and of the sources this process ``runs``,
    built (checked), not opened. Raises one ConfigError listing each setting an adapter refuses
    (a TLS file that cannot be read, tls on an http:// URL), with file and line;
    ``eventbus rules validate`` calls it too, so that it refuses what the start refuses."""
    errors: list[str] = []
    targets: dict[str, Target] = {}
    for name, target_spec in found.targets.items():
        try:
            targets[name] = build_target(target_spec)
        except ConfigError as exc:
            errors.append(found.located("target", name, exc))
    mqtt = [spec for spec in found.sources.values() if isinstance(spec, MqttSourceSpec)]
    errors.extend(
        found.located("source", name, problem) for name, problem in duplicate_sessions(mqtt)
    )
    sources: list[Source] = []
    for name, source_spec in found.sources.items():
        if not runs(source_spec):
            continue
        try:
            sources.append(build_source(source_spec))
        except ConfigError as exc:
            errors.append(found.located("source", name, exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return targets, sources


@dataclasses.dataclass(frozen=True)
class Embedded:
    """Where the bus and the database are: the embedded servers' URLs where they run, the
    configured ones otherwise; ``supervisor`` watches the embedded ones. ``nats_auth`` is how
    the service signs in to the embedded nats-server (an NKey), None for a configured one."""

    nats_url: str | None
    database_url: str
    supervisor: Supervisor
    nats_auth: NatsAuth | None = None


async def start_embedded(stack: AsyncExitStack, settings: Settings) -> Embedded:
    """Start the embedded nats-server and PostgreSQL the settings call for, supervised, on
    ``stack`` (which stops the supervisor first, then the servers). Raises BusError or
    StoreError when one does not come up."""
    data_dir = Path(settings.data_dir)
    nats_url, database_url = settings.bus.nats.url, settings.database.url
    servers: list[Supervised] = []
    nats_auth: NatsAuth | None = None
    if (seed := os.environ.get(EMBEDDED_NATS_ENV)) and settings.bus.backend == "nats":
        # a worker of serve --workers N, on its parent's embedded server (bus.nats.url)
        nats_auth = NatsAuth(nkey_seed=Secret(seed, "embedded"))
    if settings.embedded_bus:
        nats = await stack.enter_async_context(
            NatsServer(data_dir / "nats", max_payload=bus_message_limit(settings.max_event_size))
        )
        servers.append(nats)
        nats_url, nats_auth = nats.address, NatsAuth(nkey_seed=Secret(nats.nkey_seed, "embedded"))
        log.info("embedded nats-server at %s", nats.display_url)
    if settings.embedded_database:
        pg = await stack.enter_async_context(EmbeddedPostgres(data_dir / "postgres"))
        servers.append(pg)
        database_url = pg.dsn
        log.info("embedded PostgreSQL at %s", pg.display_dsn)
    assert database_url is not None
    supervisor = Supervisor(servers)
    supervisor.start()
    stack.push_async_callback(supervisor.stop)
    return Embedded(nats_url, database_url, supervisor, nats_auth)


async def _log_activity() -> None:
    """Every minute in which something happened, one line: events in, deliveries out."""
    before = metrics.activity()
    while True:
        await asyncio.sleep(_SUMMARY_EVERY)
        now = metrics.activity()
        diff = {k: round(v - before.get(k, 0.0)) for k, v in now.items()}
        before = now
        if any(diff.values()):
            log.info(
                "last %g s: %d events received, %d routed; %d delivered, %d retries "
                "scheduled, %d dead-lettered",
                _SUMMARY_EVERY,
                diff.get("events_received", 0),
                diff.get("events_routed", 0),
                diff.get("delivered", 0),
                diff.get("retry-scheduled", 0),
                diff.get("dead-lettered", 0),
            )


def _host() -> str | None:
    """Where this process's pids mean something, as a claim on the retry schedule carries it:
    the host's name and the pid namespace (a container's own; two containers sharing a host
    name and a copied data directory each saw the other's pids as ended). None where the pid
    namespace cannot be read (no /proc): nothing is taken back there."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname().replace('|', '_').replace('/', '_')}:{namespace}"


def _installation_id(data_dir: Path) -> str:
    """This installation's id, made once and kept in ``data_dir/installation-id``: who holds
    its sources' leases, so that a process restarted after a crash takes them back at once.
    Random, not the host's name and the directory's path: two machines cloned from one image
    share those, and would both have held every lease. Raises OSError when the file can be
    neither read nor made."""
    path = data_dir / "installation-id"
    try:
        return path.read_text().strip() or _new_installation_id(path)
    except FileNotFoundError:
        return _new_installation_id(path)


def _new_installation_id(path: Path) -> str:
    made = f"{socket.gethostname()}-{uuid.uuid4().hex}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(made + "\n")
    tmp.replace(path)
    return made


def _warn_of_unread_bodies(sources: list[Source], max_event_size: int) -> None:
    """Say which webhook triggers allow bodies larger than any trigger reads."""
    limit = body_limit(max_event_size)
    for source in sources:
        if isinstance(source, WebhookSource) and source.spec.max_body > limit:
            log.warning(
                "source %r: max_body %d is over the %d bytes a body can have to fit an event "
                "of max_event_size (%d); larger bodies are refused (413)",
                source.name,
                source.spec.max_body,
                limit,
                max_event_size,
            )


def _warn_of_open_triggers(sources: list[Source], settings: Settings) -> None:
    """Say which webhook triggers anyone may post to though the service has API keys: those
    taking no key (``service_keys: false``, neither ``verify`` nor ``keys``) and no address
    list. Without API keys such a trigger answers this machine's programs only."""
    if not settings.api_keys:
        return
    for source in sources:
        if not isinstance(source, WebhookSource):
            continue
        spec = source.spec
        keyless = spec.verify is None and not spec.keys and not spec.takes_service_keys
        if keyless and not spec.allow:
            log.warning(
                "source %r: this webhook trigger takes no key (service_keys: false, neither "
                "verify nor keys) and has no allow list: anyone who reaches the service may "
                "post events to it, web pages in a browser included",
                source.name,
            )


STUCK_AFTER = 30.0
"""Seconds of publishes unacknowledged by the embedded nats-server, while it answers, before
it is restarted."""


STUCK_PING = 1.0
"""Seconds the stuck probe waits for the server's answer (the supervisor's loop waits too)."""


async def _stuck(bus: NatsBus) -> str | None:
    """Why the embedded nats-server behind ``bus`` is stuck: publishes unacknowledged for
    ``STUCK_AFTER`` s while it answers a request. One that does not answer either (frozen,
    unreachable) is not stuck but slow or gone, for the supervisor's other checks: what went
    unanswered until then is forgotten, so a server frozen for 35 s is not restarted for it
    the moment it answers again."""
    why = bus.unanswered(STUCK_AFTER)
    if why is None:
        return None
    try:
        async with asyncio.timeout(STUCK_PING):
            answers = await bus.ping()
    except TimeoutError:
        answers = False
    if not answers:
        bus.forget_unanswered()
        return None
    return why


async def _none() -> int:
    return 0


def _changed(before: Mapping[str, Any], after: Mapping[str, Any], ignore: str = "") -> str:
    """The connectors in both ``before`` and ``after`` whose definitions differ, each with
    the settings that do (never their values: some are secrets), ``ignore`` left out:
    ``"fn (url, headers), cron (schedule)"``; empty when none does."""
    found = []
    for name in sorted(before.keys() & after.keys()):
        old, new = before[name], after[name]
        if old == new:
            continue
        if type(old) is not type(new):
            found.append(f"{name} (type)")
            continue
        fields = [
            field
            for field in type(new).model_fields
            if field != ignore and getattr(old, field) != getattr(new, field)
        ]
        if fields:
            found.append(f"{name} ({', '.join(fields)})")
    return ", ".join(found)


def _policies(connectors: ConnectorSet) -> dict[str, DeliveryPolicy]:
    return target_policies(
        {name: spec.delivery for name, spec in connectors.targets.items()},
        located=lambda name, problem: connectors.located("target", name, problem),
    )


class Service:
    """One running eventbus process (``async with Service(settings) as service``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        instance: str | None = None,
        shared: Path | None = None,
    ) -> None:
        """``shared``: the directory the workers of one ``serve --workers N`` share: their
        source statuses in ``sources`` (see :class:`~eventbus.sources.SharedStatuses`), their
        live feeds' sockets in ``live`` (see :class:`~eventbus.router.PeerFeed`)."""
        self.settings = settings
        self._shared = shared
        self.rules_reloaded: Callable[[], None] | None = None
        """Called after a reload asked of this process took (``reload_rules``)."""
        self._peer_feed: PeerFeed | None = None
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stack = AsyncExitStack()
        self.store: Store
        self.bus: Bus
        self.rules: RuleSetHolder
        self.connectors: ConnectorSet
        self.deliveries: DeliveryStore
        self.dispatcher: Dispatcher
        self.targets: dict[str, Target] = {}
        self._router: Router | None = None
        self._retries: RetryWorker | None = None
        self._sources: SourceRunner | None = None
        self._invoker: Invoker
        self.nats_url: str | None = None
        self._nats_auth: NatsAuth | None = None
        self.database_url: str | None = None
        self.supervisor: Supervisor | None = None
        self.feed = LiveFeed()
        self.stopping = False
        """The HTTP server's shutdown has begun (requests still running may be cut off)."""
        self._workers_stop: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._rates = Rates()
        self.reload_notes: list[str] = []
        """What the last rules reload left for the next start (connector files changed)."""
        self._reloading = asyncio.Lock()  # one rules reload at a time

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    def read_files(
        self, texts: Mapping[str, str | None] | None = None
    ) -> tuple[RuleSet, dict[str, Target], list[Source]]:
        """Read the connectors and the rules as the start does, building (not opening) the
        adapters. Raises ConfigError or RuleSetError naming file and line; the parent of
        ``serve --workers N`` calls it before starting any worker, with the connectors'
        ``texts`` it gives them (a worker reads those, see :data:`CONNECTORS_SNAPSHOT`)."""
        # Every problem of every file at once: connectors, delivery settings, adapters and
        # rules came in as many rounds, each fix showing the next.
        problems: list[str] = []
        connectors: ConnectorSet | None = None
        policies: dict[str, DeliveryPolicy] | None = None
        try:
            texts = texts or self._connector_snapshot()
            # a worker's snapshot needs no file (one removed since the start failed every
            # restarted worker)
            path = self._named_path("connectors") if texts is None else self.settings.connectors
            connectors = load_connectors(path, texts=texts)
            policies = _policies(connectors)
        except ConfigError as exc:
            problems.append(str(exc))
        built: tuple[dict[str, Target], list[Source]] | None = None
        if connectors is not None:
            self.connectors = connectors
            try:
                built = self._build_connectors()
            except ConfigError as exc:
                problems.append(str(exc))
        try:
            rules = self._load_rules(connectors, policies)
        except EventBusError as exc:  # RuleSetError, ConfigError
            if not problems:
                raise
            problems.append(str(exc))
        if problems or built is None or policies is None:
            raise ConfigError("\n".join(problems))
        self._delivery_policies = policies  # connectors are read at start: these stay in use
        targets, sources = built
        return rules, targets, sources

    async def _start(self) -> None:
        s = self.settings
        # Validate user files first: a typo should not cost a database start.
        rules, targets, sources = self.read_files()
        _warn_of_unread_bodies(sources, s.max_event_size)
        _warn_of_open_triggers(sources, s)

        embedded = await start_embedded(self._stack, s)
        self.nats_url, self.database_url = embedded.nats_url, embedded.database_url
        self._nats_auth = embedded.nats_auth
        self.supervisor = embedded.supervisor

        await self._stack.enter_async_context(self._rates)
        external = not s.embedded_database
        db = s.database
        self.store = await Store.open(
            self.database_url,
            max_size=db.pool_size,
            connect_timeout=db.connect_timeout,
            password=db.password.reveal() if external and db.password is not None else None,
            ssl=db.ssl_option() if external else None,
        )
        self._stack.push_async_callback(self.store.close)
        log.info("database: %s", redact_url(self.database_url))
        kept = s.retention
        retention = RetentionPolicy(
            audit=kept.audit,
            dead_letters=kept.dead_letters,
            source_dead_letters=kept.source_dead_letters,
            every=kept.every,
        )
        pruner = Pruner(self.store.pool, retention)
        pruner.start()
        self._stack.push_async_callback(pruner.stop)
        log.info("retention: %s", retention.describe())
        bus_config = self._bus_config()
        self.bus = await self._stack.enter_async_context(open_bus(bus_config))
        if isinstance(self.bus, KafkaBus):
            # a copy the consumer drops (JetStream drops it on publish): counted alike
            self.bus.copy_dropped = _count_duplicate
        if s.embedded_bus and isinstance(self.bus, NatsBus):
            self.supervisor.restart_when_stuck(NatsServer.name, functools.partial(_stuck, self.bus))
        if isinstance(bus_config, NatsBusConfig):
            log.info(
                "bus: NATS JetStream at %s, stream %s",
                redact_url(bus_config.url),
                bus_config.stream,
            )
        else:
            log.info(
                "bus: Kafka at %s, topic %s",
                redact_url(bus_config.bootstrap_servers),
                bus_config.topic,
            )

        self.rules = RuleSetHolder(rules)
        self._share_fingerprint()
        RuleSet.on_failure = _count_rule_failure
        for name, target in targets.items():
            self.targets[name] = await self._stack.enter_async_context(target)
        self.deliveries = DeliveryStore(self.store.pool)
        self.dispatcher = Dispatcher(
            self.targets,
            self._delivery_policies,
            self.deliveries,
            self.store.audit,
            functools.partial(self._publish_one, via="reply"),
            hop_limit=s.router.hop_limit,
            disabled=await self.deliveries.disabled_targets(),
            # one target's waiting deliveries hold at most 90 % of the in-flight window
            route_share=max(1, s.bus.max_in_flight * 9 // 10),
        )
        # A claimed row must outlive its attempt: the slowest target's timeout, twice, plus a
        # margin; the worker extends it while the attempt runs (waiting for a concurrency slot
        # included), so it only decides how soon a dead instance's rows are taken over.
        # Writes check the claim token regardless.
        slowest = max((spec.timeout for spec in self.connectors.targets.values()), default=10.0)
        installation = await asyncio.to_thread(_installation_id, Path(s.data_dir))
        host = _host()
        here = f"{installation}|{host}|"
        for pid, given in (await self.deliveries.take_back(here) if host else {}).items():
            log.info(
                "%d retries claimed by a process that ended (pid %d) are due again", given, pid
            )
        self._retries = RetryWorker(
            self.dispatcher,
            self.deliveries,
            instance=f"{here}{os.getpid()}|{self.instance}",
            lease=slowest * 2 + 10,
        )
        self.dispatcher.scheduled = self._retries.due_in
        self._invoker = Invoker(self.targets, self.dispatcher, self.store.audit)
        self._retries.start()
        if self._shared is not None:
            # Listening before the router routes anything, so the other workers' watchers can
            # subscribe (at their next scan) to all of it. Resolved: the parent links it to a
            # short directory, for a socket's path is short.
            live = (self._shared / "live").resolve()
            self._peer_feed = await self._stack.enter_async_context(PeerFeed(self.feed, live))
        self._router = Router(
            self.bus,
            self.rules,
            self.dispatcher,
            self.store.audit,
            functools.partial(set_aside, self.store.pool, "bus"),
            # well inside JetStream's ack_wait (Kafka needs no progress reports)
            progress_every=s.bus.nats.ack_wait / 2,
            feed=self.feed,
        )
        self._retries.ran = self._router.retried
        self._router.start()
        self._stack.push_async_callback(self._stop_workers_now)
        summary = asyncio.create_task(_log_activity(), name="eventbus-summary")
        self._stack.push_async_callback(cancel_and_wait, summary)
        await self._start_sources(sources, installation)
        log.info(
            "eventbus ready: %d rules, %d targets, %d sources, bus=%s",
            len(rules.rules),
            len(self.targets),
            len(self.source_statuses()),
            s.bus.backend,
        )

    def _bus_config(self) -> NatsBusConfig | KafkaBusConfig:
        s = self.settings
        if s.bus.backend == "kafka":
            if not s.bus.kafka.bootstrap_servers:
                raise ConfigError("bus.kafka.bootstrap_servers is required with backend kafka")
            return KafkaBusConfig(
                bootstrap_servers=s.bus.kafka.bootstrap_servers,
                topic=s.bus.kafka.topic,
                group_id=s.bus.kafka.group_id,
                partitions=s.bus.kafka.partitions,
                idempotent=s.bus.kafka.idempotent,
                session_timeout=s.bus.kafka.session_timeout,
                fetch_wait=s.bus.kafka.fetch_wait,
                linger_ms=s.bus.kafka.linger_ms,
                max_in_flight=s.bus.max_in_flight,
                publish_timeout=s.bus.publish_timeout,
                auth=s.bus.kafka,
                max_event_size=s.max_event_size,
            )
        assert self.nats_url is not None
        return NatsBusConfig(
            url=self.nats_url,
            stream=s.bus.nats.stream,
            subject=s.bus.nats.subject,
            durable=s.bus.nats.durable,
            max_in_flight=s.bus.max_in_flight,
            ack_wait=s.bus.nats.ack_wait,
            duplicate_window=s.bus.nats.duplicate_window,
            publish_timeout=s.bus.publish_timeout,
            auth=s.bus.nats if self._nats_auth is None else self._nats_auth,
            max_event_size=s.max_event_size,
        )

    def _connector_snapshot(self) -> dict[str, str | None] | None:
        """A worker's connectors: their texts as its parent read them at its start."""
        if self._shared is None:
            return None
        try:
            snapshot = (self._shared / CONNECTORS_SNAPSHOT).read_bytes()
        except FileNotFoundError:
            return None
        texts: dict[str, str | None] = orjson.loads(snapshot)
        return texts

    def _named_path(self, name: str) -> Path:
        """The settings' ``name`` path (``rules``, ``connectors``). Raises ConfigError when the
        settings or ``EVENTBUS_<NAME>`` named it and it does not exist: a typo, not a first
        start (the service ran routing nothing, or with no target and no source, saying
        nothing); the default may be absent."""
        path = Path(getattr(self.settings, name))
        if name in self.settings.model_fields_set and not path.exists():
            raise ConfigError(f"{name}: no such file or directory: {path}")
        return path

    def _load_rules(
        self, connectors: ConnectorSet | None, policies: Mapping[str, DeliveryPolicy] | None
    ) -> RuleSet:
        """The rules, checked against the targets and delivery settings (not when the
        connectors did not load: the rules' own problems are reported beside theirs)."""
        known = None if connectors is None else connectors.targets.keys()
        check = None if policies is None else override_checker(policies)
        native_cel = self.settings.router.cel == "cel-expr-python"
        if native_cel and importlib.util.find_spec("cel_expr_python") is None:
            raise ConfigError(
                "router.cel is cel-expr-python, which is not installed: "
                "pip install 'eventbus[fast-cel]'"
            )
        path = self._named_path("rules")
        if not path.exists():
            log.warning("no rules at %s: routing nothing until rules are added", path)
            return compile_rules([], known_targets=known, native_cel=native_cel)
        return load_rules(path, known_targets=known, check_delivery=check, native_cel=native_cel)

    def _build_connectors(self) -> tuple[dict[str, Target], list[Source]]:
        """The adapters of every target and of the sources this process runs (with
        ``run_sources`` off only those that serve requests, the webhooks, which every process
        must), built before anything starts. Raises one ConfigError listing each setting an
        adapter refuses (a TLS file that cannot be read, an endpoint that is no URL), with
        file and line: they came one at a time, without either, once the database was up."""
        return build_adapters(self.connectors, self._runs)

    def _runs(self, spec: SourceSpec) -> bool:
        """Whether this process runs (and so builds) the source ``spec``."""
        return self.settings.run_sources or in_every_process(spec)

    async def _start_sources(self, sources: list[Source], installation: str) -> None:
        """Run ``sources`` and, when configured, ``kafka_ingest``: a ``kafka`` source named
        ``kafka-ingest`` reading CloudEvents; one-instance sources under leases held in the
        name of ``installation``."""
        s = self.settings
        if s.kafka_ingest is not None:
            sources.append(
                build_source(
                    {
                        "name": "kafka-ingest",
                        "type": "kafka",
                        "bootstrap_servers": s.kafka_ingest.bootstrap_servers,
                        "topics": list(s.kafka_ingest.topics),
                        "group_id": s.kafka_ingest.group_id,
                        "session_timeout": s.kafka_ingest.session_timeout,
                        "format": "cloudevents",
                        # The validated objects themselves: a dump would mask the password.
                        **{
                            key: getattr(s.kafka_ingest, key)
                            for key in KafkaAuth.model_fields
                            if getattr(s.kafka_ingest, key) is not None
                        },
                    }
                )
            )
        shared = None if self._shared is None else self._shared / "sources"
        self._sources = await self._stack.enter_async_context(
            SourceRunner(
                sources,
                publish=self._publish_one,
                publish_many=self._publish_counted,
                pool=self.store.pool,
                instance_id=self.instance,
                shared=None if shared is None else SharedStatuses(shared),
                max_event_size=self.settings.max_event_size,
                lease=self.settings.source_lease,
                lease_owner=installation,
            )
        )

    def _stop_workers_now(self) -> asyncio.Task[None]:
        """The router's and the retry worker's stop, begun once (see ``closing``)."""
        if self._workers_stop is None:
            self._workers_stop = asyncio.create_task(
                self._stop_workers(), name="eventbus-stop-workers"
            )
        return self._workers_stop

    async def _stop_workers(self) -> None:
        # both under one deadline, so a worker's whole shutdown fits the supervisor's wait
        grace = self.settings.router.shutdown_grace
        if self.dispatcher.in_flight:
            log.info("waiting for %d deliveries (up to %g s)", self.dispatcher.in_flight, grace)
        routing, retrying = await asyncio.gather(
            self._router.stop(grace, self._hurry) if self._router is not None else _none(),
            self._retries.stop(grace, self._hurry) if self._retries is not None else _none(),
        )
        if routing or retrying:  # cut short: nothing said so, they were just gone
            log.warning(
                "cut short %s: %d events being handled (the bus delivers them again) and %d "
                "retries (tried again when their lease ends)",
                "by a second signal" if self._hurry.is_set() else f"after the {grace:g} s grace",
                routing,
                retrying,
            )

    def hurry(self) -> None:
        """A second stop signal: the deliveries still under way end now, not at the end of
        ``router.shutdown_grace`` (each is audited as cut off; the bus and the retry schedule
        still hold them, so they are delivered again). The rest of the stop (the audit's
        flush, the sources, the embedded servers) goes on as before."""
        if not self._hurry.is_set():
            log.warning("stopping now: the deliveries still under way are cut off")
            self._hurry.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Deliveries get shutdown_grace; the rest (sources, bus, audit flush, embedded
        # servers) a few seconds. Past that something is stuck: say where, while waiting on.
        watchdog = asyncio.create_task(
            report_stuck("shutdown", self.settings.router.shutdown_grace + 15),
            name="eventbus-shutdown-watchdog",
        )
        try:
            await self._stack.aclose()
        finally:
            await cancel_and_wait(watchdog)

    # -- operations used by the API and CLI ------------------------------------------------
    # The HTTP edge and the CLI go through these methods only, never through the components
    # behind them, so those can change without the edge noticing.

    async def reload_rules(self, *, announce: bool = True) -> int:
        """Reload connectors' target names and rules; an invalid set keeps the old one (and
        raises what is wrong with it). Logs one line either way. A reload that took, when
        ``announce``d, calls ``rules_reloaded`` (the other workers of ``serve --workers N``
        reload too).

        The files are read and compiled in a thread, one reload at a time: compiling
        thousands of CEL conditions takes seconds, during which the event loop held by it
        answered nothing (probes, ingest, deliveries; a worker of ``--workers N`` not heard
        from is killed). A caller that stops waiting (a client gone) does not stop the
        reload: it finishes, and takes."""
        return await asyncio.shield(self._reload_rules(announce))

    async def _reload_rules(self, announce: bool) -> int:
        async with self._reloading:
            try:
                notes = await in_daemon_thread(self._swap_rules, "rules-reload")
            except EventBusError as exc:
                log.warning(
                    "rules reload failed, %d rules stay in use: %s",
                    len(self.rules.current.rules),
                    " | ".join(str(exc).splitlines()),
                )
                raise
        for note in notes:
            log.warning("%s", note)
        self.reload_notes = notes
        count = len(self.rules.current.rules)
        fingerprint = self.rules.current.fingerprint
        log.info(
            "rules reloaded: %d rules from %s (fingerprint %s)",
            count,
            self.settings.rules,
            fingerprint,
        )
        self._share_fingerprint()
        if announce and self.rules_reloaded is not None and not self.stopping:
            # (not once the service stops: a reload that ends then would have the parent of
            # --workers N pass SIGHUP to workers that are ending)
            self.rules_reloaded()
            behind = await self._workers_behind(fingerprint, PEERS_RELOAD_WITHIN)
            if behind:
                self.reload_notes = [*notes, _behind_note(behind, fingerprint)]
                log.warning("%s", self.reload_notes[-1])
        return count

    def _share_fingerprint(self) -> None:
        """A worker of ``serve --workers N``: the fingerprint of the rules it routes by now,
        in its file of the shared directory, which a reload asked of another worker waits on."""
        if self._shared is None:
            return
        folder = self._shared / FINGERPRINTS
        try:
            folder.mkdir(exist_ok=True)
            replace_file(folder / str(os.getpid()), self.rules.current.fingerprint)
        except OSError as exc:  # a full disk: a reload elsewhere waits for it in vain
            log.warning("cannot share the rules' fingerprint with the other workers: %s", exc)

    async def _workers_behind(self, fingerprint: str, within: float) -> dict[int, str]:
        """The live workers (each with its beat file) not routing by ``fingerprint`` once
        ``within`` seconds have passed (or none as soon as all do), with what they route by."""
        if self._shared is None:
            return {}
        deadline = asyncio.get_running_loop().time() + within
        while True:
            behind = await asyncio.to_thread(_fingerprints_besides, self._shared, fingerprint)
            if not behind or asyncio.get_running_loop().time() >= deadline:
                return behind
            await asyncio.sleep(0.05)

    def _swap_rules(self) -> list[str]:
        """Load and swap in the rule files (in a thread: see ``reload_rules``); returns the
        notes on the connector files."""
        connectors = load_connectors(self.settings.connectors)
        # What the next start would refuse in them (a port out of range, a header with a line
        # break, a TLS file missing), as `rules validate` and the start check it: the reload
        # said OK, and the next restart failed.
        try:
            # as this process's start builds them, without repeating the start's warnings
            with _unsaid_here():
                build_adapters(connectors, self._runs)
        except ConfigError as exc:
            raise ConfigError(f"the next start would refuse the connector files:\n{exc}") from exc
        new = sorted(set(connectors.targets) - set(self.targets))
        notes = self._connector_changes(connectors, new)
        # Against the targets and policies in use, which a reload does not change: a new
        # target in the files held every reload until a restart, a rule naming it or not.
        # Against the files' policies, an override valid there but not on the running
        # policy was accepted, and every delivery of its route failed (redelivered for ever).
        try:
            self.rules.reload(
                self.settings.rules,
                known_targets=self.targets.keys(),
                check_delivery=override_checker(self._delivery_policies),
            )
        except RuleSetError as exc:
            # A rule naming a target new in the files: say why it is unknown still.
            if not any(repr(name) in str(exc) for name in new):
                raise
            raise RuleSetError([*exc.errors, RuleError(notes[0])]) from exc
        return notes

    def _connector_changes(self, connectors: ConnectorSet, new: list[str]) -> list[str]:
        """What in the connector files differs from the targets in use (read at start), the
        targets ``new`` there first: a reload applies none of it, and says so."""
        where = self.settings.connectors
        notes = []
        if new:
            notes.append(
                f"targets {', '.join(new)} are new in {where}: they start at the next start, "
                "and rules may name them from then on"
            )
        gone = sorted(set(self.targets) - set(connectors.targets))
        if gone:
            notes.append(
                f"targets {', '.join(gone)} are no longer in {where}: they run until the next "
                "start, and rules naming them are refused from then on"
            )
        changed = _changed(self.connectors.targets, connectors.targets, ignore="delivery")
        if changed:
            # a URL edited and reloaded: the operator took the new one for live
            notes.append(
                f"targets changed in {where}: {changed}; the running ones stay as they were "
                "until the next start"
            )
        files = _policies(connectors)
        in_use = self._delivery_policies
        if any(files[name] != in_use[name] for name in files.keys() & in_use.keys()):
            notes.append(
                f"the targets' delivery settings changed in {where}: they take effect at the "
                "next start; rules' overrides are checked against those in use"
            )
        before, after = self.connectors.sources, connectors.sources
        edits = [
            f"{', '.join(names)} {what}"
            for names, what in (
                (sorted(after.keys() - before.keys()), "new"),
                (sorted(before.keys() - after.keys()), "no longer there"),
            )
            if names
        ]
        if changed_sources := _changed(before, after):
            edits.append(f"changed: {changed_sources}")
        if edits:
            notes.append(
                f"sources in {where}: {'; '.join(edits)}; sources are read at the start, "
                "and run as they were until the next start"
            )
        return notes

    async def replay(
        self, flt: DeadLetterFilter, *, expect: int | None = None
    ) -> tuple[list[dict[str, Any]], int, list[str]]:
        """Move dead letters back into the retry schedule (audited), due now, a batch at a
        time; returns the first ``REPLAYS_LISTED`` of them (oldest first), how many there
        were, and notes: the targets among them this process does not have (their retries wait
        for an instance that has them, or for ever). A store failure after some batches says
        how many had moved. With ``expect``, SelectionChanged (nothing moved) unless exactly
        that many match."""
        shown: list[dict[str, Any]] = []
        count = 0
        unknown: Counter[str] = Counter()
        known = set(self.dispatcher.target_names())
        try:
            async for batch in self.deliveries.replay(flt, expect=expect):
                shown.extend(batch[: REPLAYS_LISTED - len(shown)])
                count += len(batch)
                unknown.update(row["target"] for row in batch if row["target"] not in known)
                if self._retries is not None:
                    self._retries.wake()  # the first batches go out while the next are moved
        except StoreError as exc:
            if not count:
                raise
            # the operator must not take a replay three quarters done for one that failed
            raise type(exc)(
                f"{exc}; {count} dead letters were replayed before it (and perhaps the batch "
                "it was moving): list the dead letters for what is left"
            ) from exc
        notes = [
            f"target {target!r} is not defined here: its {n} replayed retries wait in the retry "
            "schedule for an instance that has it (eventbus retries list)"
            for target, n in sorted(unknown.items())
        ]
        if expect is not None and count < expect:
            # another replay or a purge took the others while this one moved its batches
            notes.append(
                f"{expect - count} of the {expect} confirmed were no longer dead letters when "
                "their batch came: another replay or a purge took them meanwhile"
            )
        for note in notes:
            log.warning("replay: %s", note)
        return shown, count, notes

    def liveness(self) -> str | None:
        """Why this process should be restarted (an embedded server that cannot be brought
        back), or None while it can make progress by itself."""
        return None if self.supervisor is None else self.supervisor.failed

    async def readiness(self, within: float = 0.8) -> tuple[bool, dict[str, str]]:
        """Whether the service can take and route events now, per component, answered within
        about ``within`` seconds whatever state the bus and the database are in."""

        pings = [asyncio.ensure_future(self.bus.ping()), asyncio.ensure_future(self.store.ping())]
        await asyncio.wait(pings, timeout=within)
        for ping in pings:
            if not ping.done():
                # Not awaited: cancelling a query on a frozen server can itself wait on it.
                ping.cancel()
                ping.add_done_callback(_ignore_outcome)
        # a ping left unanswered (a frozen or overloaded server) is told apart from one
        # refused: "unreachable" read as down while publishes were being answered 202
        bus_said, db_said = (
            ("ok" if p.result() else "unreachable")
            if p.done() and not p.cancelled()
            else f"no answer within {within:g} s"
            for p in pings
        )
        bus_ok, db_ok = bus_said == "ok", db_said == "ok"
        bus_stalled = self.bus.stalled() if bus_ok else None
        audit_ok, audit = self.store.audit.health()
        # A write that never returns (a COMMIT waiting on a synchronous standby) raises nothing
        # and holds what waits on it, while a ping still answers.
        stalled = self.deliveries.writes.stalled()
        router_ok, router = (True, "ok") if self._router is None else self._router.health()
        retries_ok, retries = (True, "ok") if self._retries is None else self._retries.health()
        body = {
            "bus": bus_stalled or bus_said,
            "database": stalled or db_said,
            "audit": audit,
            "router": router,
            "retries": retries,
        }
        ready = bus_ok and bus_stalled is None and db_ok and stalled is None
        return ready and audit_ok and router_ok and retries_ok, body

    async def enable_target(self, name: str) -> bool:
        found = await self.deliveries.enable_target(name)
        self.dispatcher.enable(name)
        return found

    async def describe_targets(self) -> list[dict[str, Any]]:
        """Each configured target: its type, its circuit state (each worker keeps its own:
        the most open of them), whether it is disabled (after a 410: why and since when) and
        how many of its deliveries wait in the retry schedule; the last two from the database,
        so every instance's. While the database cannot be reached, the targets are still shown
        (an outage is when they are looked at): disabled as this process knows it, without
        the time, and no count of retries (null). Raises StoreError for a query it refuses."""
        waiting: dict[str, int] | None
        disabled: Mapping[str, Mapping[str, str | None]]
        try:
            disabled = await self.deliveries.disabled_since()
            waiting = await self.deliveries.retries_by_target()
        except StoreUnavailable as exc:  # not a refused query: that is an answer to give
            log.debug("targets described without the database: %s", exc)
            disabled = {
                name: {"reason": why, "at": None}
                for name in self.connectors.targets
                if (why := self.dispatcher.disabled(name)) is not None
            }
            waiting = None
        circuits = gauge_by_target(metrics.families(), metrics.CIRCUIT_STATE)
        out = []
        for name, spec in self.connectors.targets.items():
            guard = self.dispatcher.guard(name)
            state = CIRCUIT_STATES[round(circuits.get(name, 0.0))]
            out.append(
                {
                    "name": name,
                    "type": spec.type,
                    "circuit": None if guard is None else state,
                    "disabled": disabled.get(name),
                    "retries": None if waiting is None else waiting.get(name, 0),
                }
            )
        return out

    async def invoke(
        self,
        target: str,
        event: dict[str, Any],
        *,
        invoker: str,
        asynchronous: bool = False,
        reply: bool = False,
    ) -> Invocation:
        """Invoke ``target`` with the valid ``event`` directly, without a rule (see
        :mod:`eventbus.delivery._invoke`); ``invoker`` says who asked (audited).

        Synchronous: one attempt, the target's answer in the result, nothing retried; with
        ``reply``, a request whose reply is the answer (NATS targets).
        Asynchronous: returns once the event is on the durable bus (the result holds neither an
        answer nor a refusal), then it is delivered to ``target`` alone with its delivery
        policy; raises BusUnavailable or BusError when it could not be put there. Either way
        an unknown or disabled target is a refusal and nothing is sent."""
        if not asynchronous:
            via = invocation_via("sync", target, invoker)
            return await self._invoker.invoke(event, target, via=via, reply=reply)
        refused = self._invoker.refusal(target)
        if refused is not None:
            return refused
        # Audited as accepted, matched and attempted when the router takes it off the bus.
        via = invocation_via("async", target, invoker)
        duplicate = await self.bus.publish(
            from_outside(event, via), via=via, scope=invoke_rule(target)
        )
        return Invocation(target, duplicate=duplicate)

    async def invoke_sync_rule(
        self, event: dict[str, Any], *, invoker: str, size: int
    ) -> Invocation:
        """Answer a synchronous ``POST /events``: the one enabled rule marked ``sync: true``
        that ``event`` matches sends it (transformed as the rule says) to its target once, and
        the target's answer is the result. None or several such rules: a refusal naming them.
        The event is not put on the bus: that rule alone handles it. ``size``: the request's
        bytes (a large event is matched off the event loop, see ``eventbus.rules.routing``)."""
        routes, failed = await routing(
            self.rules.current, size, lambda rules: rules.sync_routes(event)
        )
        if failed:
            # matched, but nothing to send: not "no rule matches" (a 404 that hid the rule)
            why = "; ".join(f"rule {rule!r}: {reason}" for rule, reason in failed.items())
            detail = f"the transform of a rule with sync: true failed on the event: {why}"
            return Invocation("", refusal=Refusal.SYNC_TRANSFORM, detail=detail)
        if len(routes) != 1:
            names = ", ".join(route.rule for route in routes)
            refusal, detail = (
                (Refusal.NO_SYNC_RULE, "no rule with sync: true matches the event")
                if not routes
                else (
                    Refusal.SYNC_RULES,
                    f"the event matches {len(routes)} rules with sync: true ({names}); "
                    "a synchronous request needs exactly one",
                )
            )
            return Invocation("", refusal=refusal, detail=detail)
        (route,) = routes
        via = sync_rule_via(route.rule, invoker)
        return await self._invoker.invoke(event, route.target, via=via, route=route)

    def source_statuses(self) -> list[SourceStatus]:
        return [] if self._sources is None else self._sources.statuses()

    def source(self, name: str) -> Source | None:
        """The running source named ``name`` (the HTTP edge hands webhooks to theirs)."""
        return None if self._sources is None else self._sources.source(name)

    async def _publish_one(self, event: dict[str, Any], *, via: str) -> bool:
        """:meth:`Bus.publish` for the sources and replies, counted as
        :meth:`_publish_counted` counts. Returns True for a duplicate. Raises BusUnavailable or
        BusError as ``Bus.publish``."""
        (outcome,) = await self._publish_counted([event], via=via)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome == DUPLICATE

    async def _publish_counted(
        self, events: Sequence[dict[str, Any]], *, via: str
    ) -> list[PublishOutcome]:
        """:meth:`publish_many` for the sources, counted as the HTTP edge counts its own:
        ``eventbus_events_received_total{via}`` for those stored,
        ``eventbus_events_duplicate_total{via}`` for those whose source+id the bus held."""
        outcomes = await self.publish_many(events, via=via)
        stored, duplicates = outcomes.count(None), outcomes.count(DUPLICATE)
        if stored:
            metrics.EVENTS_RECEIVED.labels(via).inc(stored)
        if duplicates:
            metrics.EVENTS_DUPLICATE.labels(via).inc(duplicates)
        return outcomes

    async def publish_many(
        self, events: Sequence[dict[str, Any]], *, via: str
    ) -> list[PublishOutcome]:
        """Put valid events on the durable bus; one outcome per event, in order: None once it
        is durable (the publisher may be answered 2xx), ``"duplicate"`` when the bus already
        held its source+id within its duplicate window (durable too, but not delivered again),
        else BusUnavailable or BusError."""
        return await self.bus.publish_many([from_outside(e, via) for e in events], via=via)

    def record_refusal(self, *, remote: str | None, path: str, reason: str) -> bool:
        """Audit one refused request; False when the audit cannot take it now (never waits)."""
        return self.store.audit.refused(remote=remote, path=path, reason=reason)

    async def event_trail(self, source: str, event_id: str) -> EventTrail | None:
        """An event's acceptance, matches and delivery attempts, or None for an unknown event.
        Raises StoreError (StoreDataError for a value the database refuses)."""
        return await self.store.event_trail(source, event_id)

    async def search_events(
        self,
        *,
        source: str | None,
        type: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        after: EventCursor | None,
    ) -> tuple[list[dict[str, Any]], EventCursor | None]:
        """A page of accepted events, newest first, and the cursor of the next page (see
        :meth:`eventbus.store.Store.search_events`). Raises StoreError."""
        return await self.store.search_events(
            source=source, type=type, since=since, until=until, limit=limit, after=after
        )

    def current_rules(self) -> Sequence[Rule]:
        """The rules routing now, in load order, disabled ones included."""
        return self.rules.current.rules

    def rules_fingerprint(self) -> str:
        """A short hash of the rules routing now (``RuleSet.fingerprint``)."""
        return self.rules.current.fingerprint

    async def dead_letters(
        self, flt: DeadLetterFilter, *, limit: int, after: int | None = None
    ) -> list[dict[str, Any]]:
        """One page of the dead letters ``flt`` selects, by id, after the id ``after``."""
        return await self.deliveries.list_dead_letters(flt, limit=limit, after_id=after)

    async def count_dead_letters(self, flt: DeadLetterFilter) -> DeadLetterCount:
        """How many dead letters ``flt`` selects, when the newest was written and its highest
        id (what a replay or purge by ``flt`` would act on now)."""
        return await self.deliveries.count_dead_letters(flt)

    async def pending_retries(
        self, *, limit: int, event: tuple[str, str] | None = None, target: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The deliveries waiting for their next attempt (of the ``(source, id)`` event and
        of ``target`` only, when given), the next due first, at most ``limit``, and how many
        wait in all (of those). Raises StoreError."""
        return await self.deliveries.list_retries(limit=limit, event=event, target=target)

    async def dead_letter(self, dl_id: int) -> dict[str, Any] | None:
        """One dead letter with its event and every attempt, or None."""
        return await self.deliveries.get_dead_letter(dl_id)

    async def purge(self, flt: DeadLetterFilter, *, expect: int | None = None) -> int:
        """Delete the dead letters ``flt`` selects; how many were deleted. With ``expect``,
        SelectionChanged (nothing deleted) unless exactly that many match."""
        return await self.deliveries.purge(flt, expect=expect)

    async def source_dead_letters(
        self, *, source: str | None = None, limit: int = 100, payload_bytes: int | None = None
    ) -> list[dict[str, Any]]:
        """Input sources could not turn into events, newest first (see
        :func:`eventbus.sources.list_dead_letters`)."""
        return await list_dead_letters(
            self.store.pool, source=source, limit=limit, payload_bytes=payload_bytes
        )

    @asynccontextmanager
    async def watch_events(
        self, accept: Callable[[dict[str, Any]], bool] | None = None
    ) -> AsyncIterator[Watcher]:
        """A bounded queue of what the routers of this process and of the other workers do
        with each event from now on, of the events ``accept`` takes (all without it; see
        :mod:`eventbus.router._feed`); raises OverflowError when too many watch."""
        with self.feed.watch(accept) as watcher:
            if self._peer_feed is not None:
                await self._peer_feed.joined()
            yield watcher

    def closing(self) -> None:
        """The HTTP server is shutting down: tell the live streams to end, and stop taking
        events and retries, the deliveries under way given ``router.shutdown_grace`` from
        now. (Begun only once the HTTP server had waited its own grace for its requests, a
        stop took twice the setting: 42 s for the default 20, past Kubernetes' 30 s and the
        parent's deadline under ``--workers N``.)"""
        self.stopping = True
        self.feed.close()
        if self._router is not None:  # started
            self._stop_workers_now()

    def try_rules(self, event: dict[str, Any]) -> tuple[list[Route], dict[str, str]]:
        """What the current rules would do with ``event``, publishing nothing: its routes,
        and why each enabled rule that took no route did not (rule name to reason: the field
        its pattern failed on, or its condition's verdict)."""
        rules = self.rules.current
        failed: dict[str, str] = {}
        routes = rules.route(event, trial=failed)
        routed = {route.rule for route in routes}
        for rule in rules.rules:
            if not rule.enabled or rule.name in routed or rule.name in failed:
                continue
            why = rule.pattern.mismatch(event)
            failed[rule.name] = f"pattern: {why}" if why else "condition: false"
        return routes, failed

    def target_activity(self) -> dict[str, Any]:
        """Each configured target's deliveries under way now (``in_flight``) and its
        deliveries and failures per second and attempt durations over the last five minutes
        (see :meth:`eventbus._rates.Rates.by_target`), with the ``window`` they span; every
        worker's together."""
        families = metrics.families()
        recent = self._rates.by_target(families)
        in_flight = gauge_by_target(families, metrics.DELIVERIES_IN_FLIGHT)
        idle = {"delivered": 0.0, "failed": 0.0, "latency_ms": None, "p95_ms": None}
        return {
            "window": recent["window"],
            "targets": {
                name: {
                    "in_flight": round(in_flight.get(name, 0.0)),
                    **recent["targets"].get(name, idle),
                }
                for name in self.connectors.targets
            },
        }

    def rates(self) -> dict[str, Any]:
        """Events received, routed, matched, delivered, retried and dead-lettered per second
        over the last hour (see :class:`eventbus._rates.Rates`), and the delivery attempts per
        target and outcome since the service started; every worker's together."""
        return {**self._rates.snapshot(), "targets": deliveries_by_target()}


def _fingerprints_besides(shared: Path, fingerprint: str) -> dict[int, str]:
    """The live workers (a beat file each) whose rules' fingerprint is not ``fingerprint``,
    with theirs ("" when it is not known yet)."""
    behind: dict[int, str] = {}
    for beat in (shared / "beats").iterdir():
        if not beat.name.isdigit():
            continue
        try:
            theirs = (shared / FINGERPRINTS / beat.name).read_text()
        except OSError:
            theirs = ""
        if theirs != fingerprint:
            behind[int(beat.name)] = theirs
    return behind


def _behind_note(behind: Mapping[int, str], fingerprint: str) -> str:
    workers = ", ".join(
        f"pid {pid} ({theirs or 'not known'})" for pid, theirs in sorted(behind.items())
    )
    return (
        f"{len(behind)} other worker(s) still route by other rules than {fingerprint} after "
        f"{PEERS_RELOAD_WITHIN:g} s: {workers} (its reload failed or has not ended: see the log)"
    )
