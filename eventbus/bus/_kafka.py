"""The Kafka bus: the alternative durable log between ingest and the router.

Layout: one topic; each record's value is the event's structured CloudEvents JSON with the
Kafka binding header ``content-type: application/cloudevents+json``, and its key is the event's
source+id, so one event always lands on the same partition. The producer waits for ``acks=all``
(idempotent unless disabled). Routers share one consumer group and split the partitions.

Kafka only remembers one offset per partition, but routers ack out of order. So each partition
tracks the offsets handed out and acked, and only the lowest un-acked offset is committed
(periodically, on rebalance and on close): everything at or after it is redelivered to whoever
owns the partition next. A rebalance that takes a partition away first lets the messages being
handled finish (``revoke_wait``), so a worker joining or leaving the group costs no duplicates.
A nak keeps the message un-acked and hands it out again locally after the delay; if the
partition moves meanwhile, the new owner redelivers it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import aiokafka.errors as kerr
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventbus._errors import (
    BusError,
    BusUnavailable,
    ConfigError,
    EventTooLargeForBus,
    FailureRun,
)
from eventbus._oauth import kafka_options, start_refusals
from eventbus._tasks import cancel_and_wait, stop_if_cancelled, wait_event
from eventbus.bus._base import (
    DIRECT,
    PUBLISHES_STALL_AFTER,
    STALL_AFTER,
    Behind,
    BusMessage,
    DecodedMessage,
    InFlightWindow,
    PublishOutcome,
    bus_message_limit,
    collect_acks,
    note_publishes,
    publishes_failing,
    require_positive,
    wire_encode,
)
from eventbus.cloudevents import DEFAULT_MAX_EVENT_SIZE, kafka_record_time
from eventbus.config import KafkaAuth

__all__ = ["KafkaBus", "KafkaBusConfig"]

log = logging.getLogger("eventbus.bus")

_CONTENT_TYPE = ("content-type", b"application/cloudevents+json")
_VIA = "eventbus-via"
_SCOPE = "eventbus-scope"  # a publish's scope (an invocation's target): copies are told by it


def _via_and_scope(headers: Sequence[tuple[str, bytes | None]]) -> tuple[str, bytes | None]:
    """A record's ``eventbus-via`` (text) and ``eventbus-scope``, the first of each, in one
    pass over its headers; a header without a value is as if absent."""
    via: str | None = None
    scope: bytes | None = None
    for name, value in headers:
        if value is None:
            continue
        if name == _VIA and via is None:
            via = value.decode("utf-8", "replace")
        elif name == _SCOPE and scope is None:
            scope = value
    return DIRECT if via is None else via, scope


def _retry_later(exc: kerr.KafkaError, doing: str) -> None:
    """Log a failed fetch or poll to be tried again; raise ``exc`` when trying again cannot
    help (not authorised, a failed group task): the router then makes a new consumer."""
    if not exc.retriable:
        raise exc
    log.warning("Kafka %s failed: %r; retrying", doing, exc)


def bus_partition(key: bytes | None, partitions: list[int], available: list[int]) -> int:
    """The partition of a bus record, from its key (the event's source+id): the same key, the
    same partition, as long as the topic's partition count stays.

    CRC-32 rather than aiokafka's default murmur2, which is pure Python: 12 µs of every publish
    (4 % of a worker's CPU per event). Nothing outside eventbus picks these partitions, so
    agreeing with the Java client's placement buys nothing; the Kafka target keeps the default
    for the users' topics.
    """
    if key is None:
        return random.choice(available or partitions)
    return partitions[zlib.crc32(key) % len(partitions)]


@dataclass(frozen=True, slots=True)
class KafkaBusConfig:
    """Where the Kafka bus lives and how it delivers.

    ``partitions`` and ``replication_factor`` apply when the bus creates the topic (an existing
    topic is used as is); ``partitions`` caps how many processes can share the work. It has no
    default here: its one default is the setting ``bus.kafka.partitions``.
    ``max_in_flight`` bounds un-settled messages per :meth:`KafkaBus.messages` iterator.
    ``idempotent`` False is only for brokers without InitProducerId (the Tansu test broker).
    ``session_timeout`` is how long a silent member keeps its partitions (a killed process's
    work moves after it; Tansu also delays each group join by about half of it);
    ``poll_timeout`` is how long one poll of the consumer waits for a batch, ``fetch_wait`` how
    long one fetch request waits on the broker for new events (``fetch_max_wait_ms``);
    ``commit_interval`` how often done offsets are committed (seconds); ``revoke_wait`` how
    long a rebalance that takes partitions away waits for their messages being handled.
    ``auth`` is the security protocol, SASL credentials and TLS block of every client the bus
    opens. ``max_event_size`` sizes the producer's requests, the topic's
    ``max.message.bytes`` (when the bus creates it) and the consumer's fetches so that any
    valid event fits (:func:`bus_message_limit`).
    """

    bootstrap_servers: str
    topic: str = "eventbus.events"
    group_id: str = "eventbus-router"
    partitions: int = field(kw_only=True)
    replication_factor: int = 1
    max_in_flight: int = 1000
    idempotent: bool = True
    linger_ms: int = 0
    session_timeout: float = 10.0
    commit_interval: float = 1.0
    revoke_wait: float = 5.0
    poll_timeout: float = 0.5
    fetch_wait: float = 0.5
    publish_timeout: float = 5.0
    connect_timeout: float = 5.0
    auth: KafkaAuth | None = None
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE

    def __post_init__(self) -> None:
        """Raises ConfigError when no server is given or a count or duration is not positive."""
        if not self.bootstrap_servers:
            raise ConfigError("KafkaBusConfig.bootstrap_servers must name host:port, got nothing")
        require_positive(
            self,
            "partitions",
            "replication_factor",
            "max_in_flight",
            "session_timeout",
            "commit_interval",
            "revoke_wait",
            "poll_timeout",
            "fetch_wait",
            "publish_timeout",
            "connect_timeout",
        )


_UNAVAILABLE = (
    TimeoutError,
    OSError,
    kerr.KafkaConnectionError,
    kerr.KafkaTimeoutError,
    kerr.RequestTimedOutError,
    kerr.NodeNotReadyError,
    kerr.NotLeaderForPartitionError,
    kerr.LeaderNotAvailableError,
    kerr.UnknownTopicOrPartitionError,
    kerr.NotEnoughReplicasError,
    kerr.NotEnoughReplicasAfterAppendError,
    kerr.CoordinatorNotAvailableError,
    kerr.ProducerClosed,
    # The broker could not say what went wrong: worth another try, not a refusal (answered
    # 422, a publisher following the docs dropped the event).
    kerr.UnknownError,
)

# Offset commits failing this long turn readiness red: every record read since the last
# commit is read again by the partition's next owner.
COMMITS_STALL_AFTER = 30.0


def _translate(exc: BaseException, doing: str) -> BusError:
    """Map an aiokafka error to BusUnavailable (try again later: a connection error, or one the
    library marks retriable) or BusError (will not help)."""
    if isinstance(exc, kerr.MessageSizeTooLargeError | kerr.RecordListTooLargeError):
        return EventTooLargeForBus(
            f"Kafka {doing} failed: the event is larger than the producer's or the topic's "
            f"message limit (max_request_size, max.message.bytes): {exc!r}"
        )
    retriable = isinstance(exc, kerr.KafkaError) and exc.retriable
    kind = BusUnavailable if retriable or isinstance(exc, _UNAVAILABLE) else BusError
    return kind(f"Kafka {doing} failed: {exc!r}")


def resume_point(
    committed: int | None, log_start: int | None
) -> tuple[int | None, tuple[int, int] | None]:
    """Where a group resumes reading a partition, from its committed offset and the first
    offset the partition still holds (either unknown: None): the commit, or the log's start
    when nothing was committed or retention deleted past the commit; and then the offsets
    deleted unread (first, last), else None."""
    if committed is None or committed < 0:
        return log_start, None
    if log_start is None or committed >= log_start:
        return committed, None
    return log_start, (committed, log_start - 1)


MAX_REREADS = 5
GAP_PATIENCE = 2.0
"""One gap in a partition's offsets is read again at least MAX_REREADS times and for at least
GAP_PATIENCE seconds (a batch not readable yet is a matter of time) before it is taken as it
is."""


class _Partition:
    """Offsets of one assigned partition: handed out, acked, and committed so far, and the gap
    being read again (see :meth:`read_again`)."""

    __slots__ = (
        "acked",
        "committed",
        "gap_at",
        "gap_since",
        "handling",
        "last_time",
        "next_offset",
        "pending",
        "rereads",
    )

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.acked: set[int] = set()
        self.next_offset: int | None = None  # the offset expected next; None: not known yet
        self.committed = -1
        self.handling = 0  # messages handed out and not settled yet
        self.gap_at: int | None = None
        self.gap_since = 0.0
        self.rereads = 0
        # The time (ms) of the last record handed out: where a log that went back (truncated,
        # or made again) is read again from (see ``_find_logs_gone_back``).
        self.last_time: int | None = None

    def gap_before(self, offset: int) -> int:
        """How many offsets right before ``offset`` were expected and not handed out (0 when
        none, or when nothing is expected yet)."""
        return 0 if self.next_offset is None else max(0, offset - self.next_offset)

    def read_again(self, now: float) -> bool:
        """A record came after a gap at ``next_offset`` (``now`` on a monotonic clock): True
        while the partition should be read again from there (see GAP_PATIENCE), False when the
        gap is to be taken as it is."""
        if self.gap_at != self.next_offset:
            self.gap_at, self.gap_since, self.rereads = self.next_offset, now, 0
        self.rereads += 1
        return self.rereads <= MAX_REREADS or now - self.gap_since < GAP_PATIENCE

    def fetched(self, offset: int, at: int | None = None) -> None:
        """Record ``offset`` (of time ``at``, ms) as handed out."""
        self.pending.append(offset)
        self.next_offset = offset + 1
        if at is not None and at >= 0:
            self.last_time = at

    def commit_point(self) -> int | None:
        """The offset to commit: the lowest un-acked one, or the next to fetch if all are done."""
        while self.pending and self.pending[0] in self.acked:
            self.acked.discard(self.pending.popleft())
        return self.pending[0] if self.pending else self.next_offset


DUPLICATE_WINDOW = 120.0
"""Seconds a consumer remembers the source+id of each record it handed out (JetStream's
default duplicate window)."""
DUPLICATES_KEPT = 100_000
"""Keys remembered at most (about 10 MB): beyond, the oldest go first."""


class _Recent:
    """The source+id keys (the records' Kafka keys) handed out within ``DUPLICATE_WINDOW``,
    each with the record it came in: another record of one of them is a copy.

    Kafka keeps every publish, and a publish that timed out may still be stored: the ingest
    and the sources, which retry until the bus takes their records, stored a copy per retry
    through a broker outage (a review counted 271 extra deliveries for 678 records in a 15 s
    outage). JetStream drops them on publish, by ``Nats-Msg-Id``; here the consumer does. The
    same record handed out again (a nak, a rebalance) is no copy."""

    def __init__(self, window: float = DUPLICATE_WINDOW, kept: int = DUPLICATES_KEPT) -> None:
        self._window = window
        self._kept = kept
        # oldest first; an OrderedDict: a dict's first key, found by iterating, is found past
        # every one deleted before it, and evicting from the front cost 59 µs a record at
        # 100,000 keys (0.8 before the cap was reached)
        self._seen: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def copy(self, key: bytes | None, ref: str, now: float) -> bool:
        """Whether the record ``ref`` of ``key`` copies another handed out lately; if not,
        it is remembered."""
        if key is None:
            return False
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if now - seen[oldest][1] <= self._window and len(seen) < self._kept:
                break
            seen.popitem(last=False)
        first = seen.get(key)
        if first is None:
            seen[key] = (ref, now)
            return False
        return first[0] != ref


class _KafkaMessage(DecodedMessage):
    __slots__ = ("_consumption", "_offset", "_part", "_settled", "_tp", "key")

    def __init__(
        self,
        record: ConsumerRecord[Any, Any],
        consumption: _Consumption,
        tp: TopicPartition,
        part: _Partition,
    ) -> None:
        via, scope = _via_and_scope(record.headers)
        super().__init__(
            record.value or b"",
            via=via,
            # the time it was read when the record's timestamp is no date
            published_at=kafka_record_time(record.timestamp) or datetime.now(UTC),
            # The offset names the record; its timestamp tells apart an offset reused by a
            # topic that was deleted and made again.
            ref=f"kafka:{tp.topic}:{tp.partition}:{record.offset}:{record.timestamp}",
            deliveries=1,
        )
        self._consumption = consumption
        self._tp = tp
        self._part = part
        self._offset: int = record.offset
        self._settled = False
        key = record.key
        # (a record without a key, written by someone else, is never taken for a copy)
        self.key: bytes | None = key if scope is None or key is None else key + b"/" + scope
        """The event's source+id key, as it was published, with its scope if any."""

    async def ack(self) -> None:
        """Mark done; committed with the next contiguous run. Later calls do nothing."""
        if not self._settled:
            self._settled = True
            self._consumption.ack(self)

    async def in_progress(self) -> None:
        """Nothing to do: a partition stays with this consumer while it keeps polling, however
        long one message takes (its commit point simply waits)."""

    async def nak(self, delay: float | None = None) -> None:
        """Hand it out again after ``delay`` s (at once if None). Later calls do nothing."""
        if not self._settled:
            self._settled = True
            self._consumption.nak(self, delay)


class _Consumption(ConsumerRebalanceListener):  # type: ignore[misc]
    """One group member: its consumer, partition offsets, in-flight window and nak'd messages."""

    def __init__(self, config: KafkaBusConfig, security: dict[str, Any]) -> None:
        self.config = config
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            **security,
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(config.session_timeout * 1000),
            heartbeat_interval_ms=int(config.session_timeout * 1000 / 3),
            fetch_max_wait_ms=max(1, int(config.fetch_wait * 1000)),
            # one record the size of the largest event fits a partition's fetch
            max_partition_fetch_bytes=bus_message_limit(config.max_event_size),
        )
        self.consumer.subscribe([config.topic], listener=self)
        self.window = InFlightWindow(config.max_in_flight)
        self.partitions: dict[TopicPartition, _Partition] = {}
        self.ready: deque[_KafkaMessage] = deque()
        self.timers: set[asyncio.TimerHandle] = set()
        # records that could not be read, by partition and offset: why
        self.unreadable: dict[tuple[TopicPartition, int], str] = {}
        self.closed = False
        self.settled = asyncio.Event()  # set by each ack and nak, for a revocation waiting
        self._committer: asyncio.Task[None] | None = None
        self._joining: asyncio.Task[None] | None = None
        self.commits = FailureRun()  # offset commits failing in a row
        self.behind = Behind()  # when the last record came (what waits is read when asked)
        # since when the member has been joining the group (from its start, and from each
        # revocation), None once partitions (or none, past the partition count) are assigned
        self.joining_since: float | None = time.monotonic()

    async def join(self) -> None:
        """Start the consumer, which joins the group (no deadline: a join legitimately waits
        for the other members to rejoin). The consumer is a group member from the join's first
        request on, so :meth:`close` ends a join in progress before it stops the consumer,
        whoever calls it: otherwise the join would go on after the stop, and the member's
        heartbeats would hold partitions that nobody reads. Raises BusError when the bus
        closed meanwhile."""
        self._joining = asyncio.create_task(self.consumer.start(), name="eventbus-kafka-join")
        try:
            await self._joining
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise BusError("the Kafka bus closed while its consumer was joining") from None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the messages being handled finish (up to revoke_wait), commit what is done and
        # forget the rest: the next owner redelivers it. Without the wait, every rebalance (a
        # worker joining or leaving) would deliver each message in flight a second time.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.revoke_wait
        while any(p.handling for tp, p in self.partitions.items() if tp in revoked):
            left = deadline - loop.time()
            if left <= 0:
                break
            self.settled.clear()
            await wait_event(self.settled, left)
        points = {
            tp.partition: self.partitions[tp].commit_point()
            for tp in revoked
            if tp in self.partitions
        }
        await self.commit(revoked)
        for tp in revoked:
            self.partitions.pop(tp, None)
        if self.unreadable:  # the next owner reads those records again and finds out itself
            self.unreadable = {k: v for k, v in self.unreadable.items() if k[0] not in revoked}
        # joining from here (not while the messages being handled finished: a long
        # revoke_wait made every ordinary rebalance a stall)
        self.joining_since = time.monotonic()
        if revoked:
            log.info(
                "Kafka rebalance: partitions %s of %s revoked; redelivery from %s",
                sorted(tp.partition for tp in revoked),
                self.config.topic,
                points,
            )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.joining_since = None
        for tp in assigned:
            self.partitions[tp] = _Partition()
        log.info(
            "Kafka rebalance: partitions %s of %s assigned",
            sorted(tp.partition for tp in assigned),
            self.config.topic,
        )

    def current(self, msg: _KafkaMessage) -> bool:
        return self.partitions.get(msg._tp) is msg._part

    def ack(self, msg: _KafkaMessage) -> None:
        self.window.release()
        msg._part.handling -= 1
        self.settled.set()
        if self.current(msg):
            msg._part.acked.add(msg._offset)

    def nak(self, msg: _KafkaMessage, delay: float | None) -> None:
        msg._part.handling -= 1
        self.settled.set()
        if self.closed or not self.current(msg):
            self.window.release()
            return
        if not delay:
            self._requeue(msg)
            return

        def fire() -> None:
            self.timers.discard(handle)
            self._requeue(msg)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self.timers.add(handle)

    def _requeue(self, msg: _KafkaMessage) -> None:
        self.ready.append(msg)
        self.window.poke()

    async def _commit_periodically(self) -> None:
        # Beside the fetch loop, not in it: a commit's round trip must not hold up fetching
        # (every event behind it would wait as long: the p99 latency).
        while True:
            await asyncio.sleep(self.config.commit_interval)
            await self.commit()

    async def commit(self, tps: set[TopicPartition] | None = None) -> None:
        # Not serialised: a rebalance's commit must not wait behind a periodic one that may
        # itself wait for the rebalance. Two at once at worst move the broker's offset back a
        # little (redelivery), never past an un-acked message.
        offsets: dict[TopicPartition, int] = {}
        parts: list[tuple[_Partition, int]] = []
        for tp, part in self.partitions.items():
            if tps is not None and tp not in tps:
                continue
            point = part.commit_point()
            if point is not None and point > part.committed:
                offsets[tp] = point
                parts.append((part, point))
        if not offsets:  # all committed there is: nothing would be read again
            self.commits.ended()
            return
        try:
            # Bounded: aiokafka retries until it finds a coordinator, and a close or a
            # rebalance must not wait for a broker that is down.
            async with asyncio.timeout(self.config.connect_timeout):
                await self.consumer.commit(offsets)
        except (kerr.KafkaError, OSError, TimeoutError) as exc:
            # Not fatal: the offsets are committed next round, or the next owner redelivers.
            log.warning("Kafka commit of %s failed: %r", offsets, exc)
            self.commits.failed(exc)
            return
        self.commits.ended()
        for part, point in parts:
            part.committed = max(part.committed, point)

    async def run(self) -> AsyncIterator[_KafkaMessage]:
        cfg = self.config
        if self._committer is None:
            self._committer = asyncio.create_task(
                self._commit_periodically(), name="eventbus-kafka-commit"
            )
        while not self.closed:
            stop_if_cancelled()
            if self.ready:
                msg = self.ready.popleft()
                if not self.current(msg):
                    self.window.release()
                    continue
                msg.deliveries += 1
                msg._settled = False
                msg._part.handling += 1
                self.behind.received(0)
                yield msg
                continue
            if self.window.free == 0:
                await self.window.wait(cfg.poll_timeout)
                if self.window.free == 0 and not await self._poll_paused():
                    return
                continue
            try:
                batches = await self.consumer.getmany(
                    timeout_ms=int(cfg.poll_timeout * 1000), max_records=self.window.free
                )
            except kerr.ConsumerStoppedError:
                return
            except (kerr.CorruptRecordException, ValueError) as exc:
                # A record aiokafka cannot read (a header name that is not UTF-8, a checksum
                # that does not match): every fetch from it fails, and every new consumer's.
                batches = await self._read_past_unreadable(exc)
            except kerr.KafkaError as exc:
                _retry_later(exc, "fetch")
                await asyncio.sleep(cfg.poll_timeout)
                continue
            await self._find_logs_gone_back(batches)
            # The partition state each batch was fetched under, taken before any await: a
            # rebalance meanwhile may give a partition back to this consumer as a new state,
            # under which these records (fetched under the old one) must not be handed out.
            parts = {tp: self.partitions.get(tp) for tp in batches}
            for tp, records in batches.items():
                part = parts[tp]
                if part is not None and part.next_offset is None and records:
                    # The first records since the partition was assigned: expect them from
                    # where the group's reading resumed, so a gap right there is seen too.
                    start = await self._resumed_at(tp)
                    if start is None:
                        # Not known (no answer in time): read them again, rather than take
                        # whatever gap may lie before them.
                        log.warning(
                            "Kafka %s partition %d: no answer where the group resumes "
                            "reading; fetching from offset %d again",
                            tp.topic,
                            tp.partition,
                            records[0].offset,
                        )
                        self._seek(tp, part, records[0].offset)
                        await asyncio.sleep(cfg.poll_timeout)
                        continue
                    if part.next_offset is None:
                        part.next_offset = min(start, records[0].offset)
                for record in records:
                    # Re-checked per record: between yields the consumer may close, or lose tp
                    # (and maybe get it back, re-reading from the commit: these are stale).
                    if part is None or self.closed or self.partitions.get(tp) is not part:
                        break
                    expected = part.next_offset
                    if expected is not None and record.offset < expected:
                        # never sought below what it reached: the log went back under it
                        part = parts[tp] = self._log_went_back(tp, record.offset, expected)
                    if part.gap_before(record.offset):
                        taken = await self._gap_taken(tp, part, record.offset)
                        # and the partition may have moved during the broker's answers
                        if not taken or self.closed or self.partitions.get(tp) is not part:
                            break
                    part.fetched(record.offset, record.timestamp)
                    part.handling += 1
                    self.window.take()
                    msg = _KafkaMessage(record, self, tp, part)
                    if self.unreadable and (why := self.unreadable.pop((tp, record.offset), None)):
                        msg.event, msg.rejected = {}, why
                    self.behind.received(0)
                    yield msg

    def stalled(self, after: float) -> str | None:
        """Why this member makes no progress though its broker answers: its join of the group
        has not ended for ``after`` s (no assignment: a coordinator that kept a departed leader
        left every member rejoining for ever, readiness green), or records wait past the
        offsets it has reached (the partitions' high watermarks, as the last fetches gave
        them), it has room, and none has come for ``after`` s."""
        since = self.joining_since
        if since is not None and time.monotonic() - since >= after:
            return (
                f"the Kafka consumer group {self.config.group_id!r} has been rebalancing for "
                f"{time.monotonic() - since:.0f} s: no partitions assigned to this member"
            )
        waiting = 0
        for tp, part in list(self.partitions.items()):
            try:
                high = self.consumer.highwater(tp)
            except (AssertionError, kerr.IllegalStateError):  # not assigned (a rebalance)
                continue
            if high is not None and part.next_offset is not None:
                waiting += max(0, high - part.next_offset)
        self.behind.waiting = waiting
        return self.behind.stalled(self.window, after)

    async def _gap_taken(self, tp: TopicPartition, part: _Partition, offset: int) -> bool:
        """A record at ``offset`` comes after offsets that were never handed out. Not expected
        on eventbus's own topic (no compaction, no transaction markers), but a broker may
        answer a fetch with a later batch while an earlier one is not readable yet (Tansu
        does, with several producers appending to one partition). So read the partition again
        from the gap for a while; returns False when it does (drop the rest of this batch),
        True when the gap is taken as it is: the events there are not routed, or were deleted
        by retention before they could be."""
        first = part.next_offset
        assert first is not None
        loop = asyncio.get_running_loop()
        log_start = await self._log_start(tp)
        if log_start is not None and log_start > first:
            log.warning(
                "Kafka %s partition %d: offsets %d-%d were deleted (retention) before they "
                "were handed out; the events there are not routed",
                tp.topic,
                tp.partition,
                first,
                log_start - 1,
            )
            part.next_offset = log_start
            return part.gap_before(offset) == 0 or await self._gap_taken(tp, part, offset)
        if part.read_again(loop.time()):
            log.info(
                "Kafka %s partition %d: the broker answered with offset %d where %d was next; "
                "reading again from %d",
                tp.topic,
                tp.partition,
                offset,
                first,
                first,
            )
            if part.rereads > 1:  # not a hot loop of fetches while the broker catches up
                await asyncio.sleep(min(0.02 * part.rereads, 0.2))
            self._seek(tp, part, first)
            return False
        log.warning(
            "Kafka %s partition %d: offsets %d-%d were never handed out by the broker (read "
            "%d times in %.1f s); the events there are not routed",
            tp.topic,
            tp.partition,
            first,
            offset - 1,
            part.rereads,
            loop.time() - part.gap_since,
        )
        return True

    async def _read_past_unreadable(
        self, error: Exception
    ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        """After a fetch failed on a record it could not read: read each partition one record
        at a time, up to that record, which is handed out as an empty record, rejected with
        the reason (the router sets it aside), and read past. Records before it come as usual."""
        log.warning("Kafka fetch could not read a record (%r); looking for it", error)
        found: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        for tp in self.consumer.assignment():
            part = self.partitions.get(tp)
            try:
                got = await self.consumer.getmany(
                    tp, timeout_ms=int(self.config.poll_timeout * 1000), max_records=1
                )
            except (kerr.CorruptRecordException, ValueError) as exc:
                if part is None or self.closed:
                    continue
                try:
                    offset = await self.consumer.position(tp)
                except kerr.KafkaError:  # no longer assigned: its next owner looks again
                    continue
                log.warning(
                    "Kafka %s partition %d: offset %d cannot be read (%r); set aside",
                    tp.topic,
                    tp.partition,
                    offset,
                    exc,
                )
                self.unreadable[(tp, offset)] = f"unreadable Kafka record: {exc!r}"
                found[tp] = [
                    ConsumerRecord(tp.topic, tp.partition, offset, -1, 0, None, b"", None, 0, 0, [])
                ]
                self._seek(tp, part, offset + 1)
            except kerr.KafkaError:
                continue  # this partition's fetch failed otherwise: the next round says
            else:
                found.update(got)
        return found

    async def _find_logs_gone_back(self, fetched: Mapping[TopicPartition, object]) -> None:
        """After a fetch, for the partitions it found nothing in: does one's log now end
        before the offset this consumer reached (the topic deleted and made again, its offsets
        counted from 0)? A broker answers a fetch past the end with an error (the client then
        reads from the start, see ``_log_went_back``), or, as Tansu does, with nothing: the
        consumer waited there for ever, the new log's events never routed, readiness green
        (no record waits past its position). Then it is read again (``_read_again_from``). A
        log that grew past that offset before this consumer fetched again is not told from the
        old one."""
        for tp, part in list(self.partitions.items()):
            if tp in fetched:
                continue
            try:
                high = self.consumer.highwater(tp)
            except (AssertionError, kerr.IllegalStateError):  # not assigned (a rebalance)
                continue
            reached = part.next_offset
            if high is None or reached is None or high >= reached:
                continue
            # asked afresh (not a fetch's word), as a re-read of the log depends on it
            end = await self._log_end(tp)
            if end is None or end >= reached:
                continue  # asked again after the next fetch
            start = await self._read_again_from(tp, part.last_time, end)
            if start is not None and not self.closed and self.partitions.get(tp) is part:
                self._seek(tp, self._log_went_back(tp, start, reached), start)

    async def _read_again_from(self, tp: TopicPartition, last: int | None, end: int) -> int | None:
        """Where to read a log that went back: from its first record as new as the last one
        handed out (a topic made again: its start; a log cut short by a broker: about where
        this consumer was, not its whole retention again), else from its end (no record is);
        from its start when the broker cannot say by time. None: no answer in time."""
        if last is not None:
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    found = (await self.consumer.offsets_for_times({tp: last})).get(tp)
            except (kerr.KafkaError, OSError, TimeoutError, ValueError):
                found = None
            else:
                return end if found is None else int(found.offset)
        return await self._log_start(tp)

    def _log_went_back(self, tp: TopicPartition, offset: int, expected: int) -> _Partition:
        """The broker hands out ``offset`` of ``tp``, below the ``expected`` one, without this
        consumer having sought there: the partition's log is another (the topic deleted and
        made again by a publish, or a broker that lost it), its offsets counted from the start
        again. Every record there was dropped as handed out already, accepted events never
        routed, with readiness green. It is read as a new log from here (the offsets of the
        old one in flight are settled apart and never committed on it)."""
        log.warning(
            "Kafka %s partition %d: its log goes on at offset %d, below offset %d this consumer "
            "reached: the topic was made again (or its log lost); reading it from there",
            tp.topic,
            tp.partition,
            offset,
            expected,
        )
        fresh = _Partition()
        fresh.next_offset = offset
        self.partitions[tp] = fresh
        return fresh

    def _seek(self, tp: TopicPartition, part: _Partition, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` next, if it is still ``part``'s."""
        if self.partitions.get(tp) is part and not self.closed:
            # IllegalStateError: the partition is being reassigned; its commit point is at or
            # below ``offset``, so its next owner reads from there.
            with contextlib.suppress(kerr.IllegalStateError):
                self.consumer.seek(tp, offset)

    async def _poll_paused(self) -> bool:
        """One poll that fetches nothing (every partition paused for it), while the in-flight
        window stays full: aiokafka takes a member that has not polled for
        ``max_poll_interval_ms`` (300 s) as gone and leaves the group, which would hand the
        events still being handled (slow functions, a database outage) to another member, or
        to this one again. False when the consumer has stopped."""
        assigned = self.consumer.assignment()
        self.consumer.pause(*assigned)
        try:
            await self.consumer.getmany(timeout_ms=0)
        except kerr.ConsumerStoppedError:
            return False
        except kerr.KafkaError as exc:
            _retry_later(exc, "poll")
        finally:
            self.consumer.resume(*(tp for tp in assigned if tp in self.consumer.assignment()))
        return True

    async def _log_end(self, tp: TopicPartition) -> int | None:
        """The offset after the last ``tp`` holds; None when the broker does not say in time."""
        return await self._log_offset(tp, self.consumer.end_offsets)

    async def _log_start(self, tp: TopicPartition) -> int | None:
        """The first offset ``tp`` still holds; None when the broker does not say in time."""
        return await self._log_offset(tp, self.consumer.beginning_offsets)

    async def _log_offset(
        self,
        tp: TopicPartition,
        ask: Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, int]]],
    ) -> int | None:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                offset = (await ask([tp]))[tp]
        except (kerr.KafkaError, OSError, KeyError, TimeoutError):
            return None
        return int(offset) if offset is not None and offset >= 0 else None

    async def _resumed_at(self, tp: TopicPartition) -> int | None:
        """Where the group resumes reading ``tp``: its committed offset (or the log's start,
        if retention deleted past it), or the log's start when nothing was committed; None
        when the broker does not say in time."""
        if self.closed:
            return None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                committed = await self.consumer.committed(tp)
        except (kerr.KafkaError, OSError, TimeoutError):
            return None
        log_start = await self._log_start(tp)
        start, deleted = resume_point(committed, log_start)
        if deleted is not None:
            log.warning(
                "Kafka %s partition %d: offsets %d-%d were deleted (retention) before the group "
                "read them; the events there are not routed",
                tp.topic,
                tp.partition,
                *deleted,
            )
        return start

    async def close(self) -> None:
        """Commit what is done and leave the group; later acks change nothing on the broker."""
        if self.closed:
            return
        self.closed = True
        for handle in self.timers:
            handle.cancel()
        try:
            await cancel_and_wait(self._joining)
            await cancel_and_wait(self._committer)
            await self.commit()
        finally:
            await self._stop_consumer()

    async def _stop_consumer(self) -> None:
        try:
            await self.consumer.stop()
        except (kerr.KafkaError, OSError):
            pass
        except asyncio.CancelledError:
            stop_if_cancelled()  # this task's own cancellation goes on
            # aiokafka 0.14's fetcher, stopping, awaits the fetch it cancelled without
            # catching the cancellation (a fetch waiting to retry a broker that is down): the
            # consumer is stopped and has left the group's work, its connections may not be.
            log.warning("Kafka consumer of %s stopped while the broker is down", self.config.topic)


class KafkaBus:
    """The :class:`~eventbus.bus.Bus` on Kafka; use as ``async with KafkaBus(cfg) as bus``."""

    def __init__(self, config: KafkaBusConfig) -> None:
        """Raises ConfigError when a file of the TLS block cannot be read or the program of
        OAUTHBEARER's token_command is not found."""
        self.config = config
        self._security = {} if config.auth is None else kafka_options(config.auth, "Kafka bus")
        self._producer: AIOKafkaProducer | None = None
        self._consumptions: set[_Consumption] = set()
        self._recent = _Recent()  # the events this process's consumers handed out lately
        self.copy_dropped: Callable[[str], None] = lambda via: None
        """Called with a dropped copy's ``via`` (the service counts it as a duplicate)."""
        self._publishes = FailureRun()  # publishes the brokers could not take, in a row
        self.stall_after = STALL_AFTER
        self.publish_stall_after = PUBLISHES_STALL_AFTER

    async def __aenter__(self) -> Self:
        """Make sure the topic exists and start the producer.

        Raises BusUnavailable when the brokers cannot be reached within ``connect_timeout``,
        BusError when the topic cannot be created.
        """
        cfg = self.config
        await self._ensure_topic()
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            **self._security,
            acks="all",
            enable_idempotence=cfg.idempotent,
            linger_ms=cfg.linger_ms,
            request_timeout_ms=int(cfg.publish_timeout * 1000),
            max_request_size=bus_message_limit(cfg.max_event_size),
            partitioner=bus_partition,
        )
        try:
            async with start_refusals(
                cfg.bootstrap_servers, self._security, within=cfg.connect_timeout
            ):
                await producer.start()
        except BaseException as exc:
            # A cancellation too: a half-started producer keeps its sender task and sockets.
            with contextlib.suppress(kerr.KafkaError, OSError):
                await producer.stop()
            if isinstance(exc, kerr.KafkaError | OSError | TimeoutError):
                raise _translate(exc, f"connect to {cfg.bootstrap_servers}") from exc
            raise
        self._producer = producer
        return self

    async def _ensure_topic(self) -> None:
        cfg = self.config
        admin = AIOKafkaAdminClient(
            bootstrap_servers=cfg.bootstrap_servers,
            **self._security,
            request_timeout_ms=int(cfg.connect_timeout * 1000),
        )
        try:
            async with start_refusals(
                cfg.bootstrap_servers, self._security, within=cfg.connect_timeout
            ):
                await admin.start()
            limit = {"max.message.bytes": str(bus_message_limit(cfg.max_event_size))}
            async with asyncio.timeout(cfg.connect_timeout):
                response = await admin.create_topics(
                    [
                        NewTopic(
                            cfg.topic, cfg.partitions, cfg.replication_factor, topic_configs=limit
                        )
                    ]
                )
        except TimeoutError as exc:
            # (it said "create topic failed: TimeoutError()", naming neither broker nor time)
            raise BusUnavailable(
                f"Kafka at {cfg.bootstrap_servers} did not answer within "
                f"{cfg.connect_timeout:g} s (creating topic {cfg.topic})"
            ) from exc
        except (kerr.KafkaError, OSError) as exc:
            raise _translate(exc, f"create topic {cfg.topic} at {cfg.bootstrap_servers}") from exc
        except ValueError as exc:
            bad = cfg.bootstrap_servers
            raise ConfigError(f"bad Kafka bootstrap_servers {bad!r}: {exc}") from exc
        finally:
            await admin.close()
        for _topic, code, *rest in response.topic_errors:
            if code not in (0, kerr.TopicAlreadyExistsError.errno):
                error = kerr.for_code(code)(*rest)
                raise _translate(error, f"create topic {cfg.topic}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit done offsets, leave the group, flush and stop the producer."""
        for consumption in list(self._consumptions):
            await consumption.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(kerr.KafkaError, OSError):
                await producer.stop()

    def _open_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise BusError("the bus is not open: use it inside `async with`")
        return self._producer

    async def publish(
        self, event: dict[str, Any], *, via: str = DIRECT, scope: str | None = None
    ) -> bool:
        """Store ``event`` on the topic and return once all in-sync replicas have it; False
        (Kafka keeps every copy: never a duplicate on publish).

        Raises BusUnavailable when no broker acks within ``publish_timeout`` (the event may
        still be stored later), BusError when the event cannot be encoded or is rejected.
        ``scope`` (an invocation's target) goes with the record: the consumer drops a copy of
        an event handed out lately only within one scope (an event invoked on two targets
        reached one of them).
        """
        (result,) = await self.publish_many([event], via=via, scope=scope)
        if isinstance(result, BaseException):
            raise result
        return False

    async def publish_many(
        self, events: Sequence[dict[str, Any]], *, via: str = DIRECT, scope: str | None = None
    ) -> list[PublishOutcome]:
        """Publish all events batched by the producer, then wait for their acks together.

        Returns one outcome per event, in order: None when stored (Kafka keeps every copy, so
        never DUPLICATE), else the BusError or BusUnavailable that ``publish`` would have
        raised. The whole call takes at most about
        twice ``publish_timeout``; never raises for a single event.
        """
        cfg = self.config
        results: list[PublishOutcome] = [None] * len(events)
        pending: dict[asyncio.Future[Any], int] = {}
        deadline = asyncio.get_running_loop().time() + cfg.publish_timeout
        headers = [_CONTENT_TYPE, (_VIA, via.encode())]
        if scope is not None:
            headers.append((_SCOPE, scope.encode()))
        i = 0
        try:
            # send() waits for metadata and buffer space: one deadline bounds the loop (one
            # timeout for the batch, not one per event: 3.6 µs each).
            async with asyncio.timeout_at(deadline):
                for i, event in enumerate(events):
                    try:
                        payload, key = wire_encode(event)
                        producer = self._open_producer()
                        future = await producer.send(
                            cfg.topic, payload, key=key.encode(), headers=headers
                        )
                    except BusError as exc:
                        results[i] = exc
                    except (kerr.KafkaError, OSError, TimeoutError) as exc:
                        results[i] = _translate(exc, "publish")
                    else:
                        pending[future] = i
        except TimeoutError as exc:
            # The deadline passed in a send: that event and those after it were not sent.
            for late in range(i, len(events)):
                results[late] = _translate(exc, "publish")
        await collect_acks(
            pending, results, cfg.publish_timeout, lambda exc: _translate(exc, "publish")
        )
        note_publishes(self._publishes, results, self.publish_stall_after)
        return results

    async def messages(self) -> AsyncIterator[BusMessage]:
        """Join the consumer group and yield its events until the bus closes.

        At most ``max_in_flight`` yielded messages are un-settled at any time. A record that is
        not a valid CloudEvent is handed out marked ``rejected``, for the consumer to set
        aside. Raises BusUnavailable when the brokers cannot be reached to join the group.
        """
        self._open_producer()
        consumption = _Consumption(self.config, self._security)
        self._consumptions.add(consumption)
        try:
            try:
                # Closed in the finally whatever ends the join (a cancellation too): see join().
                async with start_refusals(self.config.bootstrap_servers, self._security):
                    await consumption.join()
            except (kerr.KafkaError, OSError) as exc:
                raise _translate(exc, f"join group {self.config.group_id}") from exc
            loop = asyncio.get_running_loop()
            async for msg in consumption.run():
                if msg.rejected is None and self._recent.copy(msg.key, msg.ref, loop.time()):
                    log.debug("Kafka bus: %s copies an event handed out lately: dropped", msg.ref)
                    await msg.ack()
                    self.copy_dropped(msg.via)
                    continue
                yield msg
        finally:
            self._consumptions.discard(consumption)
            await consumption.close()

    def stalled(self) -> str | None:
        """Why the bus does not progress though a broker answers: the group's offset commits
        failing for ``COMMITS_STALL_AFTER`` s (readiness stayed green while every commit failed
        for minutes, and a rebalance then redelivered everything since the last one), or a
        member with room receiving nothing for ``stall_after`` s while records wait past its
        offsets (a broker answering every fetch empty), or publishes failing though it answers
        (see ``publishes_failing``)."""
        publishing = publishes_failing(self._publishes, self.publish_stall_after)
        if publishing is not None:
            return publishing
        for consumption in self._consumptions:
            failing = consumption.commits.longer_than(COMMITS_STALL_AFTER)
            if failing is not None:
                return f"offset commits failing for {failing:.0f} s: {consumption.commits.last}"
            behind = consumption.stalled(self.stall_after)
            if behind is not None:
                return behind
        return None

    async def ping(self) -> bool:
        """True when a broker answers a metadata request within ``connect_timeout``."""
        try:
            producer = self._open_producer()
            async with asyncio.timeout(self.config.connect_timeout):
                await producer.client.fetch_all_metadata()
        except (kerr.KafkaError, OSError, TimeoutError, BusError):
            return False
        return True
