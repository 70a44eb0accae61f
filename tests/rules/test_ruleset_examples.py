"""The example rules shipped in ``rules/`` load against ``connectors/`` and route as documented.

The tests read copies of the shipped examples (``data/examples/shipped``), never ``rules/`` or
``connectors/`` themselves: those are the user's to edit, and a user who adds or changes a rule
must not get a failing test. Change the copies together with the shipped files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from eventbus.config import load_connectors
from eventbus.delivery import parse_delivery
from eventbus.rules import load_rules

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data" / "examples"
SHIPPED = DATA / "shipped"
EXPECTED: dict[str, list[dict[str, Any]]] = yaml.safe_load((DATA / "expected.yaml").read_text())


@pytest.fixture(scope="module")
def known_targets() -> set[str]:
    return set(load_connectors(SHIPPED / "connectors").targets)


def test_examples_use_the_documented_targets(known_targets: set[str]) -> None:
    rules = load_rules(SHIPPED / "rules", known_targets=known_targets)
    used = {t.name for rule in rules.rules for t in rule.targets}
    assert used == {"audit-log", "thumbnailer", "orders-topic"}
    assert all(rule.description for rule in rules.rules)
    for rule in rules.rules:
        for target in rule.targets:
            parse_delivery(target.delivery, where=f"rule {rule.name!r}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_routes(known_targets: set[str], name: str) -> None:
    rules = load_rules(SHIPPED / "rules", known_targets=known_targets)
    event = orjson.loads((DATA / name).read_bytes())
    routes = rules.route(event)
    expected = EXPECTED[name]
    assert [(r.rule, r.target) for r in routes] == [(e["rule"], e["target"]) for e in expected]
    for route, want in zip(routes, expected, strict=True):
        if want["payload"] == "event":
            assert route.is_cloudevent and route.payload is event
        elif "cloudevent_data" in want["payload"]:
            assert route.is_cloudevent
            assert route.payload["id"] == event["id"]
            assert route.payload["data"] == want["payload"]["cloudevent_data"]
        else:
            assert not route.is_cloudevent
            assert route.payload == want["payload"]["json"]
    assert rules.cel_errors == {}


def test_the_readme_walkthrough_event_fires_the_headline_rule(known_targets: set[str]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body = re.search(r"curl -i http://127\.0\.0\.1:8080/events.*?-d '(\{.*?\})'", readme, re.S)
    assert body is not None, "the README's publish example is gone"
    event = orjson.loads(body.group(1))
    routes = load_rules(SHIPPED / "rules", known_targets=known_targets).route(event)
    got = {(r.rule, r.target): r for r in routes}
    assert set(got) == {("audit-everything", "audit-log"), ("priority-orders", "orders-topic")}
    assert got["priority-orders", "orders-topic"].payload["summary"] == "order o-1 of 120 EUR"
