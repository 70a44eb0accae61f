"""The ``kafka`` source: records of Kafka topics become events on the bus (consumer group).

Place in the pipeline: Kafka topic → this consumer group → :func:`_queues.publish_messages` → bus →
offset commit. Offsets are committed by hand and only after every record before them in their
partition is on the bus (or dead-lettered), so committed offsets are always contiguous and a
crash re-reads, never skips. Several eventbus instances with the same ``group_id`` share the
partitions. When the bus or Postgres fails, the consumer stays in its group, rewinds to the
first record not yet on the bus and retries after backoff; broker failures reconnect.
``status.lag`` is the sum over assigned partitions of high watermark minus position; a
position past its partition's end (a topic made again) goes back to the partition's start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pydantic
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError

from eventbus._errors import BusError, StoreError
from eventbus._oauth import kafka_options, start_refusals
from eventbus._tasks import stop_if_cancelled
from eventbus.cloudevents import from_kafka, kafka_key_attribute, kafka_record_time
from eventbus.config import KafkaAuth, KafkaServers, KafkaTopic
from eventbus.sources._base import SourceContext
from eventbus.sources._clock import Backoff
from eventbus.sources._queues import (
    Message,
    QueueSourceSpec,
    Whence,
    consume_forever,
    events_of,
    publish_messages,
)

__all__ = ["KafkaSource", "KafkaSourceSpec"]

log = logging.getLogger("eventbus.sources")


PROBE_EVERY = 10.0  # seconds between checks that a broker answers
PROBE_TIMEOUT = 10.0
_PUBLISHING = 256  # records of a fetched batch published in one call to the bus at most


class KafkaSourceSpec(QueueSourceSpec, KafkaAuth):
    """YAML settings of a ``type: kafka`` source.

    ``group_id`` defaults to ``eventbus-source-<name>``; ``start`` is where a group with no
    committed offset begins. ``security_protocol``, ``sasl_mechanism``, ``username``,
    ``password`` and ``tls`` secure the connection (:class:`eventbus.config.KafkaAuth`).
    """

    bootstrap_servers: KafkaServers
    topics: list[KafkaTopic] = pydantic.Field(min_length=1)
    group_id: str | None = None
    start: str = pydantic.Field("earliest", pattern="^(earliest|latest)$")
    batch: int = pydantic.Field(100, ge=1, le=10_000)
    session_timeout: float = pydantic.Field(10.0, gt=0, le=300)
    """Seconds a silent instance keeps its partitions before they move to another."""


class KafkaSource:
    """Consumes ``topics`` in a consumer group; commits an offset only after publishing."""

    reports_running = True  # once connected and subscribed (see SourceRunner)

    def __init__(self, config: KafkaSourceSpec) -> None:
        """Raises ConfigError when a file of the TLS block cannot be read or the program of
        OAUTHBEARER's token_command is not found."""
        self.name = config.name
        self.type = config.type
        self.config = config
        self._security = kafka_options(config, f"kafka source {config.name!r}")

    async def run(self, ctx: SourceContext) -> None:
        """Consume until cancelled; broker or bus outages back off and reconnect."""
        # OSError: sockets, and credentials the broker refused (start_refusals).
        transient = (KafkaError, OSError)
        await consume_forever(ctx, lambda backoff: self._consume(ctx, backoff), transient)

    async def _consume(self, ctx: SourceContext, backoff: Backoff) -> None:
        consumer = AIOKafkaConsumer(
            *self.config.topics,
            bootstrap_servers=self.config.bootstrap_servers,
            **self._security,
            group_id=self.config.group_id or f"eventbus-source-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset=self.config.start,
            session_timeout_ms=int(self.config.session_timeout * 1000),
            heartbeat_interval_ms=int(self.config.session_timeout * 1000 / 3),
        )
        try:
            async with start_refusals(self.config.bootstrap_servers, self._security):
                await consumer.start()
            ctx.connected()
            backoff.reset()
            heard = time.monotonic()  # records arrived, or a probe was answered
            unreachable = False
            while True:
                stop_if_cancelled()
                if time.monotonic() - heard >= PROBE_EVERY:
                    unreachable = await _probe(ctx, consumer, unreachable)
                    heard = time.monotonic()
                try:
                    batches = await consumer.getmany(timeout_ms=1000, max_records=self.config.batch)
                    if batches:
                        heard = time.monotonic()  # a broker answers: no probe needed
                except (CorruptRecordException, ValueError) as exc:
                    # A record aiokafka cannot read (a header key that is not UTF-8, a bad
                    # checksum) fails every fetch from it: the source restarted on it for ever
                    batches = await self._read_past_unreadable(ctx, consumer, exc)
                done, failure = await self._publish_batch(ctx, batches)
                if failure is not None:
                    # Keep the consumer (rejoining a group is slow): commit the prefix that is
                    # on the bus, rewind to the first record that is not, back off, go again.
                    if done:
                        await consumer.commit(done)
                    if not isinstance(failure, (BusError, StoreError)):
                        raise failure  # the source starts again, from the prefix committed
                    assigned = consumer.assignment()
                    for tp, records in batches.items():
                        if tp in assigned:
                            consumer.seek(tp, done.get(tp, records[0].offset))
                    ctx.report_error(failure)
                    # what waits, the records given back included (it said 0 while backing off)
                    ctx.status.lag = await _lag(consumer)
                    await backoff.wait()
                    continue
                if done:
                    await consumer.commit(done)
                    backoff.reset()
                ctx.status.lag = await _lag(consumer)
        finally:
            await consumer.stop()

    async def _publish_batch(
        self, ctx: SourceContext, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> tuple[dict[TopicPartition, int], BaseException | None]:
        """Publish the records of ``batches``, up to ``_PUBLISHING`` in one call to the bus;
        return, per partition, the offset after its longest run of records from the first that
        are on the bus (or dead-lettered), and the first failure that stopped a run (BusError
        or StoreError, or whatever else the publishing raised), if any. One at a time, each
        record waited for the bus's acknowledgement of the one before it: the ingest took no
        more than one record per round trip; then one call per record cost 90 µs of CPU per
        event against 30-40 for the bus's own batch publish."""
        records = [(tp, record) for tp, partition in batches.items() for record in partition]
        done: dict[TopicPartition, int] = {}
        stopped: set[TopicPartition] = set()
        failure: BaseException | None = None
        for first in range(0, len(records), _PUBLISHING):
            chunk = records[first : first + _PUBLISHING]
            try:
                outcomes = await publish_messages(
                    ctx, [self._message(ctx, record) for _, record in chunk]
                )
            except Exception as exc:  # the prefixes before this chunk are still committed
                outcomes = [exc] * len(chunk)
            for (tp, record), outcome in zip(chunk, outcomes, strict=True):
                if outcome is not None:
                    failure = failure or outcome
                    stopped.add(tp)
                elif tp not in stopped:
                    done[tp] = record.offset + 1
            if failure is not None:  # the rest is read again from the prefixes
                break
        return done, failure

    async def _read_past_unreadable(
        self, ctx: SourceContext, consumer: AIOKafkaConsumer, error: Exception
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """Read each assigned partition one record at a time, up to its share of ``batch``:
        the records that can be read are returned, and one that cannot is dead-lettered (its
        position in ``meta``, no payload: the client could not read it), committed and read
        past when it comes first in its partition (after records not yet on the bus, the
        partition stops there: its offset is committed after them, next time). One record of
        each partition a time, an empty one waiting a second, took a record past per
        partition and second: hours to reach a bad record behind thousands. An empty partition
        (at its high watermark) now waits 0.1 s."""
        log.warning("kafka source %s: a fetch could not read a record (%r)", self.name, error)
        found: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        assigned = consumer.assignment()
        # each partition its share: one busy partition first in the set's order took the
        # whole batch every round, and the one holding the bad record was never reached
        for tp in assigned:
            room = max(1, self.config.batch // len(assigned))
            while room > 0:
                # a partition known to hold more waits for it (the fetch after a failed one
                # may take a while: taken for empty, a walk read a few records at a time);
                # one at its end is left after a short wait
                highwater = consumer.highwater(tp)
                more = highwater is None or await consumer.position(tp) < highwater
                try:
                    got = await consumer.getmany(
                        tp, timeout_ms=1000 if more else 100, max_records=1
                    )
                except (CorruptRecordException, ValueError) as exc:
                    if tp in found:
                        break
                    offset = await consumer.position(tp)
                    meta = {"topic": tp.topic, "partition": tp.partition, "offset": offset}
                    await ctx.dead_letter(b"", f"the record cannot be read: {exc!r}", meta)
                    consumer.seek(tp, offset + 1)
                    await consumer.commit({tp: offset + 1})
                    continue
                if not got:
                    break
                found.setdefault(tp, []).extend(got.get(tp, []))
                room -= 1
        return found

    def _message(self, ctx: SourceContext, record: ConsumerRecord[bytes, bytes]) -> Message:
        value = record.value or b""
        # The record's timestamp too: a topic deleted and made again, or a broker that lost its
        # log, hands the same offsets out again for other records, which took the ids of earlier
        # events (dropped as duplicates by the bus within its window, and later shown as them).
        # A re-read of the same record keeps its id.
        position = f"{record.topic}/{record.partition}/{record.offset}/{record.timestamp}"

        def convert() -> list[dict[str, Any]]:
            return events_of(
                self.config,
                value,
                lambda size: from_kafka(record.headers, record.key, record.value, max_size=size),
                max_size=ctx.max_event_size,
                id=position,
                subject=kafka_key_attribute(record.key),
                time=kafka_record_time(record.timestamp),
            )

        where = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        return Message(value, convert, Whence(where, record.headers, record.key))


async def _probe(ctx: SourceContext, consumer: AIOKafkaConsumer, unreachable: bool) -> bool:
    """Ask the brokers for metadata when no record came for ``PROBE_EVERY`` s: the source
    showed ``running`` for as long as they were down or frozen (aiokafka's fetches reconnect
    by themselves and never raise), while the client logged each failed connection. No
    answer: ``backoff``, with the reason; the consumer is kept, to go on where it was once a
    broker answers. Returns whether the brokers are unreachable; only a probe's own
    ``backoff`` is cleared by a probe (the bus down keeps its own)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await consumer.topics()
    except (KafkaError, OSError, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {PROBE_TIMEOUT:g} s"
        ctx.report_error(ConnectionError(f"no Kafka broker answers a metadata request: {reason}"))
        return True
    if unreachable:
        ctx.recovered()
    return False


async def _lag(consumer: AIOKafkaConsumer) -> int:
    """The records waiting in the assigned partitions. A position past its partition's end, as
    the broker says it now, goes back to the partition's start: its topic was deleted and
    made again, or the broker lost its log, and the records there now were never read. (A
    broker may answer such a fetch with nothing rather than "out of range", which is what
    moves a consumer by itself: the source read nothing more of the partition, or skipped the
    new records below its old position, its lag saying 0.)"""
    total = 0
    past: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        position = await consumer.position(tp)
        if position > highwater:
            past[tp] = position
        else:
            total += highwater - position
    if past:
        ends = await consumer.end_offsets(list(past))  # asked afresh: not a stale fetch's
        for tp, position in past.items():
            end = ends.get(tp)
            if end is None or position <= end:
                continue
            log.warning(
                "kafka source: %s partition %d ends at offset %d, before the position %d it was"
                " read to (the topic made again, or the broker lost its log): reading it again"
                " from its start",
                tp.topic,
                tp.partition,
                end,
                position,
            )
            await consumer.seek_to_beginning(tp)
            total += end
    return total
