"""TLS: the one block every client connection takes (bus, sources, targets, database), and the
one place an ``ssl.SSLContext`` is built from it.

Where it sits: below the pipeline, with the other settings. Each connector or setting that
connects somewhere has an optional ``tls`` field of this shape::

    tls:
      ca: /etc/eventbus/ca.pem          # CA bundle to verify the server (default: the system's)
      cert: /etc/eventbus/client.pem    # client certificate, for mutual TLS
      key: /etc/eventbus/client.key     # its private key: a path, or {env: NAME} / {file: PATH}
      key_password: {env: KEY_PASS}     # when the key is encrypted
      server_name: broker.internal      # the name to verify (and send as SNI) instead of the host
      insecure_skip_verify: false       # true: accept any certificate (logged loudly)

The context is built when the adapter is built, so a missing or unreadable file is a
``ConfigError`` at start-up naming the connection and the field, not a failure per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from eventbus._errors import ConfigError
from eventbus.config._secrets import Secret, validate_secret

__all__ = ["TlsSpec", "refuse_nats_plaintext", "tls_reason", "tls_refusal"]

log = logging.getLogger("eventbus.config")


class _ServerNameContext(ssl.SSLContext):
    """A client context that verifies (and sends as SNI) ``server_name`` instead of the host the
    client connects to, whichever library opens the connection: every asyncio client wraps its
    socket through ``wrap_bio``, blocking ones through ``wrap_socket``."""

    server_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if not server_side and self.server_name is not None:
            server_hostname = self.server_name
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if not kwargs.get("server_side") and self.server_name is not None:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


class TlsSpec(BaseModel):
    """The ``tls`` block of a connection (see the module docstring)."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )

    ca: Path | None = None
    cert: Path | None = None
    key: Path | Secret | None = None
    key_password: Secret | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False

    @field_validator("key", mode="before")
    @classmethod
    def _key_form(cls, value: Any, info: ValidationInfo) -> Any:
        # A plain string is a path (as for ca and cert); a reference is the PEM text itself.
        # Each is made here, as its form says: left to the union, a reference whose file
        # could not be read was an error for each of its members, the first one pydantic's
        # schema of a path.
        if isinstance(value, str):
            return Path(value)
        if isinstance(value, Mapping):
            return validate_secret(value, info)
        if value is None or isinstance(value, Path | Secret):
            return value
        raise ValueError("write a path, {env: NAME} or {file: PATH}")

    @model_validator(mode="after")
    def _pairs(self) -> TlsSpec:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (mutual TLS needs both)")
        if self.key_password is not None and self.key is None:
            raise ValueError("key_password needs a key")
        return self

    def context(self, where: str) -> ssl.SSLContext:
        """A client context for the connection ``where`` names (for messages).

        Raises ConfigError naming ``where`` and the field when a file cannot be read or is not
        what it should be. Logs a warning when ``insecure_skip_verify`` is on.
        """
        ctx = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.server_name = self.server_name
        try:
            if self.ca is not None:
                ctx.load_verify_locations(cafile=str(self.ca))
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}: tls.ca {self.ca}: {_reason(exc)}") from exc
        if self.cert is not None:
            self._load_chain(ctx, where)
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            log.warning(
                "%s: TLS CERTIFICATE VERIFICATION IS OFF (tls.insecure_skip_verify): anyone "
                "between eventbus and the server can read and change the traffic",
                where,
            )
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext, where: str) -> None:
        # Never None: OpenSSL then asks for an encrypted key's passphrase on the terminal, and
        # the start waited for it for ever (or failed with "Invalid argument" without one).
        password: str | Callable[[], str] = (
            _no_key_password if self.key_password is None else self.key_password.reveal()
        )
        key = self.key
        try:
            if isinstance(key, Secret):
                # ssl loads keys from files only: the PEM text goes to a private temporary
                # file for the moment it takes to load it.
                with tempfile.TemporaryDirectory(prefix="eventbus-tls-") as tmp:
                    path = os.path.join(tmp, "key.pem")
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(key.reveal())
                    ctx.load_cert_chain(str(self.cert), path, password)
            else:
                ctx.load_cert_chain(str(self.cert), None if key is None else str(key), password)
        except _EncryptedKey:
            shown = key.origin if isinstance(key, Secret) else key
            raise ConfigError(
                f"{where}: tls.key {shown} is encrypted: give its passphrase as tls.key_password"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            shown = key.origin if isinstance(key, Secret) else key
            reason = _reason(exc)
            if self.key_password is not None and "PEM lib" in str(exc):
                reason = (
                    "the cert and key do not load with tls.key_password (a wrong passphrase, or "
                    "a file that is not PEM)"
                )
            raise ConfigError(f"{where}: tls.cert {self.cert} / tls.key {shown}: {reason}") from exc


class _EncryptedKey(Exception):
    """The key is encrypted and no passphrase was given."""


def _no_key_password() -> str:
    raise _EncryptedKey


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


async def tls_refusal(host: str, port: int, context: ssl.SSLContext) -> str | None:
    """Why a TLS session with ``host:port`` under ``context`` fails, or None when it does not
    (or when the server cannot be reached at all, which is not TLS's doing).

    For the clients that report only "cannot connect" (aiokafka's bootstrap, say): a failed
    verification names what failed, and a server refusing the client's certificate is caught
    too, although under TLS 1.3 it says so only after the client's side of the handshake is
    done (its alert is read here for a moment after the handshake).
    """
    try:
        async with asyncio.timeout(_HANDSHAKE_WAIT):
            plain = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return None  # not reached at all
    plain[1].close()
    try:
        async with asyncio.timeout(_HANDSHAKE_WAIT):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError as exc:
        return tls_reason(exc)
    except TimeoutError:
        # reached, and silent: a listener without TLS waits for a request it can read (an
        # SSL client on a Kafka plaintext port showed only "Unable to bootstrap")
        return (
            f"no answer to the TLS handshake within {_HANDSHAKE_WAIT:g} s: is this a port "
            "without TLS?"
        )
    except OSError:
        return None
    try:
        async with asyncio.timeout(_ALERT_WAIT):
            if not await reader.read(1):
                return "the server closed the connection right after the TLS handshake"
    except ssl.SSLError as exc:
        return tls_reason(exc)
    except ConnectionError:
        return "the server reset the connection right after the TLS handshake"
    except TimeoutError:
        pass  # nothing said: the session stands (Kafka brokers never speak first)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(_ALERT_WAIT):  # (asyncio's own: 30 s)
                await writer.wait_closed()
    return None


async def refuse_nats_plaintext(servers: str | Sequence[str], where: str) -> None:
    """Refuse NATS servers that would take a connection meant to be TLS in clear.

    nats-py (2.16) starts TLS only when the server's INFO says ``tls_required``, even for a
    ``tls://`` URL or a connection given a TLS context: a server without TLS (misconfigured,
    or not the one meant) got the CONNECT, password included, in plain text. Each server is
    asked for its INFO first (all at once); one that answers it without ``tls_required`` is
    refused, and so is a ``ws://`` URL (a websocket that nats-py never upgrades); ``wss://``
    is TLS from the start and not asked. (nats-py fixed this after 2.16,
    nats-io/nats.py#912: its reconnects to a server are not checked here.) A server that
    cannot be reached or says nothing (one that expects TLS first) is left to the client.
    Raises PermissionError naming ``where`` and the server.
    """
    urls = [servers] if isinstance(servers, str) else list(servers)
    probed: list[tuple[str, int]] = []
    for url in (u.strip() for joined in urls for u in joined.split(",") if u.strip()):
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if parts.scheme == "wss" or parts.hostname is None:
            continue
        if parts.scheme == "ws":
            raise PermissionError(
                f"{where}: {parts.hostname}: a ws:// URL carries no TLS, though TLS is "
                "configured for it: use wss://"
            )
        probed.append((parts.hostname, parts.port or 4222))
    refusals = await asyncio.gather(*(_plain_nats(host, port) for host, port in probed))
    for (host, port), plain in zip(probed, refusals, strict=True):
        if plain:
            raise PermissionError(
                f"{where}: the NATS server at {host}:{port} does not require TLS, though TLS "
                "is configured for it (a tls block or a tls:// URL): not connecting, so the "
                "credentials and events are not sent in clear (enable TLS on the server)"
            )


async def _plain_nats(host: str, port: int) -> bool:
    """Whether the server at ``host:port`` greets with an INFO that does not require TLS."""
    try:
        async with asyncio.timeout(_HANDSHAKE_WAIT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):
        return False
    if not line.startswith(b"INFO "):
        return False
    try:
        info = json.loads(line[5:])
    except ValueError:
        return False
    return isinstance(info, dict) and not info.get("tls_required")


_HANDSHAKE_WAIT = 2.0
_ALERT_WAIT = 0.5
"""How long :func:`tls_refusal` waits for the handshake, then listens for the server's alert."""


def tls_reason(exc: ssl.SSLError) -> str:
    """What a TLS error says, as people read it: the certificate check that failed, or the
    alert the server sent (``tlsv13 alert certificate required``)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        # TLSV13_ALERT_CERTIFICATE_REQUIRED -> "tlsv13 alert certificate required"
        return exc.reason.lower().replace("_", " ")
    return str(exc)
