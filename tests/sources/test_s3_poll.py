"""The s3-poll source against a real S3 endpoint (moto's threaded server on a free port)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from eventbus._errors import ConfigError
from eventbus.bus._nats_server import free_port
from eventbus.sources import SourceContext, build_source
from eventbus.sources import _s3_poll as s3_module
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.service import ServeProcess
from tests.fixtures.tls_relay import tls_relay
from tests.sources._harness import (
    Recorder,
    eventually,
    failing_with,
    make_context,
    running,
    source_pool,
    started,
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def _spec(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"poll-{bucket}",
        "type": "s3-poll",
        "bucket": bucket,
        "endpoint_url": endpoint,
        "access_key_id": "test",
        "secret_access_key": "test",
        "interval": 0.05,
        **extra,
    }


async def test_new_and_changed_objects_become_events_once_across_restart(
    s3_endpoint: str, database_dsn: str
) -> None:
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket="photos")
    s3.put_object(Bucket="photos", Key="in/a b.jpg", Body=b"aaa")
    s3.put_object(Bucket="photos", Key="other/skip.txt", Body=b"x")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        source = build_source(_spec(s3_endpoint, "photos", prefix="in/"))
        ctx = make_context(pool, source.name, recorder)
        async with running(source, ctx):
            [first] = await recorder.wait_for(1)
            await asyncio.to_thread(s3.put_object, Bucket="photos", Key="in/c.jpg", Body=b"c")
            await recorder.wait_for(2)
            # An overwrite is a change: new ETag and LastModified.
            await asyncio.to_thread(s3.put_object, Bucket="photos", Key="in/a b.jpg", Body=b"A")
            await recorder.wait_for(3)
            await eventually(lambda: _caught_up(ctx))
        assert first["type"] == "com.amazonaws.s3.ObjectCreated:Put"
        assert first["source"] == "aws:s3.us-east-1.photos"
        assert first["subject"] == "in/a+b.jpg"
        assert first["specversion"] == "1.0"
        assert first["datacontenttype"] == "application/json"
        assert first["data"]["s3"]["object"]["size"] == 3
        assert first["data"]["s3"]["bucket"]["name"] == "photos"
        assert first["time"].endswith("Z")
        subjects = [e["subject"] for e in recorder.events]
        assert subjects == ["in/a+b.jpg", "in/c.jpg", "in/a+b.jpg"]
        assert len({e["id"] for e in recorder.events}) == 3

        # Restart: nothing is emitted twice, and an upload made while stopped is not missed.
        await asyncio.to_thread(s3.put_object, Bucket="photos", Key="in/d.jpg", Body=b"d")
        restarted = Recorder()
        source = build_source(_spec(s3_endpoint, "photos", prefix="in/"))
        async with running(source, make_context(pool, source.name, restarted)):
            await restarted.wait_for(1)
            # Later polls see only what is new; a re-emitted old object would come first.
            await asyncio.to_thread(s3.put_object, Bucket="photos", Key="in/e.jpg", Body=b"e")
            await restarted.wait_for(2)
        assert [e["subject"] for e in restarted.events] == ["in/d.jpg", "in/e.jpg"]


async def test_an_object_that_comes_back_is_an_event_of_its_own(
    s3_endpoint: str, database_dsn: str
) -> None:
    # A version made current again (its delete marker removed) has the ETag and LastModified
    # it had: its event had the first one's id, and the bus dropped it as a copy.
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket="restored")
    s3.put_bucket_versioning(Bucket="restored", VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket="restored", Key="doc.txt", Body=b"v1")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        source = build_source(_spec(s3_endpoint, "restored"))
        ctx = make_context(pool, source.name, recorder)
        async with running(source, ctx):
            [first] = await recorder.wait_for(1)
            marker = (await asyncio.to_thread(s3.delete_object, Bucket="restored", Key="doc.txt"))[
                "VersionId"
            ]
            await eventually(lambda: _gone(ctx, "o:doc.txt"), what="the checkpoint gone")
            await asyncio.to_thread(
                s3.delete_object, Bucket="restored", Key="doc.txt", VersionId=marker
            )
            [_, again] = await recorder.wait_for(2)
    assert again["data"]["s3"]["object"]["eTag"] == first["data"]["s3"]["object"]["eTag"]
    assert again["time"] == first["time"]  # the same version
    assert again["id"] != first["id"]


async def _gone(ctx: SourceContext, key: str) -> bool:
    return await ctx.checkpoints.get(key) is None


async def test_bus_down_checkpoints_nothing_and_retries(
    s3_endpoint: str, database_dsn: str
) -> None:
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket="outage")
    s3.put_object(Bucket="outage", Key="x", Body=b"x")
    recorder = Recorder()
    recorder.down = True
    async with source_pool(database_dsn) as pool:
        source = build_source(_spec(s3_endpoint, "outage"))
        ctx = make_context(pool, source.name, recorder)
        async with running(source, ctx):
            await recorder.wait_refused(1)
            assert await ctx.checkpoints.items() == {}
            assert ctx.status.state == "backoff"
            assert "BusUnavailable" in (ctx.status.last_error or "")
            recorder.down = False
            await recorder.wait_for(1)
            await eventually(lambda: _has_checkpoint(ctx, "o:x"))
        assert [e["subject"] for e in recorder.events] == ["x"]


async def _caught_up(ctx: SourceContext) -> bool:
    """True once every emitted object is checkpointed too (lag counts down after each)."""
    return ctx.status.lag == 0


async def _has_checkpoint(ctx: SourceContext, key: str) -> bool:
    return await ctx.checkpoints.get(key) is not None


async def test_start_at_end_reports_only_what_comes_after_the_first_start(
    s3_endpoint: str, database_dsn: str
) -> None:
    # Every object already in the bucket was reported at the first start (a bucket of years
    # of uploads: all of them, one event each); Argo Events' and EventBridge's S3 sources
    # report what is uploaded from then on.
    bucket = f"old-{uuid.uuid4().hex[:8]}"
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    for key in ("a.csv", "b.csv"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"old")
    spec = _spec(s3_endpoint, bucket, start_at="end")
    first = Recorder()
    async with started(database_dsn, spec, first) as ctx:
        await eventually(lambda: _caught_up(ctx))
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key="c.csv", Body=b"new")
        await first.wait_for(1)

        async def checkpointed() -> bool:
            return await ctx.checkpoints.get("o:c.csv") is not None

        await eventually(checkpointed, what="c.csv checkpointed")
    # a later start is no first start: what came while stopped is reported
    await asyncio.to_thread(s3.put_object, Bucket=bucket, Key="d.csv", Body=b"new")
    again = Recorder()
    async with started(database_dsn, spec, again):
        await again.wait_for(1)
    assert [e["subject"] for e in first.events] == ["c.csv"]
    assert [e["subject"] for e in again.events] == ["d.csv"]


async def test_a_missing_bucket_backs_off_until_it_is_made(
    s3_endpoint: str, database_dsn: str
) -> None:
    # A ConfigError marked the source failed for good: a bucket made after the source (or
    # keys not known yet for a few seconds) needed a restart of the service.
    bucket = f"later-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    async with started(database_dsn, _spec(s3_endpoint, bucket), recorder) as ctx:
        await eventually(failing_with(ctx, "NoSuchBucket"), what="the missing bucket reported")
        client = _client(s3_endpoint)
        client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key="first.csv", Body=b"1")
        (event,) = await recorder.wait_for(1)
    assert event["subject"] == "first.csv"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"interval": 0}, "field 'interval'"),
        ({"start_at": "middle"}, "field 'start_at'"),
        ({"bucket": ""}, "field 'bucket'"),
        ({"secret_access_key": 5}, "field 'secret_access_key'"),
        ({"region": None}, "field 'region'"),
        ({"prefx": "a/"}, "field 'prefx'"),
        ({"endpoint_url": "not a url"}, "Invalid endpoint"),
        ({"region": "bad region!"}, "region_name 'bad region!'"),
        ({"tls": {"ca": "/ca.pem"}}, "tls needs an https:// endpoint_url"),
        (
            {"endpoint_url": "https://h", "tls": {"cert": "/c.pem", "key": {"env": "HOME"}}},
            "tls.key must be a file",
        ),
        (
            {"endpoint_url": "https://h", "tls": {"server_name": "s3.test"}},
            "no key_password or server_name",
        ),
        ({"endpoint_url": "https://h", "tls": {"ca": "/nope.pem"}}, r"tls\.ca /nope\.pem"),
    ],
)
def test_bad_settings_name_the_field(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_source({**_spec("http://127.0.0.1:1", "b"), **extra})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, **overrides: str) -> dict[str, str]:
    return {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)} | overrides


async def test_an_https_endpoint_with_a_client_certificate(
    s3_endpoint: str, pki: Pki, database_dsn: str
) -> None:
    """Through a TLS listener requiring a client certificate, in front of moto (which serves
    plain HTTP): the source's CA and certificate reach botocore."""
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket="tls-bucket")
    s3.put_object(Bucket="tls-bucket", Key="a.txt", Body=b"a")
    upstream = int(s3_endpoint.rsplit(":", 1)[1])
    recorder = Recorder()
    async with tls_relay(upstream, pki) as relay, source_pool(database_dsn) as pool:
        https = f"https://127.0.0.1:{relay.port}"
        source = build_source(_spec(https, "tls-bucket", tls=_tls(pki)))
        ctx = make_context(pool, source.name, recorder)
        async with running(source, ctx):
            [event] = await recorder.wait_for(1)
    assert event["subject"] == "a.txt"
    assert relay.sessions >= 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other-ca", "certificate verify failed"),
        ("no-client-cert", "certificate required|reset|closed|EOF"),
    ],
)
async def test_an_https_endpoint_refused_backs_off_saying_why(
    s3_endpoint: str, pki: Pki, database_dsn: str, case: str, reason: str
) -> None:
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket="tls-refused")
    upstream = int(s3_endpoint.rsplit(":", 1)[1])
    settings: dict[str, Any] = _tls(pki)
    if case == "other-ca":
        settings["ca"] = str(pki.other_ca)
    else:
        del settings["cert"], settings["key"]
    async with tls_relay(upstream, pki) as relay, source_pool(database_dsn) as pool:
        https = f"https://127.0.0.1:{relay.port}"
        source = build_source(_spec(https, "tls-refused", tls=settings))
        ctx = make_context(pool, source.name, Recorder())

        async def backing_off() -> bool:
            return ctx.status.state == "backoff"

        async with running(source, ctx):
            await eventually(backing_off)
    assert re.search(reason, ctx.status.last_error or ""), ctx.status.last_error


@contextlib.asynccontextmanager
async def _never_answering() -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """An endpoint that accepts connections and never answers (a frozen S3 service); yields
    its URL and the connections it holds."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", held
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_an_endpoint_that_never_answers_is_reported_within_its_read_timeout(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore's 60 s read timeout, tried three times, showed the source running for two
    # minutes; two tries of READ_TIMEOUT now.
    monkeypatch.setattr(s3_module, "READ_TIMEOUT", 0.5)
    async with _never_answering() as (url, held):
        spec = _spec(url, "frozen")
        async with started(database_dsn, spec, Recorder()) as ctx:
            await eventually(failing_with(ctx, "Read timeout"), within=10, what="reported")
    assert len(held) >= 2  # botocore tried twice


async def test_a_listing_waiting_on_a_frozen_endpoint_does_not_hold_the_exit(
    serve_process: Callable[..., ServeProcess],
) -> None:
    # The listing ran in asyncio's thread pool, which the exit waits for: SIGTERM took 117 s
    # (three tries of botocore's 60 s read timeout) in a review, past any stop timeout.
    async with _never_answering() as (url, held):
        source = {**_spec(url, "frozen"), "interval": 1}
        service = serve_process(
            rules="- name: none\n  match: {type: [x]}\n  targets: [fn]\n",
            targets=[{"name": "fn", "type": "http", "url": "http://127.0.0.1:9/"}],
            settings={"router": {"shutdown_grace": 1}},
            sources=[source],
        )
        await service.start()
        await eventually(lambda: len(held) >= 1, what="a listing waiting for its answer")
        # exits by itself within the bound; a process still there is killed (not 0)
        assert await service.terminate(timeout=15) == 0, service.log.read_text()[-2000:]
