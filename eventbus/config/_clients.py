"""How eventbus authenticates to the brokers it connects to: the credential fields shared by every
NATS connection (the bus, the ``nats`` and ``jetstream`` sources, the NATS target) and every
Kafka connection (the bus, ``kafka_ingest``, the Kafka source and target), and their
translation into the keyword arguments of the client library (nats-py, aiokafka); and the
OAuth 2.0 client-credentials block that HTTP targets and Kafka's OAUTHBEARER share (its
tokens are fetched by ``eventbus._oauth``, as are those of OAUTHBEARER's ``token_command``).

Where it sits: below the pipeline. Settings and connector specs inherit these fields, so the
YAML is the same wherever a connection is written; the adapters call ``nats_options`` /
``kafka_options`` and pass the result to the library. Nothing here imports a driver: the
options are plain keyword arguments.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from eventbus._errors import ConfigError
from eventbus.config._secrets import Secret
from eventbus.config._tls import TlsSpec
from eventbus.config._units import Duration

__all__ = ["KafkaAuth", "KafkaServers", "KafkaTopic", "NatsAuth", "OAuth2Spec"]

_NKEY_SEED = re.compile(r"S[A-Z][A-Z2-7]{56}")
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _kafka_topic(topic: str) -> str:
    if not _KAFKA_TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ValueError(f"a topic is 1-249 characters of A-Z a-z 0-9 . _ -: {topic!r}")
    return topic


def _kafka_servers(servers: str) -> str:
    # an empty entry ("a:9092,") was taken for the default, and a client asked ":9092" again
    # and again
    if not all(part.strip() for part in servers.split(",")):
        raise ValueError(f"must be host:port[,host:port...]: {servers!r}")
    return servers


KafkaTopic = Annotated[str, AfterValidator(_kafka_topic)]
"""A Kafka topic name, as the broker takes it (a source subscribed to another sat in
"starting" for ever, its client logging the refusal ten times a second)."""
KafkaServers = Annotated[str, AfterValidator(_kafka_servers)]
"""``bootstrap_servers``: ``host:port`` entries, comma-separated, none empty."""


class OAuth2Spec(BaseModel):
    """OAuth 2.0 client credentials (RFC 6749 section 4.4): where to get a token, as whom, for
    what; ``tls`` verifies the token endpoint."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )

    token_url: str = Field(pattern=r"^https?://")
    client_id: str = Field(min_length=1)
    client_secret: Secret
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    tls: TlsSpec | None = None

    @field_validator("token_url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        # The client authenticates with client_id and client_secret; a user and password in
        # the URL as well made every token request fail (two Authorization headers).
        if "@" in urlsplit(url).netloc:
            raise ValueError(
                "credentials in the token_url are not sent: the client_id and client_secret "
                "authenticate the request"
            )
        return url


class NatsAuth(BaseModel):
    """Credentials of a NATS connection: at most one of ``user``/``password``, ``token``,
    ``nkey_seed`` (an ``SU...`` seed) or ``creds`` (a ``.creds`` file: JWT and seed), plus an
    optional ``tls`` block (also for a ``tls://`` URL).

    Credentials in the URL (``nats://user:pass@host``) still work; these keep them out of it.
    """

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )

    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkey_seed: Secret | None = None
    creds: Path | None = None
    tls: TlsSpec | None = None

    @field_validator("nkey_seed")
    @classmethod
    def _a_seed(cls, seed: Secret | None) -> Secret | None:
        # Checked here so a mistake stops the start, not every connection attempt; the message
        # never quotes the value.
        if seed is not None and _NKEY_SEED.fullmatch(seed.reveal()) is None:
            raise ValueError("not an NKey seed (58 characters starting with S, as SUA...)")
        return seed

    @model_validator(mode="after")
    def _one_way_in(self) -> NatsAuth:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        given = [
            name
            for name, value in (
                ("user", self.user),
                ("token", self.token),
                ("nkey_seed", self.nkey_seed),
                ("creds", self.creds),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"choose one way to authenticate, not {' and '.join(given)}")
        return self

    def wants_tls(self, servers: str | Sequence[str]) -> bool:
        """Whether the connection to ``servers`` is meant to be TLS: a ``tls`` block, or a
        ``tls://`` URL among them."""
        urls = [servers] if isinstance(servers, str) else servers
        return self.tls is not None or any(
            u.strip().startswith("tls://") for joined in urls for u in joined.split(",")
        )

    def nats_options(self, where: str) -> dict[str, Any]:
        """nats-py ``connect`` keyword arguments for these credentials.

        Raises ConfigError naming ``where`` when the TLS files or the creds file cannot be read.
        """
        options: dict[str, Any] = {}
        if self.user is not None and self.password is not None:
            options["user"] = self.user
            options["password"] = self.password.reveal()
        if self.token is not None:
            options["token"] = self.token.reveal()
        if self.nkey_seed is not None:
            options["nkeys_seed_str"] = self.nkey_seed.reveal()
        if self.creds is not None:
            _check_creds(self.creds, where)
            options["user_credentials"] = str(self.creds)
        if self.tls is not None:
            options["tls"] = self.tls.context(where)
        return options


_CREDS_JWT = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s+[A-Za-z0-9_=-]+\.")
_CREDS_SEED = re.compile(r"-{3,}BEGIN USER NKEY SEED-{3,}\s+SU[A-Z2-7]{50,}")


def _check_creds(path: Path, where: str) -> None:
    """Raise ConfigError naming ``where`` and ``path`` unless it is a creds file: a user JWT
    and its ``SU...`` seed, as ``nsc`` writes them. (nats-py reads it only while connecting:
    a wrong one started the service, then failed every connection with a TypeError, or, at
    a server without JWTs, as "Authorization Violation", naming no file.)"""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{where}: creds {path}: {exc.strerror or exc}") from None
    missing = [
        what
        for what, found in (
            ("user JWT (-----BEGIN NATS USER JWT-----)", _CREDS_JWT.search(text)),
            ("user seed (-----BEGIN USER NKEY SEED----- SU...)", _CREDS_SEED.search(text)),
        )
        if found is None
    ]
    if missing:
        raise ConfigError(
            f"{where}: creds {path} holds no {' and no '.join(missing)}: is it the .creds "
            "file nsc wrote?"
        )


KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


class KafkaAuth(BaseModel):
    """Security of a Kafka connection: ``security_protocol``; for the SASL ones a
    ``sasl_mechanism`` with ``username`` and ``password`` (``OAUTHBEARER``: instead either an
    ``oauth2`` block or a ``token_command``, an argv list run without a shell that prints the
    token, taken to live ``token_ttl`` seconds when it does not say; ``eventbus._oauth`` gets
    the tokens); for the SSL ones an optional ``tls`` block (the system's CAs when absent)."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )

    security_protocol: KafkaProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    username: str | None = None
    password: Secret | None = None
    oauth2: OAuth2Spec | None = None
    token_command: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(
        None, min_length=1
    )
    token_ttl: Annotated[Duration, Field(gt=0)] | None = None
    """None: ``eventbus._oauth.TOKEN_TTL``. Not defaulted here, so that a ``token_ttl`` without
    a ``token_command`` can be told apart and refused."""
    tls: TlsSpec | None = None

    @field_validator("token_command", mode="before")
    @classmethod
    def _an_argv(cls, value: Any) -> Any:
        # A string would be refused as "not a valid tuple"; say what to write instead.
        if isinstance(value, str):
            raise ValueError(
                "write the command as a list of arguments, as [vault, read, -field=token, "
                "kafka/creds]: it runs without a shell"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaAuth:
        sasl = self.security_protocol.startswith("SASL_")
        bearer = [
            name
            for name, value in (("oauth2", self.oauth2), ("token_command", self.token_command))
            if value is not None
        ]
        if not sasl and (self.sasl_mechanism or self.username or self.password or bearer):
            raise ValueError(
                "sasl_mechanism, username, password, oauth2 and token_command need "
                "security_protocol SASL_PLAINTEXT or SASL_SSL"
            )
        if self.sasl_mechanism == "OAUTHBEARER":
            if self.username is not None or self.password is not None:
                raise ValueError(
                    "sasl_mechanism OAUTHBEARER takes an oauth2 block or a token_command, "
                    "not a password"
                )
            if len(bearer) != 1:
                raise ValueError(
                    "sasl_mechanism OAUTHBEARER takes exactly one of oauth2 and token_command"
                    + (" (got both)" if bearer else "")
                )
        elif sasl and (
            self.sasl_mechanism is None or self.username is None or self.password is None
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, username "
                "and password (or sasl_mechanism OAUTHBEARER and oauth2 or token_command)"
            )
        elif bearer:
            raise ValueError(f"{bearer[0]} goes with sasl_mechanism OAUTHBEARER")
        if self.token_ttl is not None and self.token_command is None:
            raise ValueError("token_ttl goes with token_command")
        if self.tls is not None and not self.security_protocol.endswith("SSL"):
            raise ValueError("tls needs security_protocol SSL or SASL_SSL")
        return self

    def kafka_options(self, where: str) -> dict[str, Any]:
        """aiokafka client keyword arguments (producer, consumer and admin client alike), but
        for OAUTHBEARER's token provider (``oauth2`` or ``token_command``), which
        ``eventbus._oauth.kafka_options`` adds.

        Raises ConfigError naming ``where`` when the TLS files cannot be read.
        """
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.endswith("SSL"):
            tls = self.tls or TlsSpec()
            context: ssl.SSLContext = tls.context(where)
            options["ssl_context"] = context
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
        if self.password is not None:
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password.reveal()
        return options
