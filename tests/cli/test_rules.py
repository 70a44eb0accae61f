"""``eventbus rules validate|test|test-pattern``: exit codes and output (no servers)."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventbus.cli import _rules as _cli

# Imported through the module: pytest would collect functions named test_* as tests.
register, validate_command = _cli.register, _cli.validate_command

DATA = Path(__file__).parents[1] / "rules" / "data"  # the rule engine's own test data
EVENTS = DATA / "events"
KNOWN = {"audit-log", "thumbnailer", "orders-topic"}


def run(command: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    """The exit code and the output (``rules test`` and ``test-pattern``: with nothing on
    their error stream)."""
    code, out, err = run_both(command, *args, **kwargs)
    assert err == "", err
    return code, out


def run_both(command: Any, *args: Any, **kwargs: Any) -> tuple[int, str, str]:
    """The exit code, the output and (``rules test`` and ``test-pattern``) the problems."""
    out, err = io.StringIO(), io.StringIO()
    if command is not validate_command:
        kwargs["err"] = err
    code = command(*args, out=out, **kwargs)
    return code, out.getvalue(), err.getvalue()


def failed(command: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    """The exit code and the problems of a run that printed no output (``| jq`` read none)."""
    code, out, err = run_both(command, *args, **kwargs)
    assert out == "", out
    return code, err


def test_validate_ok() -> None:
    code, text = run(validate_command, DATA / "good", known_targets=KNOWN)
    assert (code, text) == (0, "5 rules OK (1 disabled)\n")


def test_validate_lists_every_error_without_a_traceback() -> None:
    path = DATA / "bad" / "cel.yaml"
    code, text = run(validate_command, path, known_targets=KNOWN)
    lines = text.splitlines()
    assert code == 1
    assert lines[-1] == "5 problems found"
    assert lines[0].startswith(f"{path}:7 rule 'syntax': when: CEL syntax error")
    assert all(line.startswith(f"{path}:") for line in lines[:-1])
    assert "Traceback" not in text


def test_validate_missing_path() -> None:
    code, text = run(validate_command, DATA / "absent", known_targets=None)
    assert (code, text) == (
        1,
        f"{DATA / 'absent'}: no such rule file or directory\n1 problem found\n",
    )


def test_test_command_shows_routes_and_payloads() -> None:
    code, text = run(
        _cli.test_command, EVENTS / "upload-image.json", DATA / "good", known_targets=KNOWN
    )
    assert code == 0
    report = orjson.loads(text)
    assert report["matched"] == ["thumbnails", "everything"]
    assert [(r["rule"], r["target"], r["is_cloudevent"]) for r in report["routes"]] == [
        ("thumbnails", "thumbnailer", False),
        ("thumbnails", "audit-log", True),
        ("everything", "audit-log", True),
    ]
    assert report["routes"][0]["payload"]["url"] == "s3://photos/cats/tom.jpg"
    assert report["routes"][1]["payload"]["id"] == "u-1"
    assert report["condition_errors"] == {}


def test_test_command_explains_failing_conditions() -> None:
    code, text = run(
        _cli.test_command, EVENTS / "upload-no-size.json", DATA / "good", known_targets=KNOWN
    )
    assert code == 0
    report = orjson.loads(text)
    assert report["matched"] == ["everything"]
    assert list(report["condition_errors"]) == ["thumbnails"]
    assert "size" in report["condition_errors"]["thumbnails"]


def test_test_command_on_cel_expr_python() -> None:
    pytest.importorskip("cel_expr_python", reason="cel-expr-python (the fast-cel extra) is absent")
    for event, failing in (("upload-no-size.json", ["thumbnails"]), ("upload-image.json", [])):
        code, text = run(
            _cli.test_command, EVENTS / event, DATA / "good", known_targets=KNOWN, native_cel=True
        )
        expected = orjson.loads(
            run(_cli.test_command, EVENTS / event, DATA / "good", known_targets=KNOWN)[1]
        )
        report = orjson.loads(text)
        assert (code, report["matched"], list(report["condition_errors"])) == (
            0,
            expected["matched"],
            failing,
        )


@pytest.mark.parametrize(
    ("event_file", "message"),
    [
        ("absent.json", "cannot read event file"),
        ("truncated.json", "is not valid JSON"),
        ("not-object.json", "must be a JSON object, not list"),
    ],
)
def test_test_command_bad_event_file(event_file: str, message: str) -> None:
    code, text = failed(_cli.test_command, EVENTS / event_file, DATA / "good", known_targets=KNOWN)
    assert code == 2
    assert text.startswith("error: ") and message in text
    assert text.count("\n") == 1


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"id": "1", "source": "s", "type": "t"}, "'specversion'"),
        ({"specversion": "1.0", "id": "1", "source": "s"}, "'type'"),
        ({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "time": "soon"}, "time"),
        ({"specversion": "1.0", "id": "", "source": "s", "type": "t"}, "'id'"),
    ],
)
def test_test_command_refuses_an_invalid_cloudevent(
    tmp_path: Path, event: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(event))
    code, text = failed(_cli.test_command, path, DATA / "good", known_targets=KNOWN)
    assert code == 2, text
    assert text.startswith(f"error: event file {str(path)!r} is not a valid CloudEvent: ")
    assert message in text and text.count("\n") == 1


def test_test_command_refuses_an_integer_the_service_refuses(tmp_path: Path) -> None:
    # orjson read it as a float (1.2345678901234568e+29), routed where the service says 400
    path = tmp_path / "big.json"
    path.write_text(
        '{"specversion": "1.0", "id": "1", "source": "s", "type": "t",'
        ' "data": {"n": 123456789012345678901234567890}}'
    )
    code, text = failed(_cli.test_command, path, DATA / "good", known_targets=KNOWN)
    assert code == 2, text
    assert "big.json': the integer '123456789012345678901234567890' is beyond 64 bits" in text


def test_test_command_routes_the_event_as_the_service_would(tmp_path: Path) -> None:
    # null attributes count as absent (the JSON format): the payloads leave them out
    event = orjson.loads((EVENTS / "upload-image.json").read_bytes())
    path = tmp_path / "with-null.json"
    path.write_bytes(orjson.dumps({**event, "subject": None}))
    code, text = run(_cli.test_command, path, DATA / "good", known_targets=KNOWN)
    assert code == 0, text
    report = orjson.loads(text)
    assert report["matched"] == ["thumbnails", "everything"]
    assert "subject" not in report["routes"][1]["payload"]


def test_test_command_with_invalid_rules() -> None:
    code, text = failed(
        _cli.test_command,
        EVENTS / "binary.json",
        DATA / "bad" / "targets.yaml",
        known_targets=KNOWN,
    )
    assert code == 1
    assert text.splitlines()[-1] == "2 problems found"


@pytest.mark.parametrize(
    ("pattern", "event_file", "expected"),
    [
        ({"type": ["com.example.object.created"]}, "upload-image.json", "true\n"),
        ({"data": {"size": [{"numeric": [">", 4096]}]}}, "upload-image.json", "false\n"),
        ({}, "binary.json", "true\n"),
        (
            {"source": [{"prefix": "shop/"}], "data": {"items": {"sku": ["BOOK-1"]}}},
            "order-gift.json",
            "true\n",
        ),
    ],
)
def test_test_pattern(tmp_path: Path, pattern: Any, event_file: str, expected: str) -> None:
    pattern_file = tmp_path / "pattern.json"
    pattern_file.write_bytes(orjson.dumps(pattern))
    assert run(_cli.test_pattern_command, pattern_file, EVENTS / event_file) == (0, expected)


@pytest.mark.parametrize(
    ("pattern_text", "event_file", "message"),
    [
        ('{"type": "exact"}', "binary.json", "invalid pattern"),
        ("[1]", "binary.json", "invalid pattern"),
        ('{"type": [', "binary.json", "pattern file"),
        (None, "binary.json", "cannot read pattern file"),
        ('{"type": ["a"]}', "truncated.json", "event file"),
        ('{"type": ["a"]}', "not-object.json", "must be a JSON object"),
    ],
    ids=["not-array", "not-object", "bad-json", "missing", "bad-event", "event-list"],
)
def test_test_pattern_bad_input(
    tmp_path: Path, pattern_text: str | None, event_file: str, message: str
) -> None:
    pattern_file = tmp_path / "pattern.json"
    if pattern_text is not None:
        pattern_file.write_text(pattern_text)
    code, text = failed(_cli.test_pattern_command, pattern_file, EVENTS / event_file)
    assert code == 2
    assert text.startswith("error: ") and message in text


def test_test_pattern_reads_integers_as_the_service_does(tmp_path: Path) -> None:
    # Read by orjson, both integers were rounded to one float: an event's
    # 18446744073709551617 matched a pattern's 18446744073709551616 ("true"), where the
    # service refuses such an event.
    pattern_file, event_file = tmp_path / "pattern.json", tmp_path / "event.json"
    pattern_file.write_text('{"data": {"n": [5]}}')
    event = '{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {"n": %s}}'
    event_file.write_text(event % "18446744073709551617")
    code, text = failed(_cli.test_pattern_command, pattern_file, event_file)
    assert code == 2 and "beyond 64 bits" in text, text


def test_validate_reports_bad_delivery_overrides_with_the_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    connectors = tmp_path / "connectors.yaml"
    connectors.write_text("targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:9/fn'}\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- name: r\n"
        "  when: '\"a\" + 1 == 2'\n"
        "  targets:\n"
        "    - {name: fn, delivery: {retry: sometimes}}\n"
    )
    args = parse(["validate", str(rules), "--connectors", str(connectors)])
    assert args.func(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 problems found"
    assert lines[0].startswith(f"{rules}:2 rule 'r': when: ")
    assert lines[0].endswith("can never be evaluated: no such overload: string + int")
    assert lines[1].startswith(f"{rules}:4 rule 'r': targets.0.delivery: ")
    assert "unknown retry preset 'sometimes'" in lines[1]


def test_validate_refuses_what_the_adapters_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "1 rule OK" while serve refused the same files (docs/targets.md's first example had tls
    # on an http:// URL): the adapters are built too, not opened
    connectors = tmp_path / "connectors.yaml"
    connectors.write_text(
        "targets:\n"
        "  - {name: fn, type: http, url: 'http://127.0.0.1:9/fn', headers: {Host: other}}\n"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text("- name: r\n  targets: [fn]\n")
    args = parse(["validate", str(rules), "--connectors", str(connectors)])
    assert args.func(args) == 1
    out, err = capsys.readouterr()
    assert re.fullmatch(rf"eventbus: {connectors}:2: .*'fn': headers may not set Host\n", err), err
    assert (
        out == "1 rule OK (their targets not checked: the connectors did not load)\n"
    )  # the rules' own check, beside the connectors' problems


def test_validate_refuses_delivery_settings_naming_unknown_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "1 rule OK", then every dead letter a dead letter of its own (unknown-target)
    connectors = tmp_path / "connectors.yaml"
    connectors.write_text(
        "targets:\n"
        "  - {name: fn, type: http, url: 'http://127.0.0.1:9/fn'}\n"
        "  - name: billing\n"
        "    type: http\n"
        "    url: 'http://127.0.0.1:9/b'\n"
        "    delivery: {retry: eventbrige}\n"
        "  - name: orders\n"
        "    type: http\n"
        "    url: 'http://127.0.0.1:9/o'\n"
        "    delivery: {dead_letter_target: nope}\n"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text("- name: r\n  targets:\n    - {name: fn, delivery: {on_failure: nada}}\n")
    args = parse(["validate", str(rules), "--connectors", str(connectors)])
    assert args.func(args) == 1
    out, err = capsys.readouterr()
    # both at once, each on the line of its setting
    assert err.splitlines() == [
        f"eventbus: {connectors}:6: targets.1.delivery: unknown retry preset "
        f"'eventbrige'; known: "
        + err.split("known: ", 1)[1].splitlines()[0].removesuffix(" (target 'billing')")
        + " (target 'billing')",
        f"eventbus: {connectors}:10: targets.2.delivery.dead_letter_target: no target "
        "'nope' (target 'orders')",
    ]
    assert (
        out == "1 rule OK (their targets not checked: the connectors did not load)\n"
    )  # checked without the targets: the connectors did not load
    connectors.write_text("targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:9/fn'}\n")
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert f"{rules}:3 rule 'r': " in out and "on_failure: no target 'nada'" in out, out


def test_validate_still_checks_the_rules_where_a_variable_is_not_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # in CI, without the service's secrets: "X is not set", and no rule was checked
    monkeypatch.delenv("EB_TEST_UNSET_URL", raising=False)
    connectors = tmp_path / "connectors.yaml"
    connectors.write_text("targets:\n  - {name: fn, type: http, url: {env: EB_TEST_UNSET_URL}}\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("- name: r\n  mtach: {}\n  targets: [fn]\n")
    args = parse(["validate", str(rules), "--connectors", str(connectors)])
    assert args.func(args) == 1
    out, err = capsys.readouterr()
    assert "environment variable EB_TEST_UNSET_URL is not set" in err, err
    assert f"{rules}:2 rule 'r': mtach" in out, out
    # counted as what it is: the rules' problems, the connectors' told apart (it said "1
    # problem found" for two)
    assert out.endswith(
        "1 problem found in the rules, besides the connectors' (above, on stderr)\n"
    ), out
    # valid rules: OK, and what was not checked (it said "1 rules OK" and exited 1)
    rules.write_text("- name: r\n  match: {}\n  targets: [fn]\n")
    assert args.func(args) == 1
    out, _ = capsys.readouterr()
    assert out == "1 rule OK (their targets not checked: the connectors did not load)\n", out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eventbus rules")
    register(parser.add_subparsers(dest="rules_command", required=True))
    return parser.parse_args(argv)


def test_register_wires_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no connectors/ here: targets are not checked by default
    connectors = tmp_path / "connectors.yaml"
    connectors.write_text(
        "targets:\n  - {name: audit-log, type: http, url: 'http://127.0.0.1:9000/audit'}\n"
    )
    args = parse(["validate", str(DATA / "good"), "--connectors", str(connectors)])
    assert args.func(args) == 1
    assert "unknown target 'thumbnailer'" in capsys.readouterr().out

    args = parse(["validate", str(DATA / "good")])
    assert args.func(args) == 0
    # said "5 rules OK" as if the targets were checked: serve refused the same rules
    assert capsys.readouterr().out == (
        "5 rules OK (1 disabled; their targets not checked: no connectors/ here (give "
        "--connectors DIR))\n"
    )
    # a path given that is not there: a typo checked no target and said OK
    args = parse(["validate", str(DATA / "good"), "--connectors", str(tmp_path / "none")])
    assert args.func(args) == 1
    _, err = capsys.readouterr()
    assert err == f"eventbus: --connectors: no such file or directory: {tmp_path / 'none'}\n"

    args = parse(
        [
            "test",
            "--event",
            str(EVENTS / "binary.json"),
            str(DATA / "good"),
        ]
    )
    assert args.func(args) == 0
    assert orjson.loads(capsys.readouterr().out)["matched"] == ["everything"]

    pattern = tmp_path / "p.json"
    pattern.write_text('{"id": ["b-1"]}')
    args = parse(
        ["test-pattern", "--pattern", str(pattern), "--event", str(EVENTS / "binary.json")]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out == "true\n"


def test_register_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTBUS_CONFIG", raising=False)
    args = parse(["validate"])
    assert not _cli._settings_paths(args)
    assert (args.path, args.connectors) == ("rules", None)  # connectors/, if there
    with pytest.raises(SystemExit):
        parse(["test"])


def test_validate_follows_eventbus_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # it checked ./rules and ./connectors while the other commands followed the variable
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.yaml").write_text("- name: a\n  targets: [fn]\n")
    (tmp_path / "c.yaml").write_text("targets: [{name: fn, type: http, url: 'http://h:9/'}]\n")
    settings = tmp_path / "eventbus.yaml"
    settings.write_text(
        f"rules: {tmp_path / 'r'}\nconnectors: {tmp_path / 'c.yaml'}\n"
        f"database: {{url: 'postgresql://u@h/d', password: {{file: {tmp_path / 'none'}}}}}\n"
    )
    monkeypatch.setenv("EVENTBUS_CONFIG", str(settings))
    monkeypatch.chdir(tmp_path)  # no rules/ nor connectors/ here
    args = parse(["validate"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "1 rule OK\n"
    # its connectors gone: no target, as at the service's start (not "targets not checked")
    (tmp_path / "c.yaml").unlink()
    args = parse(["validate"])
    assert args.func(args) == 1
    assert "unknown target 'fn'" in capsys.readouterr().out
