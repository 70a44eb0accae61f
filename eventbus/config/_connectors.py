"""Connector definitions: the ``connectors/`` directory of YAML files naming every target (a
function endpoint, a Kafka topic, a NATS subject) and every source that rules and the runtime
refer to by name.

Where it sits: loaded once at start-up (and on reload) by the composition root; rules are
validated against the target names found here. Each target type has one declarative spec
(pydantic, ``extra="forbid"``) validated here; the target adapters receive frozen configs.

File shape::

    targets:
      - name: thumbnailer
        type: http
        url: http://127.0.0.1:9000/thumbnail
      - name: audit
        type: http
        url: {env: AUDIT_URL, default: "http://127.0.0.1:9000/audit"}
    sources:
      - name: nightly
        type: timer
        schedule: "0 3 * * *"
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from eventbus._errors import ConfigError
from eventbus.config._units import Duration
from eventbus.config._yaml import YamlDoc, load_yaml, pydantic_errors, yaml_files

__all__ = [
    "ConnectorSet",
    "HttpTargetSpec",
    "KafkaTargetSpec",
    "NatsTargetSpec",
    "TargetSpec",
    "load_connectors",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    description: str = ""
    delivery: dict[str, Any] | None = None
    """Delivery policy (retry, breaker, rate limit): validated by ``eventbus.delivery``."""


class HttpTargetSpec(_Spec):
    type: Literal["http"]
    url: str = Field(pattern=r"^https?://")
    mode: Literal["binary", "structured"] = "binary"
    timeout: Duration = Field(10.0, gt=0, le=900)
    concurrency: int = Field(16, ge=1, le=1024)
    headers: dict[str, str] = {}
    secret: str | None = None
    secret_env: str | None = None


class KafkaTargetSpec(_Spec):
    type: Literal["kafka"]
    bootstrap_servers: str
    topic: str
    key: str | None = None
    """A JSONPath into the event for the message key; default: the ``partitionkey`` extension."""
    mode: Literal["binary", "structured"] = "binary"
    timeout: Duration = Field(10.0, gt=0, le=300)
    idempotent: bool = True
    """Idempotent producer; turn off only for brokers without InitProducerId support."""


class NatsTargetSpec(_Spec):
    type: Literal["nats"]
    url: str
    subject: str
    jetstream: bool = False
    mode: Literal["binary", "structured"] = "structured"
    timeout: Duration = Field(5.0, gt=0, le=300)


TargetSpec = Annotated[
    HttpTargetSpec | KafkaTargetSpec | NatsTargetSpec, Field(discriminator="type")
]
_TARGET: TypeAdapter[HttpTargetSpec | KafkaTargetSpec | NatsTargetSpec] = TypeAdapter(TargetSpec)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []


@dataclass(frozen=True)
class ConnectorSet:
    """Every target and source definition, by name."""

    targets: Mapping[str, HttpTargetSpec | KafkaTargetSpec | NatsTargetSpec] = field(
        default_factory=dict
    )
    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source_lines: Mapping[str, str] = field(default_factory=dict)


def load_connectors(path: str | Path, env: Mapping[str, str] | None = None) -> ConnectorSet:
    """Load every ``*.yaml``/``*.yml`` file of ``path`` (a directory or one file); a target's
    ``url: {env: NAME, default: VALUE}`` is read from ``env`` (default: the process's).

    A missing directory is an empty set. Raises ConfigError listing every problem (file, line,
    connector name): invalid YAML, unknown keys, bad values, duplicate names, an unset
    variable without a default.
    """
    env = os.environ if env is None else env
    errors: list[str] = []
    targets: dict[str, Any] = {}
    sources: dict[str, Mapping[str, Any]] = {}
    where: dict[str, str] = {}
    target_where: dict[str, str] = {}
    root = Path(path)
    for file in yaml_files(root) if root.exists() else []:
        try:
            doc = load_yaml(file.read_text(encoding="utf-8"), str(file))
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if doc.data is None:
            continue
        try:
            parsed = _File.model_validate(doc.data)
        except ValidationError as exc:
            errors.extend(pydantic_errors(doc, exc))
            continue
        for i, raw in enumerate(parsed.targets):
            _load_target(doc, i, raw, env, targets, target_where, errors)
        for i, raw in enumerate(parsed.sources):
            name = raw.get("name")
            loc = f"{doc.file}:{doc.line(('sources', i))}"
            if not isinstance(name, str) or not name:
                errors.append(f"{loc}: sources.{i}: a source needs a name")
            elif name in sources:
                errors.append(f"{loc}: source {name!r}: duplicate name (first at {where[name]})")
            else:
                sources[name] = raw
                where[name] = loc
    if errors:
        raise ConfigError("\n".join(errors))
    return ConnectorSet(targets=targets, sources=sources, source_lines=where)


def _load_target(
    doc: YamlDoc,
    i: int,
    raw: dict[str, Any],
    env: Mapping[str, str],
    targets: dict[str, Any],
    where: dict[str, str],
    errors: list[str],
) -> None:
    loc = f"{doc.file}:{doc.line(('targets', i))}"
    if isinstance(raw.get("url"), dict):
        try:
            raw = {**raw, "url": _from_env(raw["url"], env)}
        except ValueError as exc:
            line = doc.line(("targets", i, "url"))
            errors.append(f"{doc.file}:{line}: targets.{i}.url: {exc} (target {raw.get('name')!r})")
            return
    try:
        spec = _TARGET.validate_python(raw)
    except ValidationError as exc:
        name = raw.get("name", f"#{i}")
        errors.extend(
            f"{line} (target {name!r})" for line in pydantic_errors(doc, exc, prefix=("targets", i))
        )
        return
    if spec.name in targets:
        errors.append(f"{loc}: target {spec.name!r}: duplicate name (first at {where[spec.name]})")
        return
    targets[spec.name] = spec
    where[spec.name] = loc


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _from_env(value: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """``{env: NAME, default: VALUE}``: the variable's value, or the default when it is unset
    or empty (as the shell's ``${NAME:-VALUE}``). Raises ValueError saying what is wrong."""
    unknown = sorted(set(value) - {"env", "default"})
    name, default = value.get("env"), value.get("default")
    if unknown or not isinstance(name, str):
        extra = f"unknown key {unknown[0]!r}; " if unknown else ""
        raise ValueError(f"{extra}write a string or {{env: NAME, default: VALUE}}")
    if _ENV_NAME.match(name) is None:
        raise ValueError(f"{name!r} is not an environment variable name")
    if default is not None and not isinstance(default, str):
        raise ValueError(f"the default of {name} must be a string")
    found = env.get(name) or default
    if found is None:
        raise ValueError(f"environment variable {name} is not set and no default is given")
    return found
