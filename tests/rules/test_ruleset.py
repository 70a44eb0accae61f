"""The compiled rule set: loading with every error at once, routing, reload (no servers)."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from eventbus.rules import (
    OFF_LOOP_BYTES,
    Route,
    RuleError,
    RuleSet,
    RuleSetError,
    RuleSetHolder,
    _ruleset,
    compile_rules,
    load_rules,
    routing,
)

DATA = Path(__file__).parent / "data"
KNOWN = {"audit-log", "thumbnailer", "orders-topic"}
ROUTE_CASES = yaml.safe_load((DATA / "route_cases.yaml").read_text())
BAD_FILES = sorted((DATA / "bad").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+) (\S+) (.+)$", re.MULTILINE)


def event(name: str) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads((DATA / "events" / name).read_bytes())
    return value


def test_good_rules_load() -> None:
    rules = load_rules(DATA / "good", known_targets=KNOWN)
    assert [r.name for r in rules.rules] == [
        "thumbnails",
        "big-uploads",
        "gift-orders",
        "everything",
        "paused",
    ]
    thumbnails = rules.rules[0]
    assert Path(thumbnails.file).name == "01-uploads.yaml"
    assert thumbnails.line == 2
    assert thumbnails.description.startswith("Make a thumbnail")
    assert [t.name for t in thumbnails.targets] == ["thumbnailer", "audit-log"]
    assert thumbnails.definition["when"] == "event.data.size > 1024"
    assert [r.enabled for r in rules.rules] == [True, True, True, True, False]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c["event"] for c in ROUTE_CASES])
def test_route(case: dict[str, Any]) -> None:
    rules = load_rules(DATA / "good", known_targets=KNOWN)
    ev = event(case["event"])
    routes = rules.route(ev)
    assert [(r.rule, r.target, r.is_cloudevent) for r in routes] == [
        (c["rule"], c["target"], c["is_cloudevent"]) for c in case["routes"]
    ]
    for route, expected in zip(routes, case["routes"], strict=True):
        if "payload" in expected:
            assert route.payload == expected["payload"]
        else:
            assert route.payload is ev
        assert route.delivery == expected.get("delivery")
    assert sorted(rules.cel_errors) == sorted(case.get("cel_errors", []))
    assert ev == event(case["event"]), "routing never modifies the event"


def expectations(path: Path) -> list[tuple[int, str | None, str]]:
    return [
        (int(line), None if rule == "-" else rule, text)
        for line, rule, text in EXPECT.findall(path.read_text())
    ]


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_file_reports_every_error_with_file_line_and_rule(path: Path) -> None:
    expected = expectations(path)
    assert expected, f"{path.name} has no '# expect:' lines"
    with pytest.raises(RuleSetError) as caught:
        load_rules(path, known_targets=KNOWN)
    errors = caught.value.errors
    got = [(e.file, e.line, e.rule, e.message) for e in errors]
    assert len(errors) == len(expected), got
    for (line, rule, text), error in zip(expected, errors, strict=True):
        assert (error.file, error.line, error.rule) == (str(path), line, rule), got
        assert text in str(error), got
        assert str(error).startswith(f"{path}:{line}")


def test_a_directory_reports_the_errors_of_every_file_at_once(tmp_path: Path) -> None:
    for path in BAD_FILES:
        shutil.copy(path, tmp_path / path.name)
    with pytest.raises(RuleSetError) as caught:
        load_rules(tmp_path, known_targets=KNOWN)
    assert len(caught.value.errors) == sum(len(expectations(p)) for p in BAD_FILES)
    assert {Path(e.file or "").name for e in caught.value.errors} == {p.name for p in BAD_FILES}


def test_duplicate_rule_names_across_files() -> None:
    with pytest.raises(RuleSetError) as caught:
        load_rules(DATA / "dup", known_targets=KNOWN)
    [error] = caught.value.errors
    assert (Path(error.file or "").name, error.line, error.rule) == ("b.yaml", 3, "shared")
    assert f"first defined at {DATA / 'dup' / 'a.yaml'}:1" in error.message


def test_targets_are_checked_only_when_known() -> None:
    assert len(load_rules(DATA / "good", known_targets=None)) == 5
    with pytest.raises(RuleSetError) as caught:
        load_rules(DATA / "good", known_targets={"audit-log"})
    assert [(e.rule, e.message) for e in caught.value.errors] == [
        ("thumbnails", "targets.0: unknown target 'thumbnailer' (defined targets: audit-log)"),
        ("gift-orders", "targets.0: unknown target 'orders-topic' (defined targets: audit-log)"),
    ]


def test_delivery_overrides_are_checked_with_every_other_problem(tmp_path: Path) -> None:
    def check(target: str, override: Any) -> None:
        if "retry" in override:
            raise ValueError(f"delivery: retry: not for {target}")

    path = tmp_path / "rules.yaml"
    path.write_text(
        "- name: broken\n"
        "  match: {type: [{prefix: 1}]}\n"
        "  targets:\n"
        "    - {name: fn, delivery: {retry: forever}}\n"
        "- targets: [{name: fn, delivery: {retry: 3}}]\n"
        "- name: fine\n"
        "  targets: [{name: fn, delivery: {timeout: 5}}]\n"
    )
    with pytest.raises(RuleSetError) as caught:
        load_rules(path, check_delivery=check)
    assert [(e.line, e.rule, e.message) for e in caught.value.errors] == [
        (2, "broken", "match: type: prefix takes a string, got a number"),
        (4, "broken", "targets.0.delivery: retry: not for fn"),
        (5, None, "rule #2: name: missing required key 'name'"),
        (5, None, "rule #2: targets.0.delivery: retry: not for fn"),
    ]


def test_missing_path() -> None:
    with pytest.raises(RuleSetError) as caught:
        load_rules(DATA / "absent")
    assert [str(e) for e in caught.value.errors] == [
        f"{DATA / 'absent'}: no such rule file or directory"
    ]


def test_compile_rules_in_memory() -> None:
    rules = compile_rules(
        [{"name": "a", "match": {"type": ["t"]}, "targets": ["x"]}], known_targets={"x"}
    )
    assert [(r.rule, r.target) for r in rules.route({"type": "t"})] == [("a", "x")]
    assert rules.rules[0].file == "<memory>"
    assert rules.rules[0].line is None
    with pytest.raises(RuleSetError) as caught:
        compile_rules(
            [{"name": "a", "targets": ["x"]}, {"name": "a", "match": [], "targets": ["y"]}],
            source="api",
            known_targets={"x"},
        )
    assert [str(e) for e in caught.value.errors] == [
        "api rule 'a': match: a pattern must be a JSON object, got list",
        "api rule 'a': duplicate rule name (first defined at api rule #1)",
        "api rule 'a': targets.0: unknown target 'y' (defined targets: x)",
    ]
    assert all(isinstance(e, RuleError) and e.line is None for e in caught.value.errors)


def test_empty_rule_set_routes_nothing() -> None:
    rules = compile_rules([])
    assert rules.rules == ()
    assert rules.route(event("upload-image.json")) == []


def test_missing_or_empty_match_means_every_event() -> None:
    rules = compile_rules(
        [
            {"name": "no-match", "targets": ["t"]},
            {"name": "null-match", "match": None, "targets": ["t"]},
            {"name": "empty-match", "match": {}, "targets": ["t"]},
        ]
    )
    for ev in ({}, {"type": "x"}, event("binary.json")):
        assert [r.rule for r in rules.route(ev)] == ["no-match", "null-match", "empty-match"]


def test_target_transform_overrides_the_rule_transform() -> None:
    rules = compile_rules(
        [
            {
                "name": "r",
                "transform": {"constant": "rule-level"},
                "targets": [
                    "a",
                    {"name": "b", "transform": {"constant": "own"}},
                    {"name": "c", "delivery": {"timeout": 1}},
                ],
            }
        ]
    )
    routes = rules.route({"type": "x"})
    assert [(r.target, r.payload, r.delivery) for r in routes] == [
        ("a", "rule-level", None),
        ("b", "own", None),
        ("c", "rule-level", {"timeout": 1}),
    ]


def test_routes_are_frozen() -> None:
    route = compile_rules([{"name": "r", "targets": ["t"]}]).route({})[0]
    assert isinstance(route, Route)
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.target = "other"  # type: ignore[misc]


def test_condition_runs_only_after_a_pattern_hit_and_converts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conversions: list[dict[str, Any]] = []
    real = _ruleset.activation

    def counting(ev: dict[str, Any]) -> dict[str, Any]:
        conversions.append(ev)
        return real(ev)

    monkeypatch.setattr(_ruleset, "activation", counting)
    rules = compile_rules(
        [
            {
                "name": f"r{i}",
                "match": {"type": ["t"]},
                "when": f"event.data.n > {i}",
                "targets": ["x"],
            }
            for i in range(5)
        ]
    )
    assert rules.route({"type": "other", "data": {"n": 10}}) == []
    assert conversions == []
    routes = rules.route({"type": "t", "data": {"n": 3}})
    assert [r.rule for r in routes] == ["r0", "r1", "r2"]
    assert len(conversions) == 1


def test_failing_conditions_are_counted_and_logged_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = compile_rules(
        [
            {"name": "fails", "when": "event.data.size > 1", "targets": ["x"]},
            {"name": "not-bool", "when": "event.data.size", "targets": ["x"]},
            {"name": "fine", "targets": ["y"]},
        ]
    )

    told: list[tuple[str, str]] = []
    monkeypatch.setattr(RuleSet, "on_failure", lambda rule, what: told.append((rule, what)))
    # a sandbox's trial says why, counts and logs nothing
    tried: dict[str, str] = {}
    assert [r.rule for r in rules.route({"id": "t", "source": "s", "data": {}}, trial=tried)] == [
        "fine"
    ]
    assert sorted(tried) == ["fails", "not-bool"] and rules.cel_errors == {}
    with caplog.at_level(logging.WARNING, logger="eventbus.rules"):
        for i in range(3):
            routes = rules.route({"id": str(i), "source": "s", "data": {}})
            assert [r.rule for r in routes] == ["fine"]
        routes = rules.route({"id": "3", "source": "s", "data": {"size": 5}})
        assert [r.rule for r in routes] == ["fails", "fine"]
    assert rules.cel_errors == {"fails": 3, "not-bool": 4}
    # and told to the service, which counts them in a metric (only in the log, once a minute)
    assert sorted(set(told)) == [("fails", "condition"), ("not-bool", "condition")]
    assert len(told) == 7
    logged = [r.getMessage() for r in caplog.records if r.name == "eventbus.rules"]
    assert len(logged) == 2, logged
    assert "rule 'fails'" in logged[0] and "size" in logged[0]
    assert "rule 'not-bool'" in logged[1]


def test_holder_swaps_valid_sets_and_keeps_the_old_one_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("- name: one\n  targets: [audit-log]\n")
    holder = RuleSetHolder(load_rules(path, known_targets=KNOWN))
    first = holder.current

    path.write_text("- name: two\n  targets: [audit-log]\n- name: three\n  targets: [audit-log]\n")
    returned = holder.reload(path, known_targets=KNOWN)
    assert returned is holder.current is not first
    assert [r.name for r in holder.current.rules] == ["two", "three"]

    good = holder.current
    path.write_text("- name: broken\n  targets: [nowhere]\n  when: 'event.type =='\n")
    with pytest.raises(RuleSetError) as caught:
        holder.reload(path, known_targets=KNOWN)
    assert len(caught.value.errors) == 2
    assert holder.current is good


def rule_yaml(name: str, when: str, pattern: str = "{type: [com.example.a]}") -> str:
    return f"- name: {name}\n  match: {pattern}\n  when: '{when}'\n  targets: [audit-log]\n"


def test_reload_reuses_what_did_not_change_and_compiles_what_did(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(rule_yaml("kept", "event.data.n > 1"))
    (tmp_path / "b.yaml").write_text(rule_yaml("edited", "event.data.n > 5"))
    holder = RuleSetHolder(load_rules(tmp_path, known_targets=KNOWN))
    kept, edited = holder.current.rules
    ev = {"type": "com.example.a", "id": "1", "source": "s", "data": {"n": 3}}
    assert [r.rule for r in holder.current.route(ev)] == ["kept"]

    # The edited rule also moves down a line in its file: the new set says where it is now.
    (tmp_path / "b.yaml").write_text("# moved\n" + rule_yaml("edited", "event.data.n > 2"))
    new = holder.reload(tmp_path, known_targets=KNOWN)
    assert new.rules[0].condition is kept.condition and new.rules[0].pattern is kept.pattern
    assert new.rules[1].condition is not edited.condition
    assert new.rules[1].definition["when"] == "event.data.n > 2"
    assert (Path(new.rules[1].file).name, new.rules[1].line) == ("b.yaml", 2)
    assert [r.rule for r in new.route(ev)] == ["kept", "edited"]


def test_reload_moved_rule_keeps_its_compiled_form_and_its_new_place(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(rule_yaml("mover", "event.data.n > 1"))
    holder = RuleSetHolder(load_rules(tmp_path, known_targets=KNOWN))
    before = holder.current.rules[0]
    (tmp_path / "a.yaml").unlink()
    (tmp_path / "z.yaml").write_text("\n\n" + rule_yaml("mover", "event.data.n > 1"))
    after = holder.reload(tmp_path, known_targets=KNOWN).rules[0]
    assert after.condition is before.condition
    assert (Path(after.file).name, after.line) == ("z.yaml", 3)


@pytest.mark.parametrize(
    ("old", "new"),
    [("[1]", "[true]"), ("[true]", "[1]"), ("[1.0]", "[true]"), ("[1.5]", "['1.5']")],
)
def test_reload_tells_apart_values_python_finds_equal(tmp_path: Path, old: str, new: str) -> None:
    # 1 == True == 1.0 in Python: a reload must not take a number for a bool (1 and 1.0 are
    # one number in a pattern, as in EventBridge)
    path = tmp_path / "rules.yaml"
    path.write_text(f"- name: r\n  match: {{data: {{x: {old}}}}}\n  targets: [audit-log]\n")
    holder = RuleSetHolder(load_rules(path, known_targets=KNOWN))
    path.write_text(f"- name: r\n  match: {{data: {{x: {new}}}}}\n  targets: [audit-log]\n")
    reloaded = holder.reload(path, known_targets=KNOWN)
    fresh = load_rules(path, known_targets=KNOWN)
    assert reloaded.rules[0].pattern == fresh.rules[0].pattern
    assert reloaded.rules[0].pattern != holder_pattern(old)


def holder_pattern(value: str) -> Any:
    return (
        compile_rules(
            [
                {
                    "name": "r",
                    "match": {"data": {"x": yaml.safe_load(value)}},
                    "targets": ["audit-log"],
                }
            ]
        )
        .rules[0]
        .pattern
    )


def test_reload_reports_a_broken_file_every_time(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rule_yaml("r", "event.data.n > 1"))
    holder = RuleSetHolder(load_rules(path, known_targets=KNOWN))
    good = holder.current
    path.write_text("- name: r\n  name: again\n  targets: [audit-log]\n")
    for _ in range(2):
        with pytest.raises(RuleSetError) as caught:
            holder.reload(path, known_targets=KNOWN)
        assert any("duplicate" in e.message for e in caught.value.errors), caught.value.errors
        assert holder.current is good
    path.write_text(rule_yaml("r", "event.data.n > 7"))
    assert (
        holder.reload(path, known_targets=KNOWN).rules[0].definition["when"] == "event.data.n > 7"
    )


def test_rule_set_is_a_plain_value() -> None:
    rules = load_rules(DATA / "good", known_targets=KNOWN)
    assert isinstance(rules, RuleSet)
    assert len(rules) == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.rules[0].name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "odd",
    [
        {},
        {"type": "com.example.object.created"},
        {"type": "com.example.object.created", "data": None},
        {"type": "com.example.object.created", "data": "text", "subject": 5},
        {"type": "com.example.object.created", "data": {"key": 5, "size": "big"}},
        {"type": "com.example.order.placed", "source": "shop/x", "data": {"items": "none"}},
        {"type": ["not", "a", "string"], "data": {"size": 10**30, "key": "x.jpg"}},
    ],
)
def test_odd_events_never_break_routing(odd: dict[str, Any]) -> None:
    rules = load_rules(DATA / "good", known_targets=KNOWN)
    routes = rules.route(odd)
    assert [(r.rule, r.target) for r in routes][-1:] == [("everything", "audit-log")]


def test_the_fingerprint_follows_the_rules_as_written_not_their_layout(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(rule_yaml("one", "event.data.n > 1"))
    first = load_rules(tmp_path, known_targets=KNOWN).fingerprint
    # a comment and another file layout: the same rules
    (tmp_path / "a.yaml").write_text("# the same rule\n" + rule_yaml("one", "event.data.n > 1"))
    assert load_rules(tmp_path, known_targets=KNOWN).fingerprint == first
    (tmp_path / "a.yaml").write_text(rule_yaml("one", "event.data.n > 2"))
    changed = load_rules(tmp_path, known_targets=KNOWN).fingerprint
    assert changed != first and len(changed) == 12
    (tmp_path / "a.yaml").write_text(rule_yaml("one", "event.data.n > 2") + "  enabled: false\n")
    assert load_rules(tmp_path, known_targets=KNOWN).fingerprint not in (first, changed)


async def test_a_large_event_is_routed_beside_the_event_loop() -> None:
    # Matching, conditions and transforms are bounded per rule, not per event: hundreds of
    # rules looking into a large event's arrays held the loop (health checks, every request
    # and delivery) for seconds. A large event is routed on a thread of its own, one at a time;
    # so is every event when a condition calls a macro (each 0.25 s at most, a rule at a time:
    # 300 such rules held the loop 75 s on a 14 KB event).
    threads: list[threading.Thread] = []

    def route(rules: RuleSet) -> int:
        threads.append(threading.current_thread())
        return len(threads)

    plain = compile_rules([{"name": "r", "when": "event.data.n > 1", "targets": ["t"]}])
    assert not plain.macros
    assert await routing(plain, OFF_LOOP_BYTES - 1, route) == 1
    assert await routing(plain, OFF_LOOP_BYTES, route) == 2
    assert await routing(plain, 10 * OFF_LOOP_BYTES, route) == 3
    loop = threading.current_thread()
    assert threads[0] is loop and threads[1] is not loop and threads[2] is threads[1]
    when = "event.data.items.exists(i, i.qty > 1)"
    heavy = compile_rules([{"name": "r", "when": when, "targets": ["t"]}])
    assert heavy.macros
    assert await routing(heavy, 10, route) == 4
    assert threads[3] is threads[1]
