"""The rule engine: YAML rules that match events (event patterns + CEL) and say what each target
receives (JSONPath transforms). Compiled once at load; ``RuleSet.route`` is pure and synchronous.

    rules/*.yaml ─> _loader (YAML + lines) ─> _ruleset (validate, compile) ─> RuleSet
    RuleSet.route(event) ─> _index/_pattern (patterns) ─> _cel (when) ─> _transform ─> [Route]

The rule format is specified in ``docs/rules.md``, the pattern language in ``docs/patterns.md``.
"""

from eventbus._errors import PatternError, RuleError, RuleSetError
from eventbus.rules._index import PatternIndex
from eventbus.rules._pattern import CompiledPattern, compile_pattern, matches
from eventbus.rules._ruleset import (
    OFF_LOOP_BYTES,
    DeliveryCheck,
    Route,
    Rule,
    RuleSet,
    RuleSetHolder,
    RuleTarget,
    compile_rules,
    load_rules,
    routing,
)

__all__ = [
    "OFF_LOOP_BYTES",
    "CompiledPattern",
    "DeliveryCheck",
    "PatternError",
    "PatternIndex",
    "Route",
    "Rule",
    "RuleError",
    "RuleSet",
    "RuleSetError",
    "RuleSetHolder",
    "RuleTarget",
    "compile_pattern",
    "compile_rules",
    "load_rules",
    "matches",
    "routing",
]
