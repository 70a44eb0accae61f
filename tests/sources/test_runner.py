"""Queue sources under the SourceRunner: a source whose broker is unreachable backs off and
keeps retrying while the other sources go on delivering."""

from __future__ import annotations

import nats
import orjson

from eventbus.bus._nats_server import free_port
from eventbus.sources import SourceRunner, build_source
from tests.fixtures.nats import unique_name
from tests.fixtures.wait import eventually
from tests.sources._harness import source_pool
from tests.sources.test_queue_support import bus_tap


async def test_unreachable_brokers_back_off_while_other_sources_deliver(
    nats_url: str, database_dsn: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    sources = [
        build_source({"name": "k", "type": "kafka", "bootstrap_servers": dead, "topics": ["t"]}),
        build_source(
            {"name": "r", "type": "rabbitmq", "url": f"amqp://guest:guest@{dead}/", "queue": "q"}
        ),
        build_source({"name": "m", "type": "mqtt", "port": free_port(), "topics": ["a"]}),
        build_source({"name": "n", "type": "jetstream", "url": f"nats://{dead}", "stream": "S"}),
    ]
    stream, subject = unique_name("LIVE"), unique_name("live")
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[subject])
        sources.append(
            build_source({"name": "live", "type": "jetstream", "url": nats_url, "stream": stream})
        )
        async with (
            source_pool(database_dsn) as pool,
            bus_tap(nats_url) as tap,
            SourceRunner(sources, pool=pool, publish=tap.publish) as runner,
        ):
            event = {"specversion": "1.0", "id": "alive", "source": "/s", "type": "t"}
            await nc.jetstream().publish(subject, orjson.dumps(event))
            assert [e["id"] for e in await tap.take(1)] == ["alive"]

            async def broken_ones_back_off() -> bool:
                states = {s.name: s.state for s in runner.statuses()}
                return all(states[n] == "backoff" for n in "krmn")

            await eventually(broken_ones_back_off)
            status = {s.name: s for s in runner.statuses()}
            assert status["live"].state == "running"
            assert all(status[n].last_error for n in "krmn")
    finally:
        await nc.close()
