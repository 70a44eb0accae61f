"""Secrets: the one shape every password, token and key takes in settings and connector files.

Where it sits: below the pipeline, beside the settings and connector loaders that validate it.
A secret is written in one of three ways::

    password: {env: KAFKA_PASSWORD}           # read from the environment at load
    password: {file: /run/secrets/kafka}      # the file's text, trailing newline stripped
    password: hunter2                         # a literal: accepted, with a warning at start-up

and becomes a :class:`Secret`, whose ``str`` and ``repr`` never show the value (``***``, or where
it came from) and whose serialized form is masked, so a spec can be logged, dumped into an API
answer or an error message without leaking it. Code that needs the value calls ``reveal()``
where it hands it to a client library, nowhere else.

The ``{env: NAME, default: VALUE}`` form a target's ``url`` takes is the same reference, read by
the same function (:func:`resolve_reference`), so both say the same things when wrong.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

__all__ = [
    "MASK",
    "MIN_SECRET_CHARS",
    "Secret",
    "header_token",
    "literal_secrets",
    "long_enough",
    "resolve_reference",
    "validate_secret",
]

MASK = "***"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FORMS = "write a string, {env: NAME}, {env: NAME, default: VALUE} or {file: /path}"
# Bytes a secret file may hold (a key, a password, a PEM private key): read whole, /dev/zero
# or a log file by mistake grew until memory ran out.
_MAX_SECRET_FILE = 64 * 1024


def header_token(secret: Secret, what: str) -> Secret:
    """``secret``, if it can be compared with an HTTP header as it is: printable ASCII without
    spaces. Raises ValueError naming ``what`` otherwise: headers are read as bytes (Latin-1),
    so a key with other characters could never match, and spaces are trimmed by proxies."""
    if not all("!" <= c <= "~" for c in secret.reveal()):
        raise ValueError(
            f"{what} must be printable ASCII without spaces: it is compared with an HTTP header"
        )
    return secret


MIN_SECRET_CHARS = 16
"""The shortest key or shared secret accepted: a shorter one is guessed online (a key) or,
from one signed request seen, offline (an HMAC secret)."""


def long_enough(secret: Secret, what: str) -> Secret:
    """``secret``, if it has at least ``MIN_SECRET_CHARS`` characters; ValueError otherwise."""
    if len(secret.reveal()) < MIN_SECRET_CHARS:
        raise ValueError(f"{what} must have at least {MIN_SECRET_CHARS} characters")
    return secret


def resolve_reference(value: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, str]:
    """The value a ``{env: NAME[, default: VALUE]}`` or ``{file: PATH}`` reference points at,
    and where it came from (``env NAME``, ``file PATH``; never the value).

    An unset or empty variable takes the default (as the shell's ``${NAME:-VALUE}``); a file's
    trailing newline is stripped. Raises ValueError saying what is wrong (never quoting a value
    read from the environment or a file).
    """
    keys = set(value)
    if "file" in keys:
        unknown = sorted(keys - {"file"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} beside 'file'; {_FORMS}")
        path = value["file"]
        if not isinstance(path, str) or not path:
            raise ValueError("'file' must be a path")
        try:
            # Without waiting: a FIFO with no writer held the start, silent, for ever (the
            # settings are read before anything listens or logs); only a file is a secret.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError(f"{path} is not a regular file")
                raw = os.read(fd, _MAX_SECRET_FILE + 1)
            finally:
                os.close(fd)  # (fdopen of a directory raised, its descriptor left open)
            if len(raw) > _MAX_SECRET_FILE:
                raise ValueError(f"{path} is larger than a secret ({_MAX_SECRET_FILE} bytes)")
            text = raw.decode("utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text") from exc
        text = text.removesuffix("\n").removesuffix("\r")
        if not text:
            raise ValueError(f"{path} is empty")
        return text, f"file {path}"
    unknown = sorted(keys - {"env", "default"})
    name, default = value.get("env"), value.get("default")
    if unknown or not isinstance(name, str):
        extra = f"unknown key {unknown[0]!r}; " if unknown else ""
        raise ValueError(f"{extra}{_FORMS}")
    if _ENV_NAME.match(name) is None:
        raise ValueError(f"{name!r} is not an environment variable name")
    if default is not None and not isinstance(default, str):
        raise ValueError(f"the default of {name} must be a string")
    found = env.get(name) or default
    if not found:
        given = "no default is given" if default is None else "its default is empty"
        raise ValueError(f"environment variable {name} is not set and {given}")
    return found, f"env {name}"


class Secret:
    """A password, token or key: ``reveal()`` gives the value; ``str``, ``repr``, equality
    and serialization never expose it.

    ``origin`` says where it came from without the value: ``env NAME``, ``file PATH``,
    ``literal`` (written in the file itself) or ``plain`` (written in the file where plain text
    is usual, as an HTTP header that carries no credential: not warned about).
    """

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str = "literal") -> None:
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        """The value, for handing to the client library that needs it."""
        return self._value

    @property
    def literal(self) -> bool:
        """Written in the file itself (a start-up warning says to move it out)."""
        return self.origin == "literal"

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({MASK}, {self.origin})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        # Equal secrets hash alike whatever their origin (str hashes are salted per process).
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            validate_secret,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda s: MASK, when_used="always"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "anyOf": [
                {"type": "string", "description": "a literal (warned about at start-up)"},
                {
                    "type": "object",
                    "properties": {"env": {"type": "string"}, "default": {"type": "string"}},
                    "required": ["env"],
                },
                {"type": "object", "properties": {"file": {"type": "string"}}},
            ]
        }


def validate_secret(value: Any, info: ValidationInfo) -> Secret:
    """A secret's setting (a literal, ``{env: NAME}``, ``{file: PATH}``) read as a field's
    validator would, the environment taken from the validation's context; raises ValueError
    saying what is wrong."""
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError("a secret must not be empty")
        return Secret(value)
    if isinstance(value, Mapping):
        context = info.context if isinstance(info.context, Mapping) else {}
        env = context.get("env", os.environ)
        found, origin = resolve_reference(value, env)
        return Secret(found, origin)
    raise ValueError(_FORMS)


def literal_secrets(model: BaseModel) -> Iterator[tuple[str | int, ...]]:
    """The field path of every literal secret in ``model`` and the models it holds."""

    def walk(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
        if isinstance(value, Secret):
            if value.literal:
                yield path
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                yield from walk(getattr(value, name), (*path, name))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                yield from walk(item, (*path, i))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                yield from walk(item, (*path, str(key)))

    yield from walk(model, ())
