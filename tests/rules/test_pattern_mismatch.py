"""``CompiledPattern.mismatch``: why an event does not match a pattern, as the rules sandbox
shows it; None exactly when ``matches`` is true."""

from __future__ import annotations

from typing import Any

import pytest

from eventbus.rules import compile_pattern

EVENT = {
    "source": "shop/orders",
    "type": "order.created",
    "data": {"total": 150, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 5}]},
}


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ({"source": [{"prefix": "shop/"}]}, None),
        ({"source": ["billing"]}, "source: 'shop/orders' does not match"),
        ({"subject": ["x"]}, "subject: absent"),
        ({"subject": [{"exists": False}]}, None),
        ({"data": {"total": [{"numeric": [">", 200]}]}}, "data.total: 150 does not match"),
        ({"data": {"items": {"sku": ["c"]}}}, "data.items.sku: ['a', 'b'] does not match"),
        (
            {"data": {"items": {"sku": ["a"], "qty": [5]}}},
            "values in different elements of the same array",
        ),
        ({"data": {"items": {"sku": ["b"], "qty": [5]}}}, None),
        (
            {"$or": [{"type": ["x"]}, {"data": {"total": [1]}}]},
            "no $or branch matched: type: 'order.created' does not match;"
            " data.total: 150 does not match",
        ),
        ({"source": ["x" * 200]}, "source: 'shop/orders' does not match"),
        ({"type": ["order.created"], "source": ["no"]}, "source: 'shop/orders' does not match"),
    ],
)
def test_mismatch(pattern: dict[str, Any], reason: str | None) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.mismatch(EVENT) == reason
    assert (reason is None) == compiled.matches(EVENT)


def test_long_values_are_shortened() -> None:
    reason = compile_pattern({"source": ["x"]}).mismatch({"source": "y" * 500})
    assert reason is not None and len(reason) < 120 and reason.endswith("… does not match")
