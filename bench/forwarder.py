"""The practical limit for bench/pipeline_bench.py: a minimal hand-written forwarder over the
same transports as eventbus, with nothing else (no rules, no audit, no retries schedule).

HTTP in (aiohttp, body checked to be JSON) -> publish and wait for the broker's ack -> 202;
in the same process a consumer takes batches off the log, POSTs each event out as a
structured CloudEvent (with aiohttp, or with ``--client lean`` eventbus's own HTTP/1.1 client)
and acks (JetStream) or commits (Kafka) once the batch is answered.
Several processes share the port (SO_REUSEPORT) and the durable consumer / consumer group.

    python bench/forwarder.py --port 8100 --target http://127.0.0.1:9000/fn --nats nats://...
    python bench/forwarder.py --port 8100 --target ... --kafka 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import web

SUBJECT, STREAM, TOPIC, GROUP = "fwd.events", "FWD", "fwd.events", "fwd"
BATCH = 256
# nats-py's fetch, once it has to wait, returns only when the batch is full or the wait is
# over: a short wait keeps a trickle of events from sitting in a half-filled batch.
FETCH_WAIT = 0.05
CE_JSON = {"content-type": "application/cloudevents+json"}
# its own Kafka client settings, unless told otherwise: aiokafka's fetch wait, a short linger
KAFKA_FETCH_WAIT = 0.5
KAFKA_LINGER_MS = 5


Post = Callable[[bytes], Awaitable[bool]]
"""POST one body to the target; True when it answered 2xx."""


def _aiohttp_post(http: aiohttp.ClientSession, target: str) -> Post:
    async def post(body: bytes) -> bool:
        try:
            async with http.post(target, data=body, headers=CE_JSON) as resp:
                await resp.read()
                return resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    return post


def _lean_post(pool: Any, target: str) -> Post:
    """The same POST over eventbus's own HTTP/1.1 client (``--client lean``): the reference
    for what the transports cost when both sides use the same client."""
    from urllib.parse import urlsplit

    from eventbus.targets._http1 import HttpError, Origin

    url = urlsplit(target)
    assert url.hostname is not None and url.port is not None
    origin = Origin(url.hostname, url.port, None)
    content_type = CE_JSON["content-type"]
    head = f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\ncontent-type: {content_type}\r\n"

    async def post(body: bytes) -> bool:
        request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode()
        try:
            async with asyncio.timeout(30):
                resp = await pool.request(origin, request, body, max_body=1 << 20)
        except (HttpError, OSError, TimeoutError):
            return False
        return bool(resp.status < 300)

    return post


async def _post_all(post: Post, bodies: list[bytes]) -> list[bool]:
    return await asyncio.gather(*(post(b) for b in bodies))


async def _nats(args: argparse.Namespace, post: Post, stop: asyncio.Event) -> None:
    import nats

    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    sub = await js.pull_subscribe(SUBJECT, durable=GROUP)

    async def publish(body: bytes) -> None:
        await js.publish(SUBJECT, body)

    async def consume() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):  # nats-py raises both kinds on an empty pull
                msgs = await sub.fetch(BATCH, timeout=FETCH_WAIT)
                ok = await _post_all(post, [m.data for m in msgs])
                await asyncio.gather(
                    *(m.ack() if good else m.nak() for m, good in zip(msgs, ok, strict=True))
                )

    await _serve(args, publish, consume, stop)
    # Not drain(): it waits for the pull subscription's queue to empty, which it never does
    # once the consumer loop has stopped. Closing flushes the acks already written.
    await nc.close()


async def _kafka(args: argparse.Namespace, post: Post, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=args.kafka)
    await admin.start()
    with contextlib.suppress(TopicAlreadyExistsError):
        await admin.create_topics([NewTopic(TOPIC, num_partitions=6, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=args.kafka, acks="all", linger_ms=args.kafka_linger_ms
    )
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=args.kafka,
        group_id=GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=max(1, int(args.kafka_fetch_wait * 1000)),
    )
    await producer.start()
    await consumer.start()

    async def publish(body: bytes) -> None:
        await producer.send_and_wait(TOPIC, body)

    async def consume() -> None:
        # A failed POST is not retried: the pipeline bench's receiver never fails, and a
        # Kafka consumer has no per-message nak to hand it back with.
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH)
            records = [r.value for rs in batches.values() for r in rs if r.value is not None]
            if records:
                await _post_all(post, records)
                await consumer.commit()

    try:
        await _serve(args, publish, consume, stop)
    finally:
        await consumer.stop()
        await producer.stop()


async def _serve(
    args: argparse.Namespace,
    publish: Callable[[bytes], Awaitable[None]],
    consume: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
) -> None:
    async def ingest(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            return web.Response(status=400, text="body is not JSON")
        await publish(body)
        return web.Response(status=202)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/events", ingest)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, reuse_port=True, backlog=2048).start()
    consumer = asyncio.create_task(consume())
    stopping = asyncio.create_task(stop.wait())
    # A consumer that fails ends the process (with its traceback) rather than leaving an
    # ingest-only forwarder behind.
    await asyncio.wait([consumer, stopping], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await runner.cleanup()
    await consumer


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    run = _nats if args.nats else _kafka
    if args.client == "lean":
        from eventbus.targets._http1 import Pool

        pool = Pool(BATCH, 15.0)
        try:
            await run(args, _lean_post(pool, args.target), stop)
        finally:
            await pool.close()
        return
    connector = aiohttp.TCPConnector(limit=BATCH)
    async with aiohttp.ClientSession(connector=connector) as http:
        await run(args, _aiohttp_post(http, args.target), stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="URL every event is POSTed to")
    bus = parser.add_mutually_exclusive_group(required=True)
    bus.add_argument("--nats", help="NATS URL (JetStream)")
    bus.add_argument("--kafka", help="Kafka bootstrap servers")
    parser.add_argument(
        "--client",
        choices=("aiohttp", "lean"),
        default="aiohttp",
        help="outbound HTTP client: aiohttp (the obvious choice), or eventbus's own HTTP/1.1 "
        "client (what eventbus's HTTP targets use)",
    )
    parser.add_argument(
        "--kafka-fetch-wait",
        type=float,
        default=KAFKA_FETCH_WAIT,
        help="seconds one fetch waits on the broker for new events (aiokafka's default)",
    )
    parser.add_argument(
        "--kafka-linger-ms",
        type=int,
        default=KAFKA_LINGER_MS,
        help="the producer's linger, in milliseconds",
    )
    import uvloop

    uvloop.run(_main(parser.parse_args()))
