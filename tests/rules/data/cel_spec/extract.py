"""Extract the cel-spec conformance cases that eventbus accepts into ``cases.yaml``.

The input is cel-spec's ``tests/simple/testdata/*.textproto`` (the simple conformance tests,
Apache-2.0, https://github.com/google/cel-spec). cel-python's source distribution ships a copy
(``features/*.textproto``, cel-spec 0.24.0), so an ordinary pip client fetches it::

    pip download --no-deps --no-binary :all: cel-python==0.5.0 -d /tmp/celpy
    tar xzf /tmp/celpy/cel_python-0.5.0.tar.gz -C /tmp/celpy
    python tests/rules/data/cel_spec/extract.py /tmp/celpy/cel_python-0.5.0/features

A case is kept when eventbus could run it as a condition: no variable bindings, type
environment, container or check-only flag (eventbus conditions see only ``event``), an expected
value or evaluation error (not an unknown), and an expression that cel-python parses and that
passes eventbus's name checks (functions, methods and macros it allows, no names but macro
variables). The expected result is reduced to the verdict a condition would give.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from eventbus._errors import RuleError
from eventbus.rules._cel import _check_names, _env

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<str>(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')\s*)+"""
    r"""|(?P<word>[-+]?\d[\d.]*[eE][-+]?\d+|[-+]?[\w./]+)|(?P<sym>[{}<>\[\]:,;])"""
)
_ESCAPE = re.compile(
    rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))"
)
_SIMPLE = {bytes([k]): bytes([v]) for k, v in zip(b"ntrabfv", b"\n\t\r\a\b\f\v", strict=True)}


def _unescape(match: re.Match[bytes]) -> bytes:
    octal, hexa, u4, u8, other = match.groups()
    if octal or hexa:
        return bytes([int(octal, 8) if octal else int(hexa, 16)])
    if u4 or u8:
        return chr(int(u4 or u8, 16)).encode()
    return _SIMPLE.get(other, other)


def _string(token: str) -> str:
    # Adjacent literals concatenate; escapes denote bytes (octal ones spell UTF-8).
    parts = re.findall(r""""((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'""", token)
    raw = b"".join(_ESCAPE.sub(_unescape, (a or b).encode()) for a, b in parts)
    return raw.decode("utf-8", errors="surrogateescape")


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "str":
            out.append(("str", _string(match.group())))
        elif kind is not None:
            out.append((kind, match.group()))
    return out


def parse(text: str) -> dict[str, list[Any]]:
    """Protobuf text format, schema-less: every field becomes a list of its occurrences."""
    tokens = _tokens(text)
    position = 0

    def values() -> list[Any]:
        nonlocal position
        kind, value = tokens[position]
        position += 1
        if kind == "sym" and value in "{<":
            return [message("}" if value == "{" else ">")]
        if (kind, value) != ("sym", "["):
            return [(kind, value)]
        items: list[Any] = []
        while tokens[position] != ("sym", "]"):
            if tokens[position] == ("sym", ","):
                position += 1
            else:
                items.extend(values())
        position += 1
        return items

    def message(closing: str | None) -> dict[str, list[Any]]:
        nonlocal position
        fields: dict[str, list[Any]] = {}
        while position < len(tokens):
            kind, value = tokens[position]
            position += 1
            if kind == "sym" and value in "};>":
                if value in ",;":
                    continue
                assert value == closing, (value, closing)
                return fields
            if kind == "sym" and value in ",;":
                continue
            name = value
            if value == "[":  # an extension or Any type URL: [a.b.c]
                name, position = tokens[position][1], position + 2
            if tokens[position] == ("sym", ":"):
                position += 1
            fields.setdefault(name, []).extend(values())
        assert closing is None
        return fields

    return message(None)


def _verdict(test: dict[str, list[Any]]) -> str | None:
    if "eval_error" in test:
        return "error"
    value = test["value"][0] if "value" in test else None
    if value is None and "typed_result" in test:
        value = test["typed_result"][0].get("result", [None])[0]
    if value is None:
        return None
    if "bool_value" in value:
        return "match" if value["bool_value"][0][1] == "true" else "no_match"
    return "not_bool"


def _accepted(expr: str) -> str | None:
    try:
        _check_names(_env().compile(expr))
    except RuleError as exc:
        return " ".join(exc.message.split()[:2])  # "unknown name", "unknown method" ...
    except Exception:
        return "cel-python cannot parse it"
    return None


def extract(folder: Path) -> tuple[list[dict[str, str]], Counter[str]]:
    cases: list[dict[str, str]] = []
    skipped: Counter[str] = Counter()
    for path in sorted(folder.glob("*.textproto")):
        for section in parse(path.read_text()).get("section", []):
            for test in section.get("test", []):
                name = f"{path.stem}/{section['name'][0][1]}/{test['name'][0][1]}"
                unsupported = {"bindings", "type_env", "container", "check_only"} & test.keys()
                verdict = _verdict(test)
                if unsupported:
                    skipped[f"uses {sorted(unsupported)[0]}"] += 1
                elif verdict is None:
                    skipped["expects no value or error"] += 1
                elif reason := _accepted(test["expr"][0][1]):
                    skipped[reason] += 1
                else:
                    cases.append({"name": name, "expr": test["expr"][0][1], "spec": verdict})
    return cases, skipped


def main() -> None:
    cases, skipped = extract(Path(sys.argv[1]))
    header = [
        "# cel-spec's simple conformance tests (https://github.com/google/cel-spec,",
        "# tests/simple/testdata, Apache-2.0; the copy in cel-python 0.5.0's sdist,",
        "# cel-spec 0.24.0)",
        "# that eventbus accepts as conditions, written by extract.py (see it for how to run it).",
        "# spec: the verdict the expected result gives (match | no_match | error | not_bool).",
        f"# kept {len(cases)}; left out: "
        + ", ".join(f"{reason} {count}" for reason, count in skipped.most_common()),
    ]
    body = yaml.safe_dump({"cases": cases}, allow_unicode=True, sort_keys=False, width=100)
    (Path(__file__).parent / "cases.yaml").write_text("\n".join(header) + "\n" + body)
    print(header[-1])


if __name__ == "__main__":
    main()
