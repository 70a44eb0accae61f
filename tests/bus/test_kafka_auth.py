"""Kafka security (``eventbus.config.KafkaAuth``) for the bus, the Kafka source and target.

What the test broker allows: Tansu 0.6 with ``--authentication`` requires SASL SCRAM, but its
users can be created only by an authenticated client, and only a persistent storage engine
would keep a user created before authentication was turned on (the tests run it in memory), so
no SCRAM login can succeed against it here. So this file pins the translation into aiokafka's
arguments, and runs the SCRAM exchange against Tansu with authentication on, where the wrong
credentials must fail clearly, for good, and without the password in any message. A
successful SCRAM connection to a broker is not exercised. TLS is, in test_kafka_tls.py (Tansu's
own TLS options do not work, so a TLS listener of the test's own sits in front of it).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from pydantic import ValidationError

import eventbus.sources  # noqa: F401  (registers every connector type)
from eventbus._errors import BusError, ConfigError
from eventbus._oauth import TokenError, start_refusals
from eventbus._oauth import kafka_options as oauth_kafka_options
from eventbus.bus import KafkaBusConfig, open_bus
from eventbus.config import KafkaSettings, load_settings
from eventbus.sources import build_source
from eventbus.targets import KafkaTarget, KafkaTargetSpec
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import unique_name
from tests.sources._harness import Recorder, eventually, make_context, running, source_pool

PASSWORD = "k4fka-Passw0rd-scram"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def authenticating_broker(tansu_binary: str) -> Iterator[str]:
    broker = TansuBroker(tansu_binary, extra_args=("--authentication",))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def test_plaintext_is_the_default() -> None:
    assert KafkaSettings().kafka_options("k") == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_reaches_aiokafkas_parameters() -> None:
    auth = KafkaSettings.model_validate(
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "username": "eventbus",
            "password": {"env": "KPW"},
        },
        context={"env": {"KPW": PASSWORD}},
    )
    assert auth.kafka_options("k") == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "eventbus",
        "sasl_plain_password": PASSWORD,
    }
    assert PASSWORD not in repr(auth) and PASSWORD not in auth.model_dump_json()


@pytest.mark.parametrize(
    ("protocol", "mechanism", "warned"),
    [
        ("SASL_PLAINTEXT", "PLAIN", "SASL PLAIN over SASL_PLAINTEXT sends the password in clear"),
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", None),  # proves the password without sending it
        ("SASL_SSL", "PLAIN", None),
    ],
)
def test_a_password_sent_in_clear_is_warned_about(
    protocol: str, mechanism: str, warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    auth = KafkaSettings.model_validate(
        {
            "security_protocol": protocol,
            "sasl_mechanism": mechanism,
            "username": "eventbus",
            "password": {"env": "KPW"},
        },
        context={"env": {"KPW": PASSWORD}},
    )
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        oauth_kafka_options(auth, "Kafka bus")
    messages = [r.getMessage() for r in caplog.records]
    if warned is None:
        assert messages == [], messages
    else:
        assert messages == [f"Kafka bus: {warned}; use SASL_SSL"], messages
    assert PASSWORD not in caplog.text


def test_sasl_ssl_with_scram_and_a_ca(pki: Pki) -> None:
    auth = KafkaTargetSpec.model_validate(
        {
            "name": "k",
            "bootstrap_servers": "h:9093",
            "topic": "t",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "username": "eventbus",
            "password": PASSWORD,
            "tls": {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)},
        }
    )
    options = auth.kafka_options("Kafka target 'k'")
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "eventbus",
        "sasl_plain_password": PASSWORD,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    issuers = [dict(item[0] for item in c["subject"]) for c in context.get_ca_certs()]
    assert any("trustme" in str(i) for i in issuers), issuers


def test_ssl_without_a_tls_block_verifies_with_the_system_cas() -> None:
    options = KafkaSettings(security_protocol="SSL").kafka_options("k")
    assert options["security_protocol"] == "SSL"
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("kafka", "message"),
    [
        (
            "{security_protocol: SASL_SSL, username: u, password: p}",
            "security_protocol SASL_SSL needs sasl_mechanism, username and password (or "
            "sasl_mechanism OAUTHBEARER and oauth2 or token_command)",
        ),
        (
            "{sasl_mechanism: PLAIN, username: u, password: p}",
            "sasl_mechanism, username, password, oauth2 and token_command need "
            "security_protocol SASL_PLAINTEXT or SASL_SSL",
        ),
        ("{tls: {ca: /ca.pem}}", "tls needs security_protocol SSL or SASL_SSL"),
    ],
)
def test_inconsistent_security_names_file_line_and_field(
    tmp_path: Path, kafka: str, message: str
) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(f"bus:\n  backend: kafka\n  kafka: {kafka}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert str(info.value) == f"{cfg}:3: bus.kafka: Value error, {message}"


def test_an_unknown_mechanism_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(
        "kafka_ingest:\n  bootstrap_servers: h:9092\n  topics: [a]\n  sasl_mechanism: GSSAPI\n"
    )
    with pytest.raises(ConfigError, match=r"eventbus.yaml:4: kafka_ingest.sasl_mechanism: Input"):
        load_settings(cfg, env={})


def _scram(mechanism: str = "SCRAM-SHA-256") -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "username": "eventbus",
        "password": PASSWORD,
    }


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_the_target_refused_by_the_broker_fails_for_good(
    authenticating_broker: str, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = KafkaTargetSpec.model_validate(
        {
            "name": "k",
            "bootstrap_servers": authenticating_broker,
            "topic": unique_name("t"),
            "idempotent": False,
            "timeout": 5,
            **_scram(mechanism),
        }
    )
    event = {"specversion": "1.0", "id": "e1", "source": "/t", "type": "t"}
    async with KafkaTarget(spec) as target:
        outcome = await target.deliver(event, event, is_cloudevent=True, attempt=1)
    assert not outcome.delivered and not outcome.retryable
    assert outcome.error == "Kafka refused the credentials: the broker refused the SASL credentials"
    assert PASSWORD not in caplog.text


async def test_the_bus_refused_by_the_broker_says_so(authenticating_broker: str) -> None:
    config = KafkaBusConfig(
        bootstrap_servers=authenticating_broker,
        topic=unique_name("bus"),
        partitions=1,
        idempotent=False,
        connect_timeout=5.0,
        auth=KafkaSettings.model_validate(_scram()),
    )
    with pytest.raises(BusError) as info:
        async with open_bus(config):
            pass
    assert "refused the SASL credentials" in str(info.value)
    assert PASSWORD not in str(info.value)


async def test_the_source_refused_by_the_broker_backs_off_saying_why(
    authenticating_broker: str, database_dsn: str
) -> None:
    spec = {
        "name": "kin",
        "type": "kafka",
        "bootstrap_servers": authenticating_broker,
        "topics": [unique_name("in")],
        **_scram(),
    }
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "kin", Recorder())

        async def backing_off() -> bool:
            return ctx.status.state == "backoff"

        async with running(build_source(spec), ctx):
            await eventually(backing_off)
    assert ctx.status.last_error == "PermissionError: the broker refused the SASL credentials"


# --- OAUTHBEARER ------------------------------------------------------------------------------

CLIENT_SECRET = "kafka-Oauth-secret-31"


@pytest.fixture
async def token_endpoint() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A token endpoint issuing tok-1, tok-2 ... to eventbus/CLIENT_SECRET; yields its URL and
    the forms it received."""
    forms: list[dict[str, str]] = []

    async def token(request: web.Request) -> web.Response:
        forms.append({k: str(v) for k, v in (await request.post()).items()})
        expected = "Basic " + base64.b64encode(f"eventbus:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response({"access_token": f"tok-{len(forms)}", "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/token", forms
    await runner.cleanup()


def _oauthbearer(token_url: str, secret: str = CLIENT_SECRET) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "OAUTHBEARER",
        "oauth2": {
            "token_url": token_url,
            "client_id": "eventbus",
            "client_secret": secret,
            "scopes": ["kafka"],
        },
    }


async def test_oauthbearer_tokens_come_from_the_token_endpoint_once(
    token_endpoint: tuple[str, list[dict[str, str]]],
) -> None:
    url, forms = token_endpoint
    auth = KafkaSettings.model_validate(_oauthbearer(url))
    options = oauth_kafka_options(auth, "Kafka bus")
    provider = options.pop("sasl_oauth_token_provider")
    assert options["sasl_mechanism"] == "OAUTHBEARER"
    assert "sasl_plain_password" not in options
    assert isinstance(provider, AbstractTokenProvider)  # what aiokafka insists on
    tokens = await asyncio.gather(*(provider.token() for _ in range(20)))
    assert set(tokens) == {"tok-1"}
    assert forms == [{"grant_type": "client_credentials", "scope": "kafka"}]
    # aiokafka takes the options as they are.
    AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **oauth_kafka_options(auth, "k"))


async def test_oauthbearer_with_a_refused_client_says_so(
    token_endpoint: tuple[str, list[dict[str, str]]],
) -> None:
    url, _ = token_endpoint
    auth = KafkaSettings.model_validate(_oauthbearer(url, secret="not-the-secret"))
    provider = oauth_kafka_options(auth, "Kafka bus")["sasl_oauth_token_provider"]
    with pytest.raises(TokenError, match="refused client 'eventbus': HTTP 401 invalid_client"):
        await provider.token()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"username": "u", "password": "p"},
            "OAUTHBEARER takes an oauth2 block or a token_command, not a password",
        ),
        ({"sasl_mechanism": "PLAIN"}, "needs sasl_mechanism, username and password"),
    ],
)
def test_oauthbearer_settings_are_checked(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSettings.model_validate({**_oauthbearer("https://idp.test/token"), **extra})


async def test_what_a_sasl_exchange_raises_becomes_a_connection_failure_saying_why() -> None:
    async def start(exc: Exception) -> None:
        async with start_refusals():
            raise exc

    refused = TokenError("OAuth2 token endpoint x refused client 'eventbus'", retryable=False)
    with pytest.raises(PermissionError, match="refused client 'eventbus'"):
        await start(refused)
    with pytest.raises(ConnectionError, match="timeout after 5s"):
        await start(TokenError("OAuth2 token endpoint x: timeout after 5s", retryable=True))
    with pytest.raises(PermissionError, match="the broker refused the SASL credentials"):
        await start(KeyError("v"))


@pytest.mark.parametrize(
    "refusal",
    [
        SaslAuthenticationFailed("Authentication failed: Invalid username or password"),
        UnsupportedSaslMechanismError("Enabled mechanisms are: ['SCRAM-SHA-512']"),
    ],
)
async def test_apache_kafkas_refusals_are_named_not_unable_to_bootstrap(
    refusal: Exception,
) -> None:
    # aiokafka's bootstrap turns them into "Unable to bootstrap from [...]" (retried as a
    # connection failure for ever); the broker's answer is only in the error it logs for the
    # connection, as here (aiokafka 0.14, client.py; Tansu closes the connection instead, so
    # this cannot be shown against the test broker).
    async def start() -> None:
        async with start_refusals("broker.internal:9092"):
            logging.getLogger("aiokafka").error(
                'Unable connect to "%s:%s": %s', "broker.internal", 9092, refusal
            )
            raise KafkaConnectionError("Unable to bootstrap from [('broker.internal', 9092)]")

    # a mechanism it does not offer is not a wrong password
    said = (
        "does not offer the SASL mechanism"
        if isinstance(refusal, UnsupportedSaslMechanismError)
        else "refused the SASL credentials"
    )
    with pytest.raises(PermissionError, match=f"the broker {said}: ") as e:
        await start()
    assert str(refusal) in str(e.value)
    # another broker's refusal, logged meanwhile, is not this one's
    with pytest.raises(KafkaConnectionError):
        async with start_refusals("other.internal:9092"):
            logging.getLogger("aiokafka").error(
                'Unable connect to "%s:%s": %s', "broker.internal", 9092, refusal
            )
            raise KafkaConnectionError("Unable to bootstrap")


async def test_a_refusal_met_by_one_client_is_not_another_clients() -> None:
    # A handler per start on aiokafka's (process-wide) logger, matched by host: a source
    # refused its password had a target on the same cluster, down a moment, told "refused the
    # SASL credentials" (not retried, dead-lettered), and one on another port of the host too.
    refusal = SaslAuthenticationFailed("Authentication failed: Invalid username or password")
    refused_logged = asyncio.Event()
    other_failed = asyncio.Event()
    other_starting = asyncio.Event()

    async def refused() -> None:
        async with start_refusals("broker.internal:9092"):
            await other_starting.wait()
            logging.getLogger("aiokafka").error(
                'Unable connect to "%s:%s": %s', "broker.internal", 9092, refusal
            )
            refused_logged.set()
            await other_failed.wait()
            raise KafkaConnectionError("Unable to bootstrap from [('broker.internal', 9092)]")

    async def unreachable(servers: str) -> None:
        async with start_refusals(servers):
            other_starting.set()
            await refused_logged.wait()
            try:
                raise KafkaConnectionError("Unable to bootstrap from [('broker.internal', 9092)]")
            finally:
                other_failed.set()

    for servers in ("broker.internal:9092", "broker.internal:9093"):
        refused_logged.clear()
        other_failed.clear()
        other_starting.clear()
        mine, theirs = await asyncio.gather(refused(), unreachable(servers), return_exceptions=True)
        assert isinstance(mine, PermissionError), mine
        assert type(theirs) is KafkaConnectionError, theirs
    # one broker of several, logged without its brackets as aiokafka does for IPv6
    with pytest.raises(PermissionError, match="refused the SASL credentials"):
        async with start_refusals("h1:9092,[::1]:9093"):
            logging.getLogger("aiokafka").error(
                'Unable connect to "%s:%s": %s', "::1", 9093, refusal
            )
            raise KafkaConnectionError("Unable to bootstrap")


# --- OAUTHBEARER with a token command ---------------------------------------------------------

TOKEN_SCRIPT = """
import json, os, sys, time
runs, mode = sys.argv[1], sys.argv[2]
with open(runs, "a") as f:
    f.write(f"{os.getpid()}\\n")
n = len(open(runs).read().split())
token = f"cmd-T0ken-{n}"
if mode == "json":
    print(json.dumps({"access_token": token, "expires_in": 0.3}))
elif mode == "bare":
    print(token)
elif mode == "fail":
    print(token)
    print(f"vault: permission denied for {token}", file=sys.stderr)
    sys.exit(3)
elif mode == "slow":
    print("waiting for the vault", file=sys.stderr, flush=True)
    time.sleep(30)
"""


def _token_command(tmp_path: Path, mode: str, **extra: Any) -> tuple[dict[str, Any], Path]:
    """OAUTHBEARER settings whose token command writes its pid into ``runs`` (returned) and
    answers as ``mode`` says: tokens cmd-T0ken-1, cmd-T0ken-2 ..."""
    script, runs = tmp_path / "token.py", tmp_path / "runs"
    script.write_text(TOKEN_SCRIPT)
    settings = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "OAUTHBEARER",
        "token_command": [sys.executable, "-S", str(script), str(runs), mode],
        **extra,
    }
    return settings, runs


def _runs(runs: Path) -> int:
    return len(runs.read_text().split()) if runs.exists() else 0


@pytest.mark.parametrize(
    ("mode", "extra"), [("json", {}), ("bare", {"token_ttl": "300ms"})], ids=["json", "bare"]
)
async def test_a_token_command_runs_once_for_many_callers_and_again_before_expiry(
    tmp_path: Path, mode: str, extra: dict[str, Any]
) -> None:
    settings, runs = _token_command(tmp_path, mode, **extra)
    auth = KafkaSettings.model_validate(settings)
    options = oauth_kafka_options(auth, "Kafka bus")
    provider = options.pop("sasl_oauth_token_provider")
    assert options["sasl_mechanism"] == "OAUTHBEARER"
    assert isinstance(provider, AbstractTokenProvider)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        tokens = await asyncio.gather(*(provider.token() for _ in range(20)))
    finally:
        ticker.cancel()
    assert set(tokens) == {"cmd-T0ken-1"} and _runs(runs) == 1
    assert ticks >= 2  # the loop ran on while the interpreter started: nothing blocked it
    assert await provider.token() == "cmd-T0ken-1" and _runs(runs) == 1  # cached
    # Lifetime 0.3 s (expires_in, or token_ttl for a bare token): renewed at 90 % of it.
    await asyncio.sleep(0.3)
    tokens = await asyncio.gather(*(provider.token() for _ in range(5)))
    assert set(tokens) == {"cmd-T0ken-2"} and _runs(runs) == 2
    AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **oauth_kafka_options(auth, "k"))


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "exited with status 3: vault: permission denied for ***"),
        ("empty", "printed no token"),
        ("slow", "gave no token within 1s: waiting for the vault"),
    ],
)
async def test_a_failing_token_command_says_why_without_the_token(
    tmp_path: Path, mode: str, message: str
) -> None:
    settings, runs = _token_command(tmp_path, mode)
    auth = KafkaSettings.model_validate(settings)
    provider = oauth_kafka_options(auth, "Kafka bus", timeout=1)["sasl_oauth_token_provider"]
    failures = await asyncio.gather(*(provider.token() for _ in range(5)), return_exceptions=True)
    assert _runs(runs) == 1  # the callers waiting for the run share its failure
    error = failures[0]
    assert isinstance(error, TokenError) and error.retryable
    assert str(error).startswith(f"Kafka bus: token_command {sys.executable!r} ")
    assert str(error).endswith(message)
    assert "cmd-T0ken" not in str(error)
    assert all(f is error for f in failures)
    (pid,) = runs.read_text().split()
    assert not psutil.pid_exists(int(pid))  # a command past its time is killed
    with pytest.raises(ConnectionError, match="token_command"):  # a source retries, later
        async with start_refusals():
            raise error


_BEARER = ("security_protocol: SASL_SSL", "sasl_mechanism: OAUTHBEARER")
_OAUTH2 = "oauth2: {token_url: 'https://idp.test/t', client_id: c, client_secret: s}"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            (*_BEARER, _OAUTH2, "token_command: [x]"),
            "3: bus.kafka: Value error, sasl_mechanism OAUTHBEARER takes exactly one of oauth2 "
            "and token_command (got both)",
        ),
        (
            _BEARER,
            "3: bus.kafka: Value error, sasl_mechanism OAUTHBEARER takes exactly one of oauth2 "
            "and token_command",
        ),
        (
            (*_BEARER, "token_command: []"),
            "6: bus.kafka.token_command: Tuple should have at least 1 item after validation, not 0",
        ),
        (
            (*_BEARER, "token_command: get-token --kafka"),
            "6: bus.kafka.token_command: Value error, write the command as a list of arguments, "
            "as [vault, read, -field=token, kafka/creds]: it runs without a shell",
        ),
        (
            (
                "security_protocol: SASL_SSL",
                "sasl_mechanism: PLAIN",
                "username: u",
                "password: p",
                "token_command: [x]",
            ),
            "3: bus.kafka: Value error, token_command goes with sasl_mechanism OAUTHBEARER",
        ),
        (
            (*_BEARER, _OAUTH2, "token_ttl: 5m"),
            "3: bus.kafka: Value error, token_ttl goes with token_command",
        ),
    ],
)
def test_token_command_settings_name_file_line_and_field(
    tmp_path: Path, lines: tuple[str, ...], message: str
) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("bus:\n  backend: kafka\n  kafka:\n" + "".join(f"    {x}\n" for x in lines))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert str(info.value) == f"{cfg}:{message}"


def test_every_kafka_connection_runs_the_token_command(tmp_path: Path) -> None:
    """The bus, the source (and so kafka_ingest) and the target build their token provider
    from the shared block: a program that does not exist stops each, naming it."""
    missing = str(tmp_path / "no-such-program")
    auth: dict[str, Any] = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "OAUTHBEARER",
        "token_command": [missing, "--kafka"],
    }
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(
        "kafka_ingest:\n  bootstrap_servers: h:9092\n  topics: [a]\n"
        f"  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: OAUTHBEARER\n"
        f"  token_command: [{missing}, --kafka]\n  token_ttl: 10m\n"
    )
    ingest = load_settings(cfg, env={}).kafka_ingest
    assert ingest is not None and ingest.token_command == (missing, "--kafka")
    assert ingest.token_ttl == 600.0
    bus = KafkaBusConfig(
        bootstrap_servers="h:9092",
        topic="t",
        partitions=1,
        auth=KafkaSettings.model_validate(auth),
    )
    source = {"name": "kin", "type": "kafka", "bootstrap_servers": "h:9092", "topics": ["a"]}
    target = {"name": "k", "bootstrap_servers": "h:9092", "topic": "t"}
    builds = {
        "Kafka bus": lambda: open_bus(bus),
        "kafka source 'kin'": lambda: build_source({**source, **auth}),
        "Kafka target 'k'": lambda: KafkaTarget(KafkaTargetSpec.model_validate({**target, **auth})),
    }
    for where, build in builds.items():
        with pytest.raises(ConfigError) as info:
            build()
        assert str(info.value) == f"{where}: token_command {missing!r}: no such executable program"
