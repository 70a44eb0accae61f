"""The compiled rule set: rule documents in, ``RuleSet.route(event) -> [Route]`` out.

Where it sits: the router calls ``RuleSet.route`` for every bus message and hands each ``Route``
to delivery. Loading (``load_rules``/``compile_rules``) validates every rule at the edge
(pydantic, ``extra="forbid"``), compiles patterns, CEL conditions and transforms once, and
reports every problem at once; routing is pure and synchronous:

    event ─> PatternIndex (every enabled rule's pattern, no loop over rules)
          ─> CEL ``when`` (only rules whose pattern matched; event converted at most once)
          ─> per target: transform (target's own, else the rule's, else the whole event)
          ─> [Route(rule, target, payload, is_cloudevent, delivery)]

``RuleSetHolder`` swaps whole rule sets copy-on-write, so a reload never exposes a half-built
set and an invalid set never replaces a valid one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from eventbus._errors import EventBusError, PatternError, RuleError, RuleSetError
from eventbus.config import did_you_mean
from eventbus.rules._cel import Activation, Condition, Verdict, activation, compile_condition
from eventbus.rules._index import PatternIndex
from eventbus.rules._loader import KeyPath, ParsedFiles, RuleDoc, read_rule_files
from eventbus.rules._pattern import CompiledPattern, compile_pattern
from eventbus.rules._transform import Transform, TransformSpec, TransformTooLarge

__all__ = [
    "OFF_LOOP_BYTES",
    "Route",
    "Rule",
    "RuleSet",
    "RuleSetHolder",
    "RuleTarget",
    "compile_rules",
    "load_rules",
    "routing",
]

log = logging.getLogger("eventbus.rules")

# The same shape as connector names: rule names appear in audit rows, metrics and URLs.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A failing condition is logged at most once per rule per interval; the rest are counted.
_LOG_INTERVAL = 60.0

OFF_LOOP_BYTES = 16 * 1024
"""Events of this size and more are routed on a thread of their own (``routing``): matching,
conditions and transforms are bounded per rule, not per event, and an event's arrays met by
hundreds of rules looking into them, or a search through all of a large event, held the
service's event loop for seconds (its health checks, every other request and delivery)."""

_T = TypeVar("_T")


@functools.cache
def _routing_thread() -> ThreadPoolExecutor:
    # One: large events are routed one at a time, beside the loop, never more than a core.
    return ThreadPoolExecutor(1, thread_name_prefix="eventbus-routing")


async def routing(rules: RuleSet, size: int, route: Callable[[RuleSet], _T]) -> _T:
    """``route(rules)`` (its ``route`` or ``sync_routes`` for an event of ``size`` bytes):
    called at once for a small event, on the routing thread for one of ``OFF_LOOP_BYTES`` or
    more, or for any event when a condition of ``rules`` calls a macro (each may run 0.25 s,
    a rule at a time: 300 such rules held the loop 75 s on a 14 KB event); the event loop is
    free meanwhile. Cancelled, it stops waiting; the routing ends on its thread (bounded by
    the rules' own limits) and is dropped."""
    if size < OFF_LOOP_BYTES and not rules.macros:
        return route(rules)
    return await asyncio.get_running_loop().run_in_executor(_routing_thread(), route, rules)


def _compile_match(value: object) -> CompiledPattern:
    try:
        return compile_pattern({} if value is None else value)
    except PatternError as exc:
        raise PydanticCustomError(
            "pattern", "{message}", {"message": exc.message, "path": exc.path, "keys": exc.keys}
        ) from exc


def _compile_when(value: object, info: ValidationInfo) -> Condition:
    if not isinstance(value, str) or not value.strip():
        raise PydanticCustomError("cel", "a condition must be a non-empty CEL string")
    native = bool(info.context and info.context.get("native_cel"))  # load_rules(native_cel=)
    try:
        return compile_condition(value, native=native)
    except RuleError as exc:
        raise PydanticCustomError("cel", "{message}", {"message": exc.message}) from exc


def _name_only(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


class _TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = Field(min_length=1)
    transform: TransformSpec | None = None
    delivery: dict[str, Any] | None = None


class _RuleSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, arbitrary_types_allowed=True
    )

    name: str = Field(pattern=_NAME)
    description: str = ""
    enabled: StrictBool = True
    match: Annotated[CompiledPattern, BeforeValidator(_compile_match)] = Field(
        default_factory=lambda: compile_pattern({})
    )
    when: Annotated[Condition, BeforeValidator(_compile_when)] | None = None
    transform: TransformSpec | None = None
    sync: StrictBool = False
    targets: list[Annotated[_TargetSpec, BeforeValidator(_name_only)]] = Field(min_length=1)

    @field_validator("targets")
    @classmethod
    def _one_target_if_sync(
        cls, targets: list[_TargetSpec], info: ValidationInfo
    ) -> list[_TargetSpec]:
        if info.data.get("sync") and len(targets) != 1:
            raise ValueError(
                f"a rule with sync: true has exactly one target (its answer is the "
                f"request's), not {len(targets)}"
            )
        return targets


_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("a rule", frozenset(_RuleSpec.model_fields)),
    ("a target entry (targets: [{name: ..., delivery: ...}])", frozenset(_TargetSpec.model_fields)),
    ("a transform", frozenset(TransformSpec.model_fields)),
)


def _level_keys(loc: tuple[int | str, ...]) -> frozenset[str]:
    """The keys allowed where the unknown key at ``loc`` was written."""
    parent = loc[:-1]
    if parent and parent[-1] == "transform":
        return _LEVELS[2][1]
    if len(parent) >= 2 and parent[-2] == "targets":
        return _LEVELS[1][1]
    return _LEVELS[0][1]


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """What an unknown key at ``loc`` is: a misspelling of a key allowed there, or one that
    belongs at another level (``delivery`` on a rule was "did you mean 'delivery'?")."""
    key = str(loc[-1])
    here = _level_keys(loc)
    for where, keys in _LEVELS:
        if key in keys and keys is not here:
            return f"unknown key {key!r} here: it belongs in {where}"
    return f"unknown key {key!r}" + did_you_mean(key, here)


@dataclass(frozen=True)
class RuleTarget:
    """One target of a rule: its name, the transform it gets (None: the whole event) and its
    delivery override (validated later by the delivery code)."""

    name: str
    transform: Transform | None
    delivery: Mapping[str, Any] | None


@dataclass(frozen=True)
class Rule:
    """A compiled rule. ``definition`` is the rule as written (for listing and display)."""

    name: str
    description: str
    enabled: bool
    targets: tuple[RuleTarget, ...]
    file: str
    line: int | None
    definition: Mapping[str, Any] = field(repr=False)
    pattern: CompiledPattern = field(repr=False, compare=False)
    condition: Condition | None = field(repr=False, compare=False)
    sync: bool = False
    """Answers a synchronous ``POST /events`` with its one target's answer."""


@dataclass(frozen=True, slots=True)
class Route:
    """One delivery to make: ``payload`` is a CloudEvent dict when ``is_cloudevent``, else the
    transform's output (a JSON value or a string). Payloads may be shared between routes and
    with the event itself: treat them as read-only."""

    rule: str
    target: str
    payload: Any
    is_cloudevent: bool
    delivery: Mapping[str, Any] | None


class RuleSet:
    """An immutable set of compiled rules; ``route`` is pure apart from the error counters.

    ``cel_errors`` counts, per rule name, the events whose pattern matched but whose ``when``
    condition failed at run time or did not return a bool (treated as no match);
    ``transform_errors`` those whose transform for a target was over its bound (that target
    skipped, see ``eventbus.rules._transform``);
    ``native_cel`` says whether the conditions run on cel-expr-python.
    """

    on_failure: ClassVar[Callable[[str, str], None] | None] = None
    """Told of each failure counted (rule name, ``condition`` or ``transform``), by every rule
    set of the process: the service counts them in a metric (this package imports none)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._active = tuple(rule for rule in self.rules if rule.enabled)
        self._index: PatternIndex[int] = PatternIndex(
            (position, rule.pattern) for position, rule in enumerate(self._active)
        )
        self._sync = frozenset(rule.name for rule in self._active if rule.sync)
        self.macros = any(
            rule.condition is not None and rule.condition.macros for rule in self._active
        )
        """Whether a condition calls a macro: then every event is routed off the loop."""
        self.cel_errors: Counter[str] = Counter()
        self.transform_errors: Counter[str] = Counter()
        self._next_log: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._lock = threading.Lock()
        # What the next load may reuse: each rule by its definition's text, each file by its.
        self._by_text: dict[bytes, Rule] = {}
        self.native_cel = False  # set by the compiler: conditions on cel-expr-python
        self._files: ParsedFiles = {}

    def __len__(self) -> int:
        return len(self.rules)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the rules as written, in their order: processes (the workers of one
        service, or instances sharing a bus) showing the same fingerprint route with the same
        rules. A reload reaches one service's workers, not other instances: compare theirs."""
        digest = hashlib.sha256()
        option = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
        for rule in self.rules:
            digest.update(orjson.dumps(rule.definition, option=option, default=str))
            digest.update(b"\n")
        return digest.hexdigest()[:12]

    def route(
        self,
        event: dict[str, Any],
        *,
        trial: dict[str, str] | None = None,
        skipped: dict[str, str] | None = None,
    ) -> list[Route]:
        """Every route ``event`` takes, in rule order then target order; never raises for a
        JSON-shaped event (a failing condition means no match for that rule).

        ``trial``: the event is only tried (the console's sandbox): a failing condition or
        transform is put there (rule name to why) instead of being counted and logged, where
        it read as a real event's failure and took the rule's one log line of the minute.
        ``skipped``: each rule a failing transform took a target from, and why (counted and
        logged as well)."""
        routes: list[Route] = []
        context: Activation | None = None
        for position in self._index.match(event):
            rule = self._active[position]
            if rule.condition is not None:
                if context is None:
                    context = activation(event)
                verdict, reason = rule.condition.evaluate(context)
                if verdict is not Verdict.MATCH:
                    if verdict is Verdict.NO_MATCH:
                        pass
                    elif trial is not None:
                        trial[rule.name] = reason
                    else:
                        self._failed(
                            self.cel_errors, rule, event, "condition", "treated as no match", reason
                        )
                    continue
            last: Transform | None = None
            payload: Any = event
            for target in rule.targets:
                if target.transform is None:
                    routes.append(Route(rule.name, target.name, event, True, target.delivery))
                    continue
                if target.transform is not last:
                    try:
                        last, payload = target.transform, target.transform.apply(event)
                    except TransformTooLarge as exc:
                        last = None
                        what = f"transform for target {target.name!r}"
                        if trial is not None:
                            trial[rule.name] = f"{what}: {exc}"
                            continue
                        counter = self.transform_errors
                        self._failed(counter, rule, event, what, "target skipped", str(exc))
                        if skipped is not None:
                            skipped[rule.name] = f"{what}: {exc}"
                        continue
                routes.append(
                    Route(
                        rule.name,
                        target.name,
                        payload,
                        target.transform.keep_cloudevent,
                        target.delivery,
                    )
                )
        return routes

    def sync_routes(self, event: dict[str, Any]) -> tuple[list[Route], dict[str, str]]:
        """The routes of the enabled rules marked ``sync: true`` that ``event`` matches (one
        per rule: such a rule has one target), and those of them whose transform failed on
        it (rule name to why): matched, with nothing to send."""
        if not self._sync:
            return [], {}
        skipped: dict[str, str] = {}
        routes = [route for route in self.route(event, skipped=skipped) if route.rule in self._sync]
        return routes, {rule: why for rule, why in skipped.items() if rule in self._sync}

    def condition_errors(self, event: dict[str, Any]) -> dict[str, str]:
        """Why the ``when`` condition of each rule counted in ``cel_errors`` fails on ``event``
        (rule name to reason), for ``eventbus rules test``: ``route`` only counts failures, so
        the few failing conditions are evaluated again here."""
        failed = {}
        for rule in self.rules:
            if rule.name in self.cel_errors and rule.condition is not None:
                verdict, reason = rule.condition.evaluate(activation(event))
                if verdict in (Verdict.ERROR, Verdict.NOT_BOOL):
                    failed[rule.name] = reason
        return failed

    def _failed(
        self,
        counter: Counter[str],
        rule: Rule,
        event: dict[str, Any],
        what: str,
        outcome: str,
        reason: str,
    ) -> None:
        """``what`` failed on ``event`` (a condition: no match; a transform: that target
        skipped, the ``outcome``): counted in ``counter``, logged at most once a minute per
        rule. Under a lock: a large event is routed on the routing thread."""
        with self._lock:
            counter[rule.name] += 1
            now = time.monotonic()
            if now < self._next_log.get(rule.name, 0.0):
                self._unlogged[rule.name] += 1
                skipped = None
            else:
                self._next_log[rule.name] = now + _LOG_INTERVAL
                skipped = self._unlogged.pop(rule.name, 0)
        if RuleSet.on_failure is not None:
            RuleSet.on_failure(
                rule.name, "condition" if counter is self.cel_errors else "transform"
            )
        if skipped is None:
            return
        log.warning(
            "rule %r: %s failed for event %s/%s, %s: %s%s",
            rule.name,
            what,
            event.get("source"),
            event.get("id"),
            outcome,
            reason,
            f" ({skipped} more since the last report)" if skipped else "",
        )


class RuleSetHolder:
    """The current rule set, swapped whole (copy-on-write) on reload."""

    def __init__(self, rules: RuleSet) -> None:
        self._current = rules

    @property
    def current(self) -> RuleSet:
        """The rule set to route with; read it once per event."""
        return self._current

    def reload(
        self,
        path: str | Path,
        *,
        known_targets: Collection[str] | None = None,
        check_delivery: DeliveryCheck | None = None,
    ) -> RuleSet:
        """Load ``path`` and make it current, conditions on the current set's CEL runtime;
        returns the new set.

        Rules whose definition did not change keep their compiled form (CEL compiles slowly:
        one changed rule of 10,000 reloads in a fraction of the cold build). Raises
        ``RuleSetError`` (with every problem) and keeps the current set if it is invalid.
        """
        rules = load_rules(
            path,
            known_targets=known_targets,
            check_delivery=check_delivery,
            previous=self._current,
            native_cel=self._current.native_cel,
        )
        self._current = rules
        return rules


def _describe(error: ErrorDetails) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden" and loc:
        return _unknown_key(loc)
    if kind == "missing" and loc:
        return f"missing required key {loc[-1]!r}"
    if kind == "too_short" and loc == ("targets",):
        return "a rule needs at least one target"
    return error["msg"]


def _validation_errors(
    doc: RuleDoc, rule: str | None, prefix: str, exc: ValidationError
) -> list[RuleError]:
    errors = []
    for error in exc.errors():
        loc: KeyPath = tuple(error["loc"])
        message = _describe(error)
        if error["type"] == "pattern":
            loc = (*loc, *(error.get("ctx") or {}).get("keys", ()))
        elif loc[-1:] == ("[key]",):
            loc = loc[:-1]
        where = ".".join(str(step) for step in error["loc"] if step != "[key]")
        errors.append(
            RuleError(
                prefix + (f"{where}: {message}" if where else message),
                file=doc.file,
                line=doc.line(loc),
                rule=rule,
            )
        )
    return errors


def _text(data: dict[str, Any]) -> bytes | None:
    """The rule as canonical JSON text (keys sorted; 1, 1.0 and true stay distinct), or None
    when it holds something JSON cannot say."""
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return None


def _compile_one(
    doc: RuleDoc,
    position: int,
    text: bytes | None,
    reuse: Mapping[bytes, Rule],
    native_cel: bool,
) -> tuple[Rule | None, list[RuleError]]:
    data = doc.data
    if not isinstance(data, dict):
        message = f"rule #{position}: a rule is a mapping of keys, got {type(data).__name__}"
        return None, [RuleError(message, file=doc.file, line=doc.line())]
    previous = None if text is None else reuse.get(text)
    # Validation and compilation depend on the definition alone: an unchanged rule keeps its
    # compiled pattern, condition and transforms (the equality check also tells NaN from null,
    # which JSON text cannot).
    if previous is not None and previous.definition == data:
        return dataclasses.replace(previous, file=doc.file, line=doc.line(), definition=data), []
    name = data.get("name")
    label = name if isinstance(name, str) and name else None
    try:
        spec = _RuleSpec.model_validate(data, context={"native_cel": native_cel})
    except ValidationError as exc:
        prefix = "" if label else f"rule #{position}: "
        return None, _validation_errors(doc, label, prefix, exc)
    default = None if spec.transform is None else Transform.compile(spec.transform)
    targets = tuple(
        RuleTarget(
            target.name,
            default if target.transform is None else Transform.compile(target.transform),
            target.delivery,
        )
        for target in spec.targets
    )
    rule = Rule(
        name=spec.name,
        description=spec.description,
        enabled=spec.enabled,
        targets=targets,
        file=doc.file,
        line=doc.line(),
        definition=data,
        pattern=spec.match,
        condition=spec.when,
        sync=spec.sync,
    )
    return rule, []


def _raw_targets(data: dict[str, Any]) -> list[tuple[int, str]]:
    targets = data.get("targets")
    if not isinstance(targets, list):
        return []
    named = [(i, t.get("name") if isinstance(t, dict) else t) for i, t in enumerate(targets)]
    return [(i, name) for i, name in named if isinstance(name, str) and name]


DeliveryCheck = Callable[[str, Mapping[str, Any]], None]
"""Validates a route's ``delivery`` override for a target; raises EventBusError or ValueError
with a message naming the field (the delivery code provides it: the rule engine only knows
that an override is a mapping)."""


def _check_delivery(doc: RuleDoc, position: int, check: DeliveryCheck | None) -> list[RuleError]:
    # Runs on the raw document, like _check_names: a rule with other problems still has its
    # overrides checked, so every problem is reported in one pass.
    targets = doc.data.get("targets") if isinstance(doc.data, dict) else None
    if check is None or not isinstance(targets, list):
        return []
    name = doc.data.get("name")
    name = name if isinstance(name, str) and name else None
    prefix = "" if name else f"rule #{position}: "
    errors = []
    for index, target in enumerate(targets):
        if not isinstance(target, dict) or not isinstance(target.get("delivery"), dict):
            continue
        try:
            check(str(target.get("name")), target["delivery"])
        except (EventBusError, ValueError) as exc:
            errors.append(
                RuleError(
                    f"{prefix}targets.{index}.{exc}",
                    file=doc.file,
                    line=doc.line(("targets", index, "delivery")),
                    rule=name,
                )
            )
    return errors


def _check_names(
    doc: RuleDoc,
    position: int,
    first: dict[str, str],
    known_targets: Collection[str] | None,
) -> list[RuleError]:
    # Runs on the raw document, so these problems are reported even when the rule has others.
    data = doc.data
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        return []
    errors = []
    line = doc.line()
    where = f"{doc.file} rule #{position}" if line is None else f"{doc.file}:{line}"
    if name in first:
        errors.append(
            RuleError(
                f"duplicate rule name (first defined at {first[name]})",
                file=doc.file,
                line=doc.line(("name",)),
                rule=name,
            )
        )
    else:
        first[name] = where
    seen: set[str] = set()
    for index, target in _raw_targets(data):
        if target in seen:
            problem = f"targets.{index}: target {target!r} is listed twice"
        elif known_targets is not None and target not in known_targets:
            problem = f"targets.{index}: unknown target {target!r}" + _suggest(
                target, known_targets
            )
        else:
            problem = None
        seen.add(target)
        if problem is not None:
            line = doc.line(("targets", index, "name"))
            errors.append(RuleError(problem, file=doc.file, line=line, rule=name))
    return errors


def _compile(
    docs: Sequence[RuleDoc],
    known_targets: Collection[str] | None,
    check_delivery: DeliveryCheck | None = None,
    previous: RuleSet | None = None,
    native_cel: bool = False,
) -> RuleSet:
    errors: list[RuleError] = []
    rules: list[Rule] = []
    first: dict[str, str] = {}
    positions: Counter[str] = Counter()
    reuse = {} if previous is None else previous._by_text
    by_text: dict[bytes, Rule] = {}
    for doc in docs:
        positions[doc.file] += 1
        text = _text(doc.data) if isinstance(doc.data, dict) else None
        rule, problems = _compile_one(doc, positions[doc.file], text, reuse, native_cel)
        errors.extend(problems)
        errors.extend(_check_names(doc, positions[doc.file], first, known_targets))
        errors.extend(_check_delivery(doc, positions[doc.file], check_delivery))
        if rule is not None:
            rules.append(rule)
            if text is not None:
                by_text[text] = rule
    if errors:
        raise RuleSetError(errors)
    rule_set = RuleSet(rules)
    rule_set._by_text = by_text
    rule_set.native_cel = native_cel
    return rule_set


def _suggest(name: str, known: Collection[str]) -> str:
    return did_you_mean(name, known) or f" (defined targets: {', '.join(sorted(known)) or 'none'})"


def compile_rules(
    docs: list[dict[str, Any]],
    *,
    source: str = "<memory>",
    known_targets: Collection[str] | None = None,
    check_delivery: DeliveryCheck | None = None,
    native_cel: bool = False,
) -> RuleSet:
    """Compile rule documents already in memory (as parsed from YAML or JSON).

    ``known_targets``, when given, is every target name a rule may use; ``native_cel`` runs
    the conditions on cel-expr-python (``load_rules``). Raises ``RuleSetError`` carrying every
    problem found (errors name ``source`` and the rule; lines are unknown for in-memory
    documents).
    """
    return _compile(
        [RuleDoc(doc, source) for doc in docs], known_targets, check_delivery, None, native_cel
    )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block. Loading allocates hundreds of thousands
    of objects, and each full collection it triggers walks every object of the process (the
    current rule set's compiled conditions included): with 10,000 rules that was most of a
    reload's time. What the block leaves behind is collected afterwards as usual. The pause is
    the process's: a reload runs in a thread while the event loop goes on (``Service.
    reload_rules``), so the loop's own cyclic garbage waits for the load's end too (seconds
    for thousands of conditions; freed by reference counting, most of it never waits)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_rules(
    path: str | Path,
    *,
    known_targets: Collection[str] | None = None,
    check_delivery: DeliveryCheck | None = None,
    previous: RuleSet | None = None,
    native_cel: bool = False,
) -> RuleSet:
    """Load a rule file, or every ``*.yaml``/``*.yml`` file of a directory (in name order).

    With ``native_cel``, ``when`` conditions run on cel-expr-python (the ``fast-cel`` extra;
    ``ImportError`` without it), which differs from cel-python where cel-python departs from
    the CEL spec (docs/rules.md); they load and are checked the same way.

    Raises ``RuleSetError`` carrying every problem of every file at once, each naming file,
    line and rule: unreadable file, invalid YAML, duplicate keys, unknown keys, a malformed
    pattern, a CEL syntax error or unknown name, a bad JSONPath or template, a duplicate rule
    name (across files), an unknown target (when ``known_targets`` is given), an invalid
    ``delivery`` override (when ``check_delivery`` is given). Rules of ``previous`` whose
    definition is unchanged are reused as compiled (``previous`` must use the same runtime).
    """
    parsed: ParsedFiles = {}
    with _collector_paused():
        docs, errors = read_rule_files(path, None if previous is None else previous._files, parsed)
        try:
            rules = _compile(docs, known_targets, check_delivery, previous, native_cel)
        except RuleSetError as exc:
            errors.extend(exc.errors)
    if errors:
        errors.sort(key=lambda e: (e.file or "", e.line or 0))
        raise RuleSetError(errors)
    rules._files = parsed
    return rules
