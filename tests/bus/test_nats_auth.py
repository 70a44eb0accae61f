"""Every NATS connection authenticates the same way (``eventbus.config.NatsAuth``): the bus, the
``nats``/``jetstream`` sources and the NATS target, each against real nats-servers of the test's
own: one with mutual TLS and an ``authorization`` block of a user/password and an NKey user, one
with a token, one in operator mode (JWTs generated here, a ``.creds`` file). The right secret
connects; a wrong one fails with an error naming the connection and never quoting the secret."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nacl.signing
import nkeys
import psutil
import pytest

import eventbus.sources  # noqa: F401  (registers every connector type)
from eventbus._errors import BusError, BusUnavailable, ConfigError
from eventbus.bus import NatsBusConfig, open_bus
from eventbus.config import NatsSettings, refuse_nats_plaintext
from eventbus.sources import SourceStatus, build_source
from eventbus.targets import NatsTarget, NatsTargetSpec
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.nats import configured_nats_server, unique_name
from tests.sources._harness import Recorder, eventually, make_context, running, source_pool

PASSWORD = "n4ts-Passw0rd-alice"
TOKEN = "n4ts-T0ken-xyz"


def new_nkey(prefix: int) -> tuple[str, str]:
    """A new NKey: (seed, public key)."""
    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), prefix).decode()
    return seed, nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


USER_SEED, USER_PUBLIC = new_nkey(nkeys.PREFIX_BYTE_USER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def secured(tmp_path: Path, pki: Pki) -> AsyncIterator[int]:
    """Mutual TLS required; a password user and an NKey user; JetStream on."""
    config = f"""
jetstream {{ store_dir: "{{store}}" }}
tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", ca_file: "{pki.ca}",
      verify: true }}
authorization {{ users: [ {{user: alice, password: "{PASSWORD}"}}, {{nkey: {USER_PUBLIC}}} ] }}
"""
    async with configured_nats_server(tmp_path / "secured", config) as port:
        yield port


@pytest.fixture
async def with_token(tmp_path: Path) -> AsyncIterator[int]:
    async with configured_nats_server(
        tmp_path / "token", f'authorization {{ token: "{TOKEN}" }}'
    ) as port:
        yield port


def _tls(pki: Pki) -> dict[str, str]:
    return {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}


def _bus_config(port: int, auth: dict[str, Any]) -> NatsBusConfig:
    stream = unique_name("S")
    return NatsBusConfig(
        url=f"nats://127.0.0.1:{port}",
        stream=stream,
        subject=f"{stream}.events",
        durable=unique_name("d"),
        connect_timeout=3.0,
        auth=NatsSettings.model_validate({"url": f"nats://127.0.0.1:{port}", **auth}),
    )


def _event(i: int = 0) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "/t", "type": "t"}


@pytest.mark.parametrize(
    "auth",
    [{"user": "alice", "password": PASSWORD}, {"nkey_seed": USER_SEED}],
    ids=["password", "nkey"],
)
async def test_the_bus_connects_with_tls_and_credentials(
    secured: int, pki: Pki, auth: dict[str, Any]
) -> None:
    async with open_bus(_bus_config(secured, {**auth, "tls": _tls(pki)})) as bus:
        await bus.publish(_event())
        assert await bus.ping()


async def test_the_bus_refuses_a_wrong_password_naming_the_server(
    secured: int, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-" + PASSWORD
    with pytest.raises(BusError) as info:
        async with open_bus(
            _bus_config(secured, {"user": "alice", "password": wrong, "tls": _tls(pki)})
        ):
            pass
    message = str(info.value)
    assert f"NATS connect to nats://127.0.0.1:{secured} failed" in message
    assert "authorization violation" in message.lower()
    assert wrong not in message and wrong not in caplog.text and PASSWORD not in caplog.text


async def test_the_bus_without_a_client_certificate_is_refused(secured: int, pki: Pki) -> None:
    auth = {"user": "alice", "password": PASSWORD, "tls": {"ca": str(pki.ca)}}
    with pytest.raises(BusError, match=f"NATS connect to nats://127.0.0.1:{secured} failed"):
        async with open_bus(_bus_config(secured, auth)):
            pass


async def test_a_certificate_from_another_ca_is_named_not_a_timeout(
    secured: int, pki: Pki, tmp_path: Path
) -> None:
    # The failed handshake was only a TimeoutError() after the connect timeout.
    other = make_pki(tmp_path / "other")
    auth = {"user": "alice", "password": PASSWORD, "tls": {**_tls(pki), "ca": str(other.ca)}}
    with pytest.raises(BusError, match="certificate verify failed"):
        async with open_bus(_bus_config(secured, auth)):
            pass
    async with _target(secured, auth) as target:
        outcome = await _publish(target)
        assert not outcome.delivered, outcome
        assert "certificate verify failed" in (outcome.error or ""), outcome
        # Again: the failed connect's close waited for ever (a TLS transport that never
        # closed), and every later attempt joined it and timed out, the server fixed or not.
        started = time.monotonic()
        again = await _publish(target)
        assert "certificate verify failed" in (again.error or ""), again
        assert time.monotonic() - started < 2.5, again  # not the 3 s timeout


def _target(port: int, auth: dict[str, Any]) -> NatsTarget:
    spec = NatsTargetSpec.model_validate(
        {"name": "out", "url": f"nats://127.0.0.1:{port}", "subject": "out.x", "timeout": 3, **auth}
    )
    return NatsTarget(spec)


async def _publish(target: NatsTarget) -> Any:
    return await target.deliver(_event(), _event(), is_cloudevent=True, attempt=1)


@pytest.mark.parametrize(
    ("auth", "delivered"),
    [
        ({"user": "alice", "password": PASSWORD}, True),
        ({"nkey_seed": USER_SEED}, True),
        ({"user": "alice", "password": "wrong-password"}, False),
        ({"nkey_seed": new_nkey(nkeys.PREFIX_BYTE_USER)[0]}, False),
    ],
    ids=["password", "nkey", "wrong-password", "unknown-nkey"],
)
async def test_the_target_over_mutual_tls(
    secured: int, pki: Pki, auth: dict[str, Any], delivered: bool
) -> None:
    async with _target(secured, {**auth, "tls": _tls(pki)}) as target:
        outcome = await _publish(target)
    assert outcome.delivered is delivered, outcome.error
    if not delivered:
        assert not outcome.retryable
        assert outcome.error.startswith("NATS authorization failed")
        assert "wrong-password" not in outcome.error and "SU" not in outcome.error


async def test_the_target_with_a_token(with_token: int) -> None:
    async with _target(with_token, {"token": TOKEN}) as target:
        assert (await _publish(target)).delivered
    async with _target(with_token, {"token": "not-the-token"}) as target:
        outcome = await _publish(target)
    assert not outcome.delivered and "not-the-token" not in (outcome.error or "")


async def test_the_sources_connect_with_credentials(
    secured: int, pki: Pki, database_dsn: str
) -> None:
    url = f"nats://127.0.0.1:{secured}"
    recorder = Recorder()
    spec = {
        "name": "in",
        "type": "nats",
        "url": url,
        "subjects": ["in.>"],
        "nkey_seed": USER_SEED,
        "tls": _tls(pki),
    }
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "in", recorder)
        async with running(build_source(spec), ctx):
            await eventually(lambda: _running(ctx.status))
            async with _target(
                secured, {"user": "alice", "password": PASSWORD, "tls": _tls(pki)}
            ) as t:
                outcome = await t.deliver(_event(7), _event(7), is_cloudevent=True, attempt=1)
            assert outcome.delivered
        wrong = {**spec, "name": "in-wrong", "nkey_seed": new_nkey(nkeys.PREFIX_BYTE_USER)[0]}
        bad_ctx = make_context(pool, "in-wrong", Recorder())
        async with running(build_source(wrong), bad_ctx):
            await eventually(lambda: _backing_off(bad_ctx.status))
    assert bad_ctx.status.last_error is not None
    assert "authorization violation" in bad_ctx.status.last_error.lower()
    assert wrong["nkey_seed"] not in bad_ctx.status.last_error


async def test_a_jetstream_source_with_a_password_over_mutual_tls(
    secured: int, pki: Pki, database_dsn: str
) -> None:
    """The stream the bus (password, TLS) writes is read by a jetstream source (password,
    TLS); a wrong password backs off saying why."""
    config = _bus_config(secured, {"user": "alice", "password": PASSWORD, "tls": _tls(pki)})
    spec = {
        "name": "js-in",
        "type": "jetstream",
        "url": f"nats://127.0.0.1:{secured}",
        "stream": config.stream,
        "user": "alice",
        "password": {"env": "EB_TEST_NATS_PW"},
        "tls": _tls(pki),
    }
    recorder = Recorder()
    async with open_bus(config) as bus, source_pool(database_dsn) as pool:
        await bus.publish(_event(3))
        ctx = make_context(pool, "js-in", recorder)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("EB_TEST_NATS_PW", PASSWORD)
            source = build_source(spec)
        async with running(source, ctx):
            [got] = await recorder.wait_for(1)
        wrong = {**spec, "name": "js-wrong", "password": "not-" + PASSWORD}
        bad_ctx = make_context(pool, "js-wrong", Recorder())
        async with running(build_source(wrong), bad_ctx):
            await eventually(lambda: _backing_off(bad_ctx.status))
    assert got["id"] == "e3"
    assert "authorization violation" in (bad_ctx.status.last_error or "").lower()
    assert PASSWORD not in (bad_ctx.status.last_error or "")


async def test_a_nats_source_with_a_token(with_token: int, database_dsn: str) -> None:
    spec = {
        "name": "tok-in",
        "type": "nats",
        "url": f"nats://127.0.0.1:{with_token}",
        "subjects": ["out.>"],
        "token": TOKEN,
    }
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "tok-in", recorder)
        async with running(build_source(spec), ctx):
            await eventually(lambda: _running(ctx.status))
            async with _target(with_token, {"token": TOKEN}) as target:
                assert (await _publish(target)).delivered
            [got] = await recorder.wait_for(1)
        wrong = {**spec, "name": "tok-wrong", "token": "not-the-token"}
        bad_ctx = make_context(pool, "tok-wrong", Recorder())
        async with running(build_source(wrong), bad_ctx):
            await eventually(lambda: _backing_off(bad_ctx.status))
    assert got["id"] == "e0"
    assert "not-the-token" not in (bad_ctx.status.last_error or "")
    assert "authorization violation" in (bad_ctx.status.last_error or "").lower()


async def _running(status: SourceStatus) -> bool:
    return status.state == "running"


async def _backing_off(status: SourceStatus) -> bool:
    return status.state == "backoff"


@pytest.mark.parametrize("meant", ["tls block", "tls:// URL"])
async def test_a_server_without_tls_gets_no_credentials_when_tls_is_configured(
    with_token: int, pki: Pki, database_dsn: str, meant: str
) -> None:
    # nats-py starts TLS only when the server asks for it: this server does not, and took the
    # token in plain text from a connection configured for TLS (and the bus ran on it).
    tls = {"tls": {"ca": str(pki.ca)}} if meant == "tls block" else {}
    url = f"{'nats' if tls else 'tls'}://127.0.0.1:{with_token}"
    refused = f"the NATS server at 127.0.0.1:{with_token} does not require TLS"
    config = _bus_config(with_token, {"token": TOKEN, **tls})
    config = dataclasses.replace(config, url=url)
    with pytest.raises(BusError, match=refused) as info:
        async with open_bus(config):
            pass
    assert TOKEN not in str(info.value)
    spec = {"name": "out", "url": url, "subject": "out.x", "timeout": 3, "token": TOKEN, **tls}
    async with NatsTarget(NatsTargetSpec.model_validate(spec)) as target:
        outcome = await _publish(target)
    assert not outcome.delivered and not outcome.retryable
    assert refused in (outcome.error or "")
    source = {"name": "in", "type": "nats", "url": url, "subjects": ["in"], "token": TOKEN, **tls}
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "in", Recorder())
        async with running(build_source(source), ctx):
            await eventually(lambda: _backing_off(ctx.status))
    assert refused in (ctx.status.last_error or "")


async def test_websocket_urls_under_tls_are_not_probed_as_nats_ports(with_token: int) -> None:
    # wss:// was probed on port 4222 (a plain NATS port there refused a sound connection);
    # ws:// was let through, and nats-py never starts TLS on it.
    with pytest.raises(PermissionError, match="a ws:// URL carries no TLS"):
        await refuse_nats_plaintext("ws://127.0.0.1:8080", "NATS target t")
    await refuse_nats_plaintext(f"wss://127.0.0.1:{with_token}", "NATS target t")  # no probe
    with pytest.raises(PermissionError, match=f"127.0.0.1:{with_token} does not require TLS"):
        await refuse_nats_plaintext(
            [f"wss://127.0.0.1:{with_token}", f"nats://127.0.0.1:{with_token}"], "t"
        )


def test_credentials_are_one_way_in_and_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose one way to authenticate, not user and token"):
        build_source(
            {
                "name": "s",
                "type": "nats",
                "url": "nats://h:1",
                "subjects": ["a"],
                "user": "u",
                "password": "p",
                "token": "t",
            }
        )
    with pytest.raises(ConfigError, match="user and password go together"):
        build_source(
            {"name": "s", "type": "jetstream", "url": "nats://h:1", "stream": "S", "user": "u"}
        )
    with pytest.raises(ConfigError, match=r"'nkey_seed': Value error, not an NKey seed") as info:
        build_source(
            {
                "name": "s",
                "type": "nats",
                "url": "nats://h:1",
                "subjects": ["a"],
                "nkey_seed": "SUnot-a-seed-at-all",
            }
        )
    assert "SUnot" not in str(info.value) and "SUnot" not in str(info.value.__cause__)
    spec = NatsTargetSpec(name="t", url="nats://h:1", subject="s", creds=tmp_path / "no.creds")
    with pytest.raises(ConfigError, match=r"NATS target 't': creds .*no\.creds: No such file"):
        NatsTarget(spec)
    # a file that is no creds file: the service started, then every connection failed with a
    # TypeError, or as "Authorization Violation", naming no file
    jwt_only = (
        "-----BEGIN NATS USER JWT-----\neyJhbGciOi.eyJqdGkiOi.c2ln\n------END NATS USER JWT------\n"
    )
    for text, said in (
        ("garbage\n", "no user JWT"),
        (jwt_only, "no user seed"),
    ):
        (tmp_path / "wrong.creds").write_text(text)
        spec = NatsTargetSpec(
            name="t", url="nats://h:1", subject="s", creds=tmp_path / "wrong.creds"
        )
        with pytest.raises(ConfigError, match=rf"creds .*wrong\.creds holds {said}") as info:
            NatsTarget(spec)
        assert "nsc" in str(info.value)


# --- operator mode: JWTs and a .creds file ---------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: dict[str, Any], signer_seed: str) -> str:
    claims = {**claims, "iat": int(time.time())}
    body = json.dumps(claims, separators=(",", ":")).encode()
    claims["jti"] = base64.b32encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    kp = nkeys.from_seed(bytearray(signer_seed.encode()))
    return f"{header}.{payload}.{_b64(kp.sign(f'{header}.{payload}'.encode()))}"


@pytest.fixture
async def operator_mode(tmp_path: Path) -> AsyncIterator[tuple[int, Path, Path]]:
    """A server trusting one operator; yields its port, a valid .creds file and one of a user
    the account never signed."""
    op_seed, op_pub = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    acc_seed, acc_pub = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user_pub = new_nkey(nkeys.PREFIX_BYTE_USER)
    _, sys_pub = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream wants a system account
    limits = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "conn": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "leaf": -1,
        # JetStream for the bus: unlimited storage, streams and consumers
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    }
    operator = _jwt(
        {"iss": op_pub, "sub": op_pub, "name": "op", "nats": {"type": "operator", "version": 2}},
        op_seed,
    )
    account = _jwt(
        {
            "iss": op_pub,
            "sub": acc_pub,
            "name": "acc",
            "nats": {"type": "account", "version": 2, "limits": limits},
        },
        op_seed,
    )
    user_claims = {
        "iss": acc_pub,
        "sub": user_pub,
        "name": "eventbus",
        "nats": {
            "type": "user",
            "version": 2,
            "pub": {},
            "sub": {},
            "subs": -1,
            "data": -1,
            "payload": -1,
        },
    }

    def creds(path: Path, jwt: str, seed: str) -> Path:
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
        return path

    good = creds(tmp_path / "good.creds", _jwt(user_claims, acc_seed), user_seed)
    # Signed by an account the operator does not know.
    rogue_seed, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    bad = creds(tmp_path / "bad.creds", _jwt(user_claims, rogue_seed), user_seed)
    system = _jwt(
        {"iss": op_pub, "sub": sys_pub, "name": "SYS", "nats": {"type": "account", "version": 2}},
        op_seed,
    )
    config = f"""
jetstream {{ store_dir: "{{store}}" }}
operator: "{operator}"
system_account: {sys_pub}
resolver: MEMORY
resolver_preload: {{ {acc_pub}: "{account}", {sys_pub}: "{system}" }}
"""
    async with configured_nats_server(tmp_path / "operator", config) as port:
        yield port, good, bad


async def test_the_target_with_a_creds_file(operator_mode: tuple[int, Path, Path]) -> None:
    port, good, bad = operator_mode
    async with _target(port, {"creds": str(good)}) as target:
        outcome = await _publish(target)
        assert outcome.delivered, outcome.error
    async with _target(port, {"creds": str(bad)}) as target:
        outcome = await _publish(target)
    assert not outcome.delivered and not outcome.retryable
    assert (outcome.error or "").startswith("NATS authorization failed"), outcome.error


async def test_the_bus_with_a_creds_file(operator_mode: tuple[int, Path, Path]) -> None:
    port, good, bad = operator_mode
    async with open_bus(_bus_config(port, {"creds": str(good)})) as bus:
        await bus.publish(_event())
        assert await bus.ping()
    with pytest.raises(BusError) as info:
        async with open_bus(_bus_config(port, {"creds": str(bad)})):
            pass
    assert f"NATS connect to nats://127.0.0.1:{port} failed" in str(info.value)
    assert "authorization violation" in str(info.value).lower()


async def test_a_failing_reconnect_says_why_once_not_every_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The server came back with another password under a connected bus: each reconnect (one
    # a second) was refused, and each refusal kept in a list for ever, unsaid (publishes:
    # "not connected").
    caplog.set_level(logging.WARNING)
    users = 'authorization {{ users: [ {{user: alice, password: "{}"}} ] }}'
    config = 'jetstream { store_dir: "{store}" }\n' + users.format(PASSWORD)
    async with configured_nats_server(tmp_path / "nats", config) as port:
        (first,) = [
            p
            for p in psutil.Process().children(recursive=True)
            if "nats-server" in p.name() and str(tmp_path) in " ".join(p.cmdline())
        ]
        async with open_bus(_bus_config(port, {"user": "alice", "password": PASSWORD})) as bus:
            await bus.publish(_event(1))
            conf = tmp_path / "nats" / "nats.conf"
            conf.write_text(conf.read_text().replace(PASSWORD, "changed-" + PASSWORD))
            first.terminate()
            first.wait(10)
            again = await asyncio.create_subprocess_exec(
                "nats-server", "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:

                async def refused() -> bool:
                    try:
                        await bus.publish(_event(2))
                    except BusUnavailable as exc:
                        return "authorization violation" in str(exc).lower()
                    return False

                await eventually(refused, within=20, what="a publish saying why")
                await asyncio.sleep(3)  # three more reconnects refused
            finally:
                again.terminate()
                await again.wait()
    said = [r.getMessage() for r in caplog.records if "(trying again)" in r.getMessage()]
    assert len(said) == 1 and "authorization violation" in said[0].lower(), said
    assert PASSWORD not in caplog.text
