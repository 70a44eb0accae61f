"""The Kafka topic target: produces one record per delivery with aiokafka.

Place in the pipeline: last hop of the router, a twin of the HTTP target. ``deliver`` turns a
routed payload into a record (CloudEvents Kafka binding, or a plain JSON/text value carrying the
original event's identity in ``ce_`` headers), waits until every in-sync replica has it
(``acks=all``, idempotent producer) and reports the attempt as an ``Outcome``.

A broker that is down must not stop the service from starting, so the producer is started in the
background when the target opens and again by the first delivery that finds it not running; until
then deliveries fail as retryable outcomes. Only ``_outcome_from_error`` knows aiokafka's
exception types: nothing from aiokafka escapes ``deliver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from types import TracebackType
from typing import Any, Literal, Self

import aiokafka.errors as kerr
import orjson
from aiokafka import AIOKafkaProducer
from jsonpath_ng import JSONPath
from jsonpath_ng.exceptions import JSONPathError
from jsonpath_ng.ext.parser import parse as parse_jsonpath
from pydantic import Field

from eventbus._errors import CloudEventError, ConfigError
from eventbus._oauth import kafka_options, start_refusals
from eventbus.cloudevents import to_kafka
from eventbus.config import Duration, KafkaAuth, KafkaServers, KafkaTopic, TargetSpec
from eventbus.targets._base import Answer, Outcome, failure, send_once, trace_attempt
from eventbus.targets._lazy import LazyClient

__all__ = ["KafkaTarget", "KafkaTargetSpec"]

log = logging.getLogger(__name__)

_IDENTITY = ("specversion", "id", "source", "type")

_NOT_RETRYABLE = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.RecordTooLargeError,
    kerr.InvalidTopicError,
    kerr.TopicAuthorizationFailedError,
    kerr.ClusterAuthorizationFailedError,
    kerr.TransactionalIdAuthorizationFailed,
    kerr.SaslAuthenticationFailed,
    kerr.UnsupportedSaslMechanismError,
    kerr.PolicyViolationError,
    kerr.InvalidRequiredAcksError,
    kerr.UnsupportedVersionError,
    kerr.UnsupportedForMessageFormatError,
)
"""Errors that the same record meets again on every retry until an operator changes something."""


class _IdempotenceRefused(Exception):
    """The broker answered the idempotent producer's start with an unknown error."""


class KafkaTargetSpec(TargetSpec, KafkaAuth):
    """``type: kafka``: one Kafka topic.

    ``key`` is a JSONPath into the original event whose first match becomes the record key (a
    string as its UTF-8 text, any other JSON value as compact JSON, no match or ``null`` gives no
    key); without it the key is the CloudEvents ``partitionkey`` extension, if any. ``mode``
    picks the Kafka binding's content mode for CloudEvent payloads. ``timeout`` bounds one
    attempt in seconds, including starting the producer when it is not running.
    ``idempotent`` False is only for brokers without InitProducerId (the Tansu test broker).
    ``security_protocol``, ``sasl_mechanism``, ``username``, ``password`` and ``tls`` secure the
    connection (:class:`eventbus.config.KafkaAuth`).
    """

    bootstrap_servers: KafkaServers
    topic: KafkaTopic
    key: str | None = None
    mode: Literal["binary", "structured"] = "binary"
    timeout: Duration = Field(10.0, gt=0, le=300)
    idempotent: bool = True


def _outcome_from_error(exc: BaseException, duration_ms: float, config: KafkaTargetSpec) -> Outcome:
    """Translate an aiokafka/socket failure into an ``Outcome``: the only place that knows them."""
    if isinstance(exc, TimeoutError | kerr.KafkaTimeoutError | kerr.RequestTimedOutError):
        return failure(
            f"timeout after {config.timeout:g}s", duration_ms, retryable=True, timed_out=True
        )
    if isinstance(exc, PermissionError):
        return failure(f"Kafka refused the credentials: {exc}", duration_ms, retryable=False)
    if isinstance(exc, kerr.KafkaConnectionError | OSError):
        return failure(
            f"cannot reach Kafka at {config.bootstrap_servers}: {exc}", duration_ms, retryable=True
        )
    if isinstance(exc, kerr.MessageSizeTooLargeError | kerr.RecordListTooLargeError):
        return failure(f"record too large: {exc}", duration_ms, retryable=False)
    if isinstance(exc, kerr.TopicAuthorizationFailedError | kerr.ClusterAuthorizationFailedError):
        return failure(
            f"not authorized to produce to topic {config.topic!r}: {exc}",
            duration_ms,
            retryable=False,
        )
    if isinstance(exc, kerr.UnsupportedSaslMechanismError):
        # as refused credentials: the same until an operator fixes the mechanism
        return failure(
            f"Kafka does not offer the SASL mechanism: {exc}", duration_ms, retryable=False
        )
    if isinstance(exc, kerr.SaslAuthenticationFailed):
        # Fails the same way until an operator fixes the credentials: dead-letter (replayable).
        return failure(f"Kafka refused the credentials: {exc}", duration_ms, retryable=False)
    if isinstance(exc, kerr.UnknownTopicOrPartitionError):
        # The topic may be created later (brokers often disable auto-creation): worth a retry.
        return failure(f"topic {config.topic!r} does not exist", duration_ms, retryable=True)
    if isinstance(exc, _IdempotenceRefused):
        return failure(str(exc), duration_ms, retryable=False)
    if isinstance(exc, kerr.UnknownError | kerr.CorruptRecordException):
        # The broker refused this record and says no more (UNKNOWN_SERVER_ERROR, and the
        # codes aiokafka has no class for, such as INVALID_RECORD), or refused it as corrupt:
        # aiokafka marks both final. Retried, a few such records kept the circuit open for
        # every other event.
        return failure(
            f"the broker refused the record ({type(exc).__name__}: {exc}); its log says why "
            "(a compacted topic needs a key, a schema the record does not match ...)",
            duration_ms,
            retryable=False,
        )
    retryable = not isinstance(exc, _NOT_RETRYABLE)
    return failure(f"{type(exc).__name__}: {exc}", duration_ms, retryable=retryable)


def _key_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    # Sorted keys: equal objects must land on the same partition.
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _find_key(path: JSONPath, event: dict[str, Any], filters: bool) -> bytes | None:
    """The record key ``path`` finds in ``event``; a path with a filter (``filters``) searches
    a copy: jsonpath-ng's filter applied to an object replaces it, in the document it
    searches, by the list of its values (the event other targets deliver)."""
    try:
        found = path.find(copy.deepcopy(event) if filters else event)
    except Exception:
        # jsonpath-ng filters coerce with int() and raise on a null or object value: a path
        # that cannot be followed in this event selects nothing, like a missing field.
        return None
    return _key_bytes(found[0].value) if found else None


class KafkaTarget:
    """Produces events to one Kafka topic; use as ``async with KafkaTarget(config) as target``.

    One producer per target, shared by concurrent deliveries (aiokafka batches them). Ordering
    holds per key and partition, as Kafka defines it; a retried attempt may land after later
    records, and a record whose acknowledgement was lost may be stored twice (consumers can
    deduplicate on the ``ce_id`` header).
    """

    def __init__(self, config: KafkaTargetSpec) -> None:
        """Raises ``ConfigError`` if the key path is invalid, a file of the TLS block cannot
        be read or the program of OAUTHBEARER's token_command is not found."""
        where = f"Kafka target {config.name!r}"
        self._key_path: JSONPath | None = None
        # jsonpath-ng's filter is "?" and its expressions, parentheses optional: see _find_key
        self._key_filters = "?" in (config.key or "")
        if config.key is not None:
            if not config.key.startswith("$"):
                raise ConfigError(
                    f"{where}: key must be a JSONPath starting at '$': {config.key!r}"
                )
            try:
                self._key_path = parse_jsonpath(config.key)
            except (JSONPathError, ValueError, TypeError, AttributeError) as exc:
                # jsonpath-ng's parser reports some malformed input as plain Python errors.
                raise ConfigError(f"{where}: invalid key JSONPath {config.key!r}: {exc}") from exc
        self.name = config.name
        self.config = config
        self._servers = ",".join(s.strip() for s in config.bootstrap_servers.split(","))
        self._security = kafka_options(config, where, config.timeout)
        self._structured = config.mode == "structured"
        self._producer = LazyClient(
            self._start,
            owner=f"Kafka target {self.name!r}",
            usable=lambda _: True,
            log=log,
            failed=f"Kafka target {self.name}: cannot start the producer",
            task_name=f"kafka-target-start-{self.name}",
        )

    async def __aenter__(self) -> Self:
        """Begin starting the producer in the background and return at once.

        A broker that cannot be reached is logged, not raised: deliveries retry the start and
        fail as retryable outcomes meanwhile. Raises ``RuntimeError`` if already open.
        """
        self._producer.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop a pending start, then flush and stop the producer (errors are logged)."""
        producer = await self._producer.close()
        if producer is not None:
            try:
                await producer.stop()
            except (kerr.KafkaError, OSError) as exc:
                log.warning("Kafka target %s: stopping the producer failed: %r", self.name, exc)

    async def _start(self) -> AIOKafkaProducer:
        """A started producer. Raises ``_IdempotenceRefused`` for a broker that answers the
        idempotent producer's InitProducerId with an unknown error (every attempt failed
        "UnknownError", retried for a day)."""
        try:
            return await self._start_producer()
        except kerr.UnknownError as exc:
            if not self.config.idempotent:
                raise
            raise _IdempotenceRefused(
                f"the broker refused to start an idempotent producer ({exc!r}): a broker "
                "without InitProducerId needs the target's idempotent: false"
            ) from exc

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._servers,
            **self._security,
            acks="all",
            enable_idempotence=self.config.idempotent,
            request_timeout_ms=int(self.config.timeout * 1000),
        )
        try:
            async with start_refusals(self._servers, self._security, within=self.config.timeout):
                await producer.start()
        except BaseException:
            with contextlib.suppress(kerr.KafkaError, OSError):
                await producer.stop()
            raise
        return producer

    def _record(
        self, event: dict[str, Any], payload: Any, is_cloudevent: bool
    ) -> tuple[bytes | None, list[tuple[str, bytes]], bytes]:
        if is_cloudevent:
            key, headers, value = to_kafka(payload, structured=self._structured)
        else:
            # A transform's output is not a CloudEvent, but the consumer still gets the original
            # event's identity so it can deduplicate redeliveries.
            _, headers, _ = to_kafka({name: event[name] for name in _IDENTITY})
            key = _key_bytes(event.get("partitionkey"))
            if isinstance(payload, str):
                value = payload.encode()
                headers.append(("content-type", b"text/plain; charset=utf-8"))
            else:
                value = orjson.dumps(payload)
                headers.append(("content-type", b"application/json"))
        if self._key_path is not None:
            key = _find_key(self._key_path, event, self._key_filters)
        return key, headers, value

    async def deliver(
        self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool, attempt: int
    ) -> Outcome:
        """Produce ``payload`` to the topic once and wait for all in-sync replicas.

        Never raises for a delivery failure (those are ``Outcome`` values, ``status`` None);
        raises ``RuntimeError`` if called outside ``async with``.
        """
        outcome, _ = await self._produce(event, payload, is_cloudevent, attempt)
        return outcome

    async def invoke(self, event: dict[str, Any], payload: Any, *, is_cloudevent: bool) -> Answer:
        """Produce once, as ``deliver`` does; a delivered answer is the acknowledgement as
        JSON: ``{"topic", "partition", "offset"}``."""
        outcome, ack = await self._produce(event, payload, is_cloudevent, 1)
        if not outcome.delivered:
            return Answer(outcome)
        return Answer(outcome, "application/json", orjson.dumps(ack))

    async def _produce(
        self, event: dict[str, Any], payload: Any, is_cloudevent: bool, attempt: int
    ) -> tuple[Outcome, dict[str, Any]]:
        self._producer.check_open()
        try:
            key, headers, value = self._record(event, payload, is_cloudevent)
        except (CloudEventError, orjson.JSONEncodeError, KeyError) as exc:
            # The payload itself is unsendable: no retry can fix it.
            return failure(f"cannot build the record: {exc}", 0.0, retryable=False), {}
        ack: dict[str, Any] = {}

        async def send() -> None:
            # One timeout for the producer's start and the send: the start's own, which asks
            # why TLS failed once it runs out (this one, running out first, said "timeout after
            # 10s" for a port without TLS), then what is left of it.
            ends = asyncio.get_running_loop().time() + self.config.timeout
            producer = await self._producer.get()
            async with asyncio.timeout_at(ends):
                sent = await producer.send(self.config.topic, value, key=key, headers=headers)
                stored = await sent
            ack.update(topic=stored.topic, partition=stored.partition, offset=stored.offset)

        outcome = await send_once(
            send,
            errors=(kerr.KafkaError, OSError, TimeoutError, _IdempotenceRefused),
            outcome_from_error=lambda exc, ms: _outcome_from_error(exc, ms, self.config),
        )
        trace_attempt(log, self.name, event.get("id"), attempt, outcome)
        return outcome, ack
