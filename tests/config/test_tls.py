"""The tls block: one SSLContext builder for every client, checked by real TLS handshakes against
a server of the test's own (certificates from trustme)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from eventbus._errors import ConfigError
from eventbus.config import TlsSpec
from tests.fixtures.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[tuple[int, list[str | None]]]:
    """A TLS echo server requiring a client certificate; yields its port and the subjects of the
    client certificates it saw."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.append(None if peer is None else str(peer.get("subjectAltName")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    yield port, seen
    server.close()
    await server.wait_closed()


async def _handshake(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    try:
        return await reader.read(2)
    finally:
        writer.close()


async def test_mutual_tls_with_the_right_ca(
    pki: Pki, tls_server: tuple[int, list[str | None]]
) -> None:
    port, seen = tls_server
    spec = TlsSpec(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    assert await _handshake(port, spec.context("test")) == b"ok"
    assert seen and "eventbus-client@example.test" in str(seen[0])


async def test_another_ca_is_refused(pki: Pki, tls_server: tuple[int, list[str | None]]) -> None:
    port, _ = tls_server
    spec = TlsSpec(ca=pki.other_ca, cert=pki.client_cert, key=pki.client_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(port, spec.context("test"))


async def test_server_name_replaces_the_host_in_verification(
    pki: Pki, tls_server: tuple[int, list[str | None]]
) -> None:
    port, _ = tls_server
    good = TlsSpec(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, server_name="broker.test")
    assert await _handshake(port, good.context("test")) == b"ok"
    bad = TlsSpec(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, server_name="elsewhere.test")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"elsewhere\.test"):
        await _handshake(port, bad.context("test"))


async def test_a_key_from_the_environment_is_loaded(
    pki: Pki, tls_server: tuple[int, list[str | None]]
) -> None:
    port, _ = tls_server
    spec = TlsSpec.model_validate(
        {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": {"env": "CLIENT_KEY"}},
        context={"env": {"CLIENT_KEY": pki.client_key.read_text()}},
    )
    assert await _handshake(port, spec.context("test")) == b"ok"
    assert "PRIVATE KEY" not in repr(spec) and "PRIVATE KEY" not in spec.model_dump_json()


async def test_insecure_skip_verify_connects_and_warns_loudly(
    pki: Pki, tls_server: tuple[int, list[str | None]], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = tls_server
    spec = TlsSpec(
        ca=pki.other_ca, cert=pki.client_cert, key=pki.client_key, insecure_skip_verify=True
    )
    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        ctx = spec.context("NATS target 'x'")
    assert await _handshake(port, ctx) == b"ok"
    assert any(
        "NATS target 'x': TLS CERTIFICATE VERIFICATION IS OFF" in r.getMessage()
        for r in caplog.records
    )


def test_unreadable_files_name_the_connection_and_field(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^Kafka bus: tls.ca /nope/ca.pem: No such file"):
        TlsSpec(ca=Path("/nope/ca.pem")).context("Kafka bus")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^db: tls.cert .*garbage.pem / tls.key .*client.key"):
        TlsSpec(cert=garbage, key=pki.client_key).context("db")
    with pytest.raises(ConfigError, match=r"tls.key env K"):
        TlsSpec.model_validate(
            {"cert": str(pki.client_cert), "key": {"env": "K"}}, context={"env": {"K": "junk"}}
        ).context("x")


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ({"file": "/nope/eb.key"}, "cannot read /nope/eb.key: No such file or directory"),
        ({"env": "NOPE_KEY"}, "environment variable NOPE_KEY is not set"),
        (5, "write a path, {env: NAME} or {file: PATH}"),
    ],
)
def test_a_key_that_cannot_be_read_is_one_error(key: object, reason: str) -> None:
    # a path or a reference: the union of the two reported an error for each member, the
    # first pydantic's schema of a path ("lax-or-strict[lax=union[json-or-python[...")
    with pytest.raises(ValidationError) as info:
        TlsSpec.model_validate({"cert": "/c.pem", "key": key}, context={"env": {}})
    (error,) = info.value.errors()
    assert error["loc"] == ("key",) and reason in error["msg"], error


def test_incomplete_blocks_are_refused() -> None:
    with pytest.raises(ValidationError, match="cert and key go together"):
        TlsSpec(cert=Path("/c.pem"))
    with pytest.raises(ValidationError, match="key_password needs a key"):
        TlsSpec.model_validate({"key_password": "x"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        TlsSpec.model_validate({"verify": False})


def test_an_encrypted_key_needs_its_passphrase_and_the_right_one(pki: Pki, tmp_path: Path) -> None:
    # without key_password OpenSSL asked for it on the terminal: the start waited for ever
    # (or, with no terminal, failed with "Invalid argument"); a wrong one said "PEM lib"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    encrypted = tmp_path / "client-enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"the passphrase"),
        )
    )
    spec = TlsSpec(cert=pki.client_cert, key=encrypted)
    with pytest.raises(ConfigError, match=r"client-enc.key is encrypted: give its passphrase"):
        spec.context("NATS target 'out'")
    wrong = TlsSpec.model_validate(
        {"cert": str(pki.client_cert), "key": str(encrypted), "key_password": "not it"}
    )
    with pytest.raises(ConfigError, match=r"do not load with tls\.key_password \(a wrong pass"):
        wrong.context("NATS target 'out'")
    right = TlsSpec.model_validate(
        {"cert": str(pki.client_cert), "key": str(encrypted), "key_password": "the passphrase"}
    )
    right.context("NATS target 'out'")
