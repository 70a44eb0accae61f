"""``eventbus rules ...``: check and try rules offline, without a running service.

    eventbus rules validate [PATH]                       every problem, with file:line and rule
    eventbus rules test --event E.json [PATH]            which rules match, what targets receive
    eventbus rules test-pattern --pattern P.json --event E.json     true/false

The command functions take plain arguments, write to ``out`` and return the exit code (0 fine,
1 invalid rules, 2 unusable input); they never let a traceback reach the user. ``register``
wires them into the ``eventbus`` argparse tree (``_main`` owns the top level).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from eventbus._errors import CloudEventError, ConfigError, PatternError, RuleSetError

if TYPE_CHECKING:
    from eventbus.rules import DeliveryCheck

# eventbus.rules is imported by the commands that use it, not here: it loads the CEL
# runtime (about a second), which every other command (``eventbus --help``, ``publish``,
# ``dead-letters``) would otherwise wait for.

__all__ = ["register", "test_command", "test_pattern_command", "validate_command"]

EXIT_OK, EXIT_INVALID_RULES, EXIT_BAD_INPUT = 0, 1, 2
_ANY_SIZE = 2**62


class _InputError(Exception):
    """An input file is missing or not the JSON expected; never escapes this module."""


def _read_json(path: str | Path, what: str) -> Any:
    """JSON read as the service reads it: an integer beyond 64 bits is refused, not rounded
    (an event's 18446744073709551617 matched a pattern's 18446744073709551616)."""
    from eventbus.cloudevents import load_json

    try:
        return load_json(Path(path).read_bytes())
    except OSError as exc:
        raise _InputError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise _InputError(f"{what} {str(path)!r} is not valid JSON: {exc}") from exc
    except CloudEventError as exc:
        raise _InputError(f"{what} {str(path)!r}: {exc.detail}") from exc


def _read_object(path: str | Path, what: str) -> dict[str, Any]:
    value = _read_json(path, what)
    if not isinstance(value, dict):
        raise _InputError(f"{what} {str(path)!r} must be a JSON object, not {type(value).__name__}")
    return value


def _read_cloudevent(path: str | Path) -> dict[str, Any]:
    """The event in ``path`` as the service would route it: a valid CloudEvent (JSON format),
    null attributes dropped. Its size is not checked: the limit is the service's setting."""
    # Imported here: ``eventbus rules validate`` and ``--help`` do without the event model.
    from eventbus.cloudevents import validate

    try:
        event = _read_object(path, "event file")
        return validate(event, max_size=_ANY_SIZE)
    except CloudEventError as exc:
        raise _InputError(f"event file {str(path)!r} is not a valid CloudEvent: {exc}") from exc


def _write_errors(exc: RuleSetError, out: TextIO, besides: str = "") -> int:
    for error in exc.errors:
        out.write(f"{error}\n")
    count = len(exc.errors)
    out.write(f"{count} problem{'s' if count != 1 else ''} found{besides}\n")
    return EXIT_INVALID_RULES


def validate_command(
    path: str | Path,
    *,
    known_targets: Collection[str] | None,
    out: TextIO,
    check_delivery: DeliveryCheck | None = None,
    native_cel: bool = False,
    note: str = "",
    besides: str = "",
) -> int:
    """Load the rules at ``path``; print ``N rules OK`` (exit 0) or every problem (exit 1).
    ``note`` follows the OK (what was not checked), ``besides`` the count of problems (those
    found elsewhere)."""
    from eventbus.rules import load_rules

    try:
        rules = load_rules(
            path, known_targets=known_targets, check_delivery=check_delivery, native_cel=native_cel
        )
    except RuleSetError as exc:
        return _write_errors(exc, out, besides)
    disabled = sum(1 for rule in rules.rules if not rule.enabled)
    count = len(rules.rules)
    notes = [f"{disabled} disabled"] if disabled else []
    notes += [note] if note else []
    shown = f" ({'; '.join(notes)})" if notes else ""
    out.write(f"{count} rule{'s' if count != 1 else ''} OK{shown}\n")
    return EXIT_OK


def test_command(
    event_file: str | Path,
    path: str | Path,
    *,
    known_targets: Collection[str] | None,
    out: TextIO,
    err: TextIO,
    check_delivery: DeliveryCheck | None = None,
    native_cel: bool = False,
) -> int:
    """Route the event in ``event_file`` through the rules at ``path`` (conditions on
    cel-expr-python with ``native_cel``) and print, as JSON, the matched rules, every route
    with the payload its target would receive, and the rules whose condition failed on this
    event. Exit 0, 1 for invalid rules, 2 for an unusable event file (unreadable, not JSON, or
    not a valid CloudEvent: the service would refuse it). Problems go to ``err``: ``out``
    holds the JSON report or nothing (a ``| jq`` got the error text).
    """
    from eventbus.rules import load_rules

    try:
        event = _read_cloudevent(event_file)
    except _InputError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    try:
        rules = load_rules(
            path, known_targets=known_targets, check_delivery=check_delivery, native_cel=native_cel
        )
    except RuleSetError as exc:
        return _write_errors(exc, err)
    routes = rules.route(event)
    report = {
        "matched": list(dict.fromkeys(route.rule for route in routes)),
        "routes": [
            {
                "rule": route.rule,
                "target": route.target,
                "is_cloudevent": route.is_cloudevent,
                "payload": route.payload,
                "delivery": route.delivery,
            }
            for route in routes
        ],
        "condition_errors": rules.condition_errors(event),
    }
    out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def test_pattern_command(
    pattern_file: str | Path, event_file: str | Path, *, out: TextIO, err: TextIO
) -> int:
    """Print ``true`` or ``false``: does the event match the event pattern (as EventBridge's
    TestEventPattern)? Exit 0, or 2 with a clear message on ``err`` for a bad pattern or JSON
    file."""
    from eventbus.rules import matches

    try:
        pattern = _read_json(pattern_file, "pattern file")
        event = _read_object(event_file, "event file")
        matched = matches(pattern, event)
    except _InputError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except PatternError as exc:
        err.write(f"error: invalid pattern in {str(pattern_file)!r}: {exc}\n")
        return EXIT_BAD_INPUT
    out.write("true\n" if matched else "false\n")
    return EXIT_OK


def _settings_paths(args: argparse.Namespace) -> bool:
    """Fill ``args.path`` and ``args.connectors`` where not given: with ``$EVENTBUS_CONFIG``
    set, those of that settings file, as ``serve`` reads them (the commands checked ./rules
    and ./connectors instead, while the other commands followed the variable); else rules/
    here. Returns whether the connectors came from the settings (then a missing directory is
    an empty set, as at the service's start). Raises ConfigError."""
    config = os.environ.get("EVENTBUS_CONFIG")
    if not config:
        args.path = args.path or "rules"
        return False
    from eventbus.config import rule_paths

    rules, connectors = rule_paths(config)
    args.path = args.path or str(rules)
    if args.connectors is None:
        args.connectors = str(connectors)
        return True
    return False


def _known_targets(
    connectors: str | None, *, from_settings: bool = False
) -> tuple[Collection[str] | None, DeliveryCheck | None]:
    """Target names from the connector definitions and a check of the rules' delivery
    overrides against their targets' policies; (None, None), no checks, when there are none.

    Raises ``ConfigError`` for invalid connector files (``main`` prints it).
    """
    # Imported here, not at the top: the delivery layer and the sources load every driver,
    # which ``eventbus rules test-pattern`` and ``eventbus --help`` do without. Importing them
    # registers the target and source types the connector files are validated with.
    import eventbus.sources  # noqa: F401
    from eventbus.app import build_adapters
    from eventbus.config import load_connectors
    from eventbus.delivery import override_checker, target_policies

    if connectors is None:
        if not Path("connectors").exists():
            return None, None
        connectors = "connectors"
    elif not Path(connectors).exists() and not from_settings:
        # a typo checked no target at all, and said "OK"
        raise ConfigError(f"--connectors: no such file or directory: {connectors}")
    found = load_connectors(connectors)
    build_adapters(found)  # what the adapters refuse, serve refuses too (tls on http://)
    targets = found.targets
    policies = target_policies(
        {name: spec.delivery for name, spec in targets.items()},
        located=lambda name, problem: found.located("target", name, problem),
    )
    return set(targets), override_checker(policies)


def _native_cel(args: argparse.Namespace) -> bool:
    """``--cel``: True for cel-expr-python; raises ``ConfigError`` when it is not installed."""
    if args.cel == "cel-python":
        return False
    if importlib.util.find_spec("cel_expr_python") is None:
        raise ConfigError("--cel cel-expr-python: not installed (pip install 'eventbus[fast-cel]')")
    return True


def _run_validate(args: argparse.Namespace) -> int:
    native_cel = _native_cel(args)
    from_settings = _settings_paths(args)
    try:
        targets, check = _known_targets(args.connectors, from_settings=from_settings)
    except ConfigError as exc:
        # The rules are still checked (without their targets): the connectors' problems and
        # the rules' came in two rounds, each fix showing the next.
        sys.stderr.write("".join(f"eventbus: {line}\n" for line in str(exc).splitlines()))
        validate_command(
            args.path,
            known_targets=None,
            out=sys.stdout,
            native_cel=native_cel,
            note="their targets not checked: the connectors did not load",
            besides=" in the rules, besides the connectors' (above, on stderr)",
        )
        return 1
    return validate_command(
        args.path,
        known_targets=targets,
        out=sys.stdout,
        check_delivery=check,
        native_cel=native_cel,
        # "1 rule OK" for a rule naming a target that exists nowhere, which serve refused
        note=""
        if targets is not None
        else "their targets not checked: no connectors/ here (give --connectors DIR)",
    )


def _run_test(args: argparse.Namespace) -> int:
    from_settings = _settings_paths(args)
    targets, check = _known_targets(args.connectors, from_settings=from_settings)
    return test_command(
        args.event,
        args.path,
        known_targets=targets,
        out=sys.stdout,
        err=sys.stderr,
        check_delivery=check,
        native_cel=_native_cel(args),
    )


def _run_test_pattern(args: argparse.Namespace) -> int:
    return test_pattern_command(args.pattern, args.event, out=sys.stdout, err=sys.stderr)


def register(subparsers: Any) -> None:
    """Add ``validate``, ``test`` and ``test-pattern`` to the ``eventbus rules`` subparsers
    (an ``argparse`` subparsers action); each sets ``func(args) -> exit code``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "path",
        nargs="?",
        help="rule file or directory (default: the rules of the settings file $EVENTBUS_CONFIG "
        "when set, else rules)",
    )
    common.add_argument(
        "--connectors",
        help="connector definitions naming the targets (default: those of $EVENTBUS_CONFIG "
        "when set, else connectors, and targets are not checked when it is absent; a path "
        "given must exist)",
    )
    common.add_argument(
        "--cel",
        choices=("cel-python", "cel-expr-python"),
        default="cel-python",
        help="the runtime of when conditions, as the service's router.cel (docs/rules.md)",
    )

    p = subparsers.add_parser("validate", parents=[common], help="check rules, list problems")
    p.set_defaults(func=_run_validate)

    p = subparsers.add_parser("test", parents=[common], help="route one event through the rules")
    p.add_argument("--event", required=True, help="a CloudEvent in JSON form")
    p.set_defaults(func=_run_test)

    p = subparsers.add_parser("test-pattern", help="does an event match an event pattern?")
    p.add_argument("--pattern", required=True, help="an event pattern (JSON)")
    p.add_argument("--event", required=True, help="an event (JSON)")
    p.set_defaults(func=_run_test_pattern)
