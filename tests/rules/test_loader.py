"""Rule files to documents: YAML dialect, line table, file-level errors (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventbus.rules._loader import read_rule_files

DATA = Path(__file__).parent / "data"


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_scalars_stay_the_strings_the_user_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "- name: r\n"
        "  match: {state: [on, off, yes, no, 2026-11-28, '1'], flag: [true, false],\n"
        "          code: [010, 12:30, 0x1F, 1_000, +1, .5], n: [0, -7, 1e3, 2.5, -0.5e-1],\n"
        "          m: [{numeric: [=, 5]}]}\n"
        "  targets: [t]\n",
    )
    docs, errors = read_rule_files(path)
    assert errors == []
    assert docs[0].data["match"] == {
        "state": ["on", "off", "yes", "no", "2026-11-28", "1"],
        "flag": [True, False],
        # numbers as JSON writes them; YAML 1.1 read 8, 750, 31, 1000, 1 and 0.5 here
        "code": ["010", "12:30", "0x1F", "1_000", "+1", ".5"],
        "n": [0, -7, 1000.0, 2.5, -0.05],
        # YAML 1.1's value key: no constructor for it
        "m": [{"numeric": ["=", 5]}],
    }


def test_lines_of_keys_and_items(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# comment\n"
        "- name: first\n"
        "  targets:\n"
        "    - a\n"
        "    - name: b\n"
        "      delivery: {retry: 3}\n"
        "- name: second\n"
        "  targets: [c]\n",
    )
    docs, errors = read_rule_files(path)
    assert errors == []
    first, second = docs
    assert (first.file, second.file) == (str(path), str(path))
    assert first.line() == 2
    assert first.line(("targets",)) == 3
    assert first.line(("targets", 0)) == 4
    assert first.line(("targets", 1, "delivery", "retry")) == 6
    # A path the file does not have resolves to its closest ancestor.
    assert first.line(("targets", 1, "transform", "template")) == 5
    assert second.line(("name",)) == 7


def test_directory_reads_yaml_files_in_name_order() -> None:
    docs, errors = read_rule_files(DATA / "good")
    assert errors == []
    assert [Path(d.file).name for d in docs] == ["01-uploads.yaml"] * 2 + ["02-orders.yml"] * 3


def test_hidden_files_of_a_directory_are_not_rules(tmp_path: Path) -> None:
    # An editor's lock file (Emacs: .#rules.yaml, a link to nothing while the file is open)
    # was read: every reload was refused, "cannot read rule file", until the editor closed.
    write(tmp_path, "- name: a\n  targets: [t]\n")
    (tmp_path / ".#rules.yaml").symlink_to("user@host.1234:1700000000")
    (tmp_path / ".rules.yaml.bak").write_text("- name: old\n  targets: [t]\n")
    (tmp_path / ".old.yml").write_text("- name: older\n  targets: [t]\n")
    docs, errors = read_rule_files(tmp_path)
    assert errors == []
    assert [d.data["name"] for d in docs] == ["a"]


def test_merge_keys_yield_to_own_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "- name: a\n"
        "  targets:\n"
        "    - name: t\n"
        "      delivery: &slow {timeout: 30, retry: {attempts: 3}}\n"
        "- name: b\n"
        "  targets:\n"
        "    - name: t\n"
        "      delivery:\n"
        "        <<: *slow\n"
        "        timeout: 5\n",
    )
    docs, errors = read_rule_files(path)
    assert errors == []
    assert docs[1].data["targets"][0]["delivery"] == {"timeout": 5, "retry": {"attempts": 3}}
    assert docs[1].line(("targets", 0, "delivery", "timeout")) == 10


def test_a_mapping_with_merge_keys_reused_through_an_alias_reads_the_same(tmp_path: Path) -> None:
    # The first use changed the node (merged pairs flattened in): the second saw a duplicate.
    path = write(
        tmp_path,
        "- name: base\n"
        "  match: &m\n"
        "    <<: {source: [a], type: [t1]}\n"
        "    source: [b]\n"
        "- name: reuse\n"
        "  match: *m\n",
    )
    docs, errors = read_rule_files(path)
    assert errors == []
    assert docs[0].data["match"] == docs[1].data["match"] == {"source": ["b"], "type": ["t1"]}


_BOMB = "- name: bomb\n  x:\n    - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
_BOMB += "".join(f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
_WIDE = (
    f"- name: r1\n  description: &s {'x' * 100_000}\n  targets: [t]\n- name: r2\n"
    f"  match: {{source: [{', '.join(['*s'] * 20_000)}]}}\n  targets: [t]\n"
)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # unclosed: where it began (the end of the file was named, and its last rule)
        ("- name: a\n  match: {x: [1]\n", 2, "(while parsing a flow mapping, from line 2)"),
        ("- name: a\n\tmatch: {}\n", 2, "invalid YAML"),
        ("name: a\ntargets: [t]\n", 1, "a rule file holds a YAML list of rules"),
        ("just text\n", 1, "a rule file holds a YAML list of rules"),
        ("- name: a\n  name: b\n", 2, "duplicate key 'name' (first at line 1)"),
        ("- name: a\n  ? [x, y]\n  : 1\n", 2, "must be a string"),
        ("- &a [*a]\n", 1, "an alias refers to itself"),
        ("- !!python/object:os.system {}\n", 1, "unsupported YAML tag"),
        ("- !!python/name:os.system x\n", 1, "invalid YAML"),
        # two hundred levels (a thousand, before): a RecursionError out of the builder
        ("- x: " + "[" * 200 + "]" * 200 + "\n", 1, "nested more than 128 levels deep"),
        # fifty thousand: libyaml's composer crashed the process (a segmentation fault)
        ("- name: a\n  x: " + "[" * 50_000 + "]" * 50_000 + "\n", 2, "nested too deep"),
        # a few hundred bytes of aliases of aliases: gigabytes, minutes (billion laughs)
        (_BOMB, 3, "aliases repeat more than 100,000 values"),
        # few aliases of one long string: 2 GB and 6 s once the rule set was written out
        (_WIDE, 2, "aliases repeat more than 8,388,608 characters"),
        ("- name: a\n  targets: [t]\n- name: b\x00\n", 3, "control characters"),
        # mappings: each key past the limit was also said "key None must be a string"
        ("- x: " + "{a: " * 200 + "1" + "}" * 200 + "\n", 1, "nested more than 128 levels deep"),
        # Python's own limit on reading an int: a ValueError out of the load, a reload's 500
        ("- name: a\n  x: " + "9" * 5000 + "\n", 2, "an integer of more than 4,300 digits"),
        ("- name: a\n  x: !!timestamp 2020-13-45\n", 2, "'2020-13-45' as !!timestamp: month"),
        # a KeyError and an IndexError of PyYAML's constructors escaped the same way
        ("- name: a\n  x: !!bool maybe\n", 2, "cannot read 'maybe' as !!bool"),
        ("- name: a\n  x: !!int ''\n", 2, "cannot read '' as !!int"),
        ("- name: a\n  x: !!int 12abc\n", 2, "cannot read '12abc' as !!int: invalid literal"),
        # a key: not also "None must be a string"
        ("- name: a\n  ? " + "1" * 5000 + "\n  : 1\n", 2, "an integer of more than 4,300"),
    ],
    ids=[
        "unclosed",
        "tab",
        "mapping",
        "scalar",
        "duplicate",
        "list-key",
        "recursive",
        "tag",
        "scalar-tag",
        "deep",
        "deeper",
        "aliases",
        "long-aliases",
        "nul",
        "deep-mappings",
        "long-integer",
        "no-date",
        "no-bool",
        "empty-int",
        "not-int",
        "long-key",
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    _, errors = read_rule_files(path)
    assert len(errors) == 1
    assert errors[0].file == str(path)
    assert errors[0].line == line
    assert message in errors[0].message
    assert "\n" not in errors[0].message  # the reader's second line was its own position


def test_a_yaml_error_names_the_rule_it_is_in(tmp_path: Path) -> None:
    # file and line only: in a file of many rules, which one was left to find
    text = "- name: ok\n  targets: [t]\n- name: 'broken'\n  match: {a: [1, }\n  targets: [t]\n"
    _, (error,) = read_rule_files(write(tmp_path, text))
    assert (error.line, error.rule) == (4, "broken")


def test_every_file_problem_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "- name: a\n  name: b\n  targets: [t]\n  targets: [u]\n", "a.yaml")
    write(tmp_path, "- name: [\n", "b.yaml")
    write(tmp_path, b"\xff\xfe".decode("latin-1"), "c.yml")
    (tmp_path / "c.yml").write_bytes(b"\xff\xfe- x")
    docs, errors = read_rule_files(tmp_path)
    assert [d.data["name"] for d in docs] == ["a"]
    assert [(Path(e.file or "").name, e.line) for e in errors] == [
        ("a.yaml", 2),
        ("a.yaml", 4),
        ("b.yaml", 2),
        ("c.yml", None),
    ]
    assert "cannot read rule file" in errors[-1].message


def test_empty_file_and_missing_path(tmp_path: Path) -> None:
    assert read_rule_files(write(tmp_path, "# nothing yet\n")) == ([], [])
    docs, errors = read_rule_files(tmp_path / "absent")
    assert docs == []
    assert [e.message for e in errors] == ["no such rule file or directory"]


def test_a_quote_never_closed_names_the_rule_it_is_in(tmp_path: Path) -> None:
    # The parser read on to the end of the file: the error named the last rule and line.
    text = (
        '- name: first\n  description: "unclosed\n  targets: [t]\n- name: third\n  targets: [t]\n'
    )
    _, (error,) = read_rule_files(write(tmp_path, text))
    assert (error.line, error.rule) == (2, "first"), error
    assert "while scanning a quoted scalar, from line 2" in error.message, error


def test_a_mistake_in_a_block_names_the_rule_where_it_is_found(tmp_path: Path) -> None:
    # The parser's context is then the file's list, from line 1: naming the rule by it named
    # the first rule of the file for a mistake in its third.
    text = "- name: first\n  targets: [t]\n- name: second\n  targets: [t]\n - name: third\n"
    _, (error,) = read_rule_files(write(tmp_path, text))
    assert (error.line, error.rule) == (5, "second"), error
