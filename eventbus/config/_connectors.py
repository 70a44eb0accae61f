"""Connector definitions: the ``connectors/`` directory of YAML files naming every source and
target that rules and the runtime refer to by name, and the registry of their types.

Vocabulary: a *connector* is one YAML definition; a *source* and a *target* are its two kinds.
Every connector has the same shape: ``name``, ``type``, an optional ``description`` and the
settings of its type. Each type is one declarative spec (pydantic, ``extra="forbid"``,
frozen), registered once under its YAML ``type`` together with the adapter that runs it::

    register_target("http", HttpTargetSpec, HttpTarget)     # eventbus/targets/__init__.py
    register_source("timer", TimerSpec, TimerSource)        # eventbus/sources/__init__.py

Where it sits: loaded once at start-up (and on reload) by the composition root; rules are
validated against the target names found here. This module keeps the registry but imports no
type: the packages that define them (``eventbus.targets``, ``eventbus.sources``) register them
when imported, so :func:`load_connectors` knows the types of whichever of them is loaded.

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

import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from eventbus._errors import ConfigError
from eventbus.config._secrets import literal_secrets, resolve_reference
from eventbus.config._units import Duration, NumbersNotBools
from eventbus.config._yaml import YamlDoc, load_yaml, pydantic_errors, yaml_files

__all__ = [
    "ConnectorKind",
    "ConnectorSet",
    "ConnectorSpec",
    "SourceSpec",
    "TargetSpec",
    "connector_adapter",
    "connector_spec",
    "load_connectors",
    "register_connector",
]

log = logging.getLogger("eventbus.config")

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

ConnectorKind = Literal["source", "target"]


class ConnectorSpec(NumbersNotBools):
    """What every connector definition has; a type's spec adds its own settings."""

    # Inputs stay out of error texts: a literal secret that fails validation must not be
    # quoted by a ValidationError that reaches a log.
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )

    type: ClassVar[str]
    """The YAML ``type`` the spec is registered under: set by registration, written nowhere
    else."""

    name: str = Field(pattern=_NAME)
    description: str = ""


class SourceSpec(ConnectorSpec):
    """The base of every source type's spec."""


class TargetSpec(ConnectorSpec):
    """The base of every target type's spec: a delivery policy and a bound on one attempt."""

    delivery: dict[str, Any] | None = None
    """Delivery policy (retry, breaker, rate limit): validated by ``eventbus.delivery``."""
    timeout: Duration = Field(10.0, gt=0, le=900)
    """Seconds one attempt may take; the retry schedule's leases are sized from it."""


_BASES: dict[ConnectorKind, type[ConnectorSpec]] = {"source": SourceSpec, "target": TargetSpec}
_TYPES: dict[ConnectorKind, dict[str, tuple[type[ConnectorSpec], object]]] = {
    "source": {},
    "target": {},
}


def register_connector(
    kind: ConnectorKind, type_name: str, spec: type[ConnectorSpec], adapter: object
) -> None:
    """Make ``type: <type_name>`` under ``<kind>s:`` validate with ``spec`` and run ``adapter``
    (called with the validated spec); sets ``spec.type``. The typed front doors are
    ``eventbus.sources.register_source`` and ``eventbus.targets.register_target``.

    Raises ValueError when the type is already registered, when ``spec`` is registered under
    another type, does not derive from the kind's base spec, or does not forbid extra fields (a
    typo in YAML must be an error, not silently ignored).
    """
    base = _BASES[kind]
    if type_name in _TYPES[kind]:
        raise ValueError(f"{kind} type {type_name!r} is already registered")
    if not issubclass(spec, base):
        raise ValueError(f"spec of {kind} type {type_name!r} must derive from {base.__name__}")
    if spec.model_config.get("extra") != "forbid":
        raise ValueError(f"spec of {kind} type {type_name!r} must set extra='forbid'")
    if "type" in vars(spec):
        raise ValueError(f"{spec.__name__} is already registered as {kind} type {spec.type!r}")
    spec.type = type_name
    _TYPES[kind][type_name] = (spec, adapter)


def connector_spec(kind: ConnectorKind, type_name: object) -> type[ConnectorSpec]:
    """The spec registered for ``type_name``; raises ConfigError listing the known types."""
    found = _TYPES[kind].get(type_name) if isinstance(type_name, str) else None
    if found is None:
        known = ", ".join(sorted(_TYPES[kind])) or "none registered"
        raise ConfigError(f"unknown {kind} type {type_name!r} (known: {known})")
    return found[0]


def connector_adapter(kind: ConnectorKind, spec: ConnectorSpec) -> object:
    """The adapter registered with the type of ``spec`` (a spec exists only for a registered
    type, so this does not fail)."""
    return _TYPES[kind][spec.type][1]


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    targets: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []


@dataclass(frozen=True)
class ConnectorSet:
    """Every target and source definition, by name, validated by its type's spec."""

    targets: Mapping[str, TargetSpec] = field(default_factory=dict)
    sources: Mapping[str, SourceSpec] = field(default_factory=dict)
    where: Mapping[tuple[ConnectorKind, str], str] = field(default_factory=dict)
    """``file:line`` of each connector, by kind (``target``, ``source``) and name."""

    def located(self, kind: ConnectorKind, name: str, problem: object) -> str:
        """``problem`` prefixed with where the connector is defined (when known)."""
        loc = self.where.get((kind, name))
        return f"{problem}" if loc is None else f"{loc}: {problem}"


DeliveryCheck = Callable[
    [Mapping[str, Any], Collection[str]], list[tuple[tuple[str | int, ...], str]]
]
"""Each problem of a target's ``delivery:`` block (given every target's name, for the settings
that name one), with the path of its setting in the block."""

_delivery_check: list[DeliveryCheck] = []


def check_deliveries_with(check: DeliveryCheck) -> None:
    """Have :func:`load_connectors` check each target's ``delivery:`` block with ``check``
    (``eventbus.delivery`` registers its parser when imported; this package does not import
    it), so that its problems come with the others, each on its own line: they came in a
    second round, once the rest was right, on the line of the target's name."""
    _delivery_check[:] = [check]


def connector_texts(path: str | Path) -> dict[str, str | None]:
    """The text of every file :func:`load_connectors` reads at ``path``, by file name (None
    for one that cannot be read as UTF-8 text: loaded from these, it is read again and its
    error reported): what ``serve --workers N`` starts every worker with, a restarted one too,
    so that all run one configuration (one restarted after an edit delivered to the target's
    new URL while the others kept the old)."""
    root = Path(path)
    texts: dict[str, str | None] = {}
    for file in yaml_files(root) if root.exists() else []:
        try:
            texts[str(file)] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            texts[str(file)] = None
    return texts


def load_connectors(
    path: str | Path,
    env: Mapping[str, str] | None = None,
    *,
    texts: Mapping[str, str | None] | None = None,
) -> ConnectorSet:
    """Load every ``*.yaml``/``*.yml`` file of ``path`` (a directory or one file); a target's
    ``url: {env: NAME, default: VALUE}`` and every secret's ``{env: NAME}`` are read from
    ``env`` (default: the process's), a ``{file: PATH}`` from its file. A secret written as a
    literal is logged as a warning (file, line, field).

    With ``texts`` (from :func:`connector_texts`), the files' texts are those, not what
    the files hold now. A missing directory is an empty set. Types are those registered when
    this is called (import ``eventbus.targets`` and ``eventbus.sources`` first). Raises
    ConfigError listing every problem, each with file, line and connector: invalid YAML,
    unknown keys or types, bad values, duplicate names, an unset variable without a default.
    """
    env = os.environ if env is None else env
    errors: list[str] = []
    found: dict[ConnectorKind, dict[str, ConnectorSpec]] = {"source": {}, "target": {}}
    where: dict[tuple[ConnectorKind, str], str] = {}
    deliveries: list[tuple[YamlDoc, int, TargetSpec]] = []
    root = Path(path)
    if texts is None:
        texts = dict.fromkeys(map(str, yaml_files(root) if root.exists() else []))
    for file_name, text in texts.items():
        file = Path(file_name)
        try:
            doc = load_yaml(file.read_text(encoding="utf-8") if text is None else text, file_name)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        except OSError as exc:  # a dangling link, no permission
            errors.append(f"{file}: cannot read connectors: {exc.strerror or exc}")
            continue
        except UnicodeDecodeError as exc:
            errors.append(f"{file}: cannot read connectors: not UTF-8 text ({exc})")
            continue
        if doc.data is None:
            continue
        try:
            _File.model_validate(doc.data)
        except ValidationError as exc:
            errors.extend(pydantic_errors(doc, exc))
        # Every entry that is a mapping is checked even so: one that was not (or a misspelt
        # top-level key) hid every other problem of its file, fixed one run at a time.
        data = doc.data if isinstance(doc.data, dict) else {}
        kinds: tuple[ConnectorKind, ...] = ("target", "source")
        for kind in kinds:
            raws = data.get(f"{kind}s")
            for i, raw in enumerate(raws if isinstance(raws, list) else ()):
                if not isinstance(raw, dict):
                    continue  # said by _File
                spec = _validate(doc, kind, i, raw, env, errors)
                # an invalid one's name counts too: its duplicate came in a second round
                name = spec.name if spec is not None else raw.get("name")
                if not isinstance(name, str):
                    continue
                loc = f"{doc.file}:{doc.line((f'{kind}s', i))}"
                if (kind, name) in where:
                    first = where[kind, name]
                    errors.append(f"{loc}: {kind} {name!r}: duplicate name (first at {first})")
                    continue
                where[kind, name] = loc
                if spec is not None:
                    found[kind][name] = spec
                    if isinstance(spec, TargetSpec) and spec.delivery:
                        deliveries.append((doc, i, spec))
    if _delivery_check:
        # once every file is read: a setting may name a target of another file
        known = {name for kind, name in where if kind == "target"}
        for doc, i, spec in deliveries:
            for at, problem in _delivery_check[0](spec.delivery or {}, known):
                at_path = ("targets", i, "delivery", *at)
                dotted = ".".join(str(p) for p in at_path)
                errors.append(
                    f"{doc.file}:{doc.line(at_path)}: {dotted}: {problem} (target {spec.name!r})"
                )
    if errors:
        raise ConfigError("\n".join(errors))
    # Registration guarantees each kind's specs derive from its base (TargetSpec, SourceSpec).
    return ConnectorSet(
        targets=cast(dict[str, TargetSpec], found["target"]),
        sources=cast(dict[str, SourceSpec], found["source"]),
        where=where,
    )


def _validate(
    doc: YamlDoc,
    kind: ConnectorKind,
    i: int,
    raw: dict[str, Any],
    env: Mapping[str, str],
    errors: list[str],
) -> ConnectorSpec | None:
    """One entry validated by its type's spec, or None with its problems added to ``errors``."""
    section = f"{kind}s"
    name = raw.get("name", f"#{i}")
    if isinstance(raw.get("url"), dict):
        try:
            raw = {**raw, "url": resolve_reference(raw["url"], env)[0]}
        except ValueError as exc:
            line = doc.line((section, i, "url"))
            errors.append(f"{doc.file}:{line}: {section}.{i}.url: {exc} ({kind} {name!r})")
            return None
    try:
        spec_type = connector_spec(kind, raw.get("type"))
    except ConfigError as exc:
        errors.append(
            f"{doc.file}:{doc.line((section, i, 'type'))}: {section}.{i}.type: {exc}"
            f" ({kind} {name!r})"
        )
        return None
    try:
        spec = spec_type.model_validate(
            {k: v for k, v in raw.items() if k != "type"}, context={"env": env}
        )
    except ValidationError as exc:
        fields = spec_type.model_fields.keys()
        errors.extend(
            f"{line} ({kind} {name!r})"
            for line in pydantic_errors(doc, exc, prefix=(section, i), fields=fields)
        )
        return None
    warn_literal_secrets(doc, spec, (section, i), f" ({kind} {name!r})")
    return spec


def warn_literal_secrets(
    doc: YamlDoc,
    model: BaseModel,
    prefix: tuple[str | int, ...],
    what: str = "",
    *,
    given: Callable[[tuple[str | int, ...]], bool] = lambda loc: False,
) -> None:
    """Log a warning naming file, line and field for every secret ``model`` holds as a literal
    (accepted, but it belongs in the environment or a file of its own), except those ``given``
    says came from elsewhere (an ``EVENTBUS_*`` variable)."""
    for path in literal_secrets(model):
        loc = (*prefix, *path)
        if given(loc):
            continue
        line = doc.line(loc)
        where = f"{doc.file}:{line}" if line is not None else doc.file
        dotted = ".".join(str(p) for p in loc)
        log.warning(
            "%s: %s: a secret given as a literal%s; use {env: NAME} or {file: PATH}",
            where,
            dotted,
            what,
        )
