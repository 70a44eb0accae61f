"""The example rules shipped in ``rules/`` load against ``connectors/`` and route as documented."""

from __future__ import annotations

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
EXPECTED: dict[str, list[dict[str, Any]]] = yaml.safe_load((DATA / "expected.yaml").read_text())


@pytest.fixture(scope="module")
def known_targets() -> set[str]:
    return set(load_connectors(ROOT / "connectors").targets)


def test_examples_use_the_documented_targets(known_targets: set[str]) -> None:
    rules = load_rules(ROOT / "rules", known_targets=known_targets)
    used = {t.name for rule in rules.rules for t in rule.targets}
    assert used == {"audit-log", "thumbnailer", "orders-topic"}
    assert all(rule.description for rule in rules.rules)
    for rule in rules.rules:
        for target in rule.targets:
            parse_delivery(target.delivery, where=f"rule {rule.name!r}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_routes(known_targets: set[str], name: str) -> None:
    rules = load_rules(ROOT / "rules", known_targets=known_targets)
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
