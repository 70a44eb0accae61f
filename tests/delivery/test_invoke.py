"""The invocation's ``via``: what the edge writes on the bus message, the router reads back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eventbus.delivery import invocation_via, invoke_rule, invoked_target

# target names as connectors allow them (config/_connectors.py)
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


@given(target=names, who=st.text(max_size=80))
def test_an_async_via_names_its_target_and_is_printable_ascii(target: str, who: str) -> None:
    via = invocation_via("async", target, who)
    assert invoked_target(via) == target
    assert via.isascii() and via.isprintable()
    assert invoked_target(invocation_via("sync", target, who)) is None


@given(via=st.text(max_size=60))
def test_any_other_via_is_routed_by_the_rules(via: str) -> None:
    found = invoked_target(via)
    if found is not None:
        assert via.startswith(f"invoke:async:{found}:")


def test_the_pseudo_rule_cannot_be_a_rule_name() -> None:
    assert invoke_rule("fn") == "invoke:fn"
    for via in (
        "http",
        "reply",
        "source:timer",
        "invoke:async:",
        "invoke:async:fn",
        "invoke:sync:fn:x",
    ):
        assert invoked_target(via) is None
    assert invocation_via("sync", "fn", "key=ops\r\nX: y") == "invoke:sync:fn:key=ops\\x0d\\x0aX: y"
