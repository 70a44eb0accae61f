"""Fuzzing ``eventbus dlq count`` and a confirmed ``dlq purge`` in process, against an HTTP
server of the test's own that records each request and answers what a service would, with
fuzzed values.

The properties: whatever the filters, ``dlq count`` asks ``GET /dead-letters/count`` with
exactly those filters (none added or lost), and prints either "no dead letters match" or the
count and the options that act on exactly those, exit 0, never a traceback; ``dlq purge`` given
``--through`` and ``--expect`` sends both with its filters to ``DELETE /dead-letters``."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus.cli import main
from tests.fuzz._checks import Recorder, serving
from tests.fuzz._inputs import FUZZ

# argv cannot hold NUL or lone surrogates
values = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
FILTERS = st.dictionaries(
    st.sampled_from(["rule", "target", "source", "since", "until"]), values, max_size=5
)
ids = st.integers(-(2**63), 2**63 - 1)


class _Recorder(Recorder):
    paths: ClassVar[list[str]] = []
    methods: ClassVar[list[str]] = []

    def do_DELETE(self) -> None:
        type(self).methods.append("DELETE")
        self._answer()

    def do_GET(self) -> None:
        type(self).methods.append("GET")
        self._answer()


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    with serving(_Recorder) as url:
        yield url


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _asked(path: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(path)
    return parts.path, parse_qs(parts.query, keep_blank_values=True)


@FUZZ
@given(
    filters=FILTERS,
    through=st.none() | ids,
    count=st.integers(0, 2**40),
    last_id=st.none() | ids,
    text=st.none() | values,
)
def test_count_asks_for_exactly_the_filters_given(
    service: str,
    filters: dict[str, str],
    through: int | None,
    count: int,
    last_id: int | None,
    text: str | None,
) -> None:
    _Recorder.paths.clear()
    _Recorder.methods.clear()
    answer = {"count": count, "newest": text, "last_id": last_id, "since": text}
    _Recorder.body = orjson.dumps(answer)
    argv = ["dlq", "count", "--url", service]
    argv += [f"--{name}={value}" for name, value in filters.items()]
    if through is not None:
        argv.append(f"--through={through}")
    code, out, err = _run(argv)
    assert "Traceback" not in err, err
    if through is not None and through < 1:  # refused before anything is sent
        assert code == 2 and "--through: must be from 1" in err, (argv, code, err)
        assert _Recorder.paths == []
        return
    assert code == 0, (argv, code, err)
    (path,) = _Recorder.paths
    asked = {**filters, **({} if through is None else {"through": str(through)})}
    assert _asked(path) == ("/dead-letters/count", {k: [v] for k, v in asked.items()})
    assert _Recorder.methods == ["GET"]
    if not count:
        assert out == "no dead letters match\n"
    else:
        first, options = out.split("\n", 1)[0], out.rstrip("\n").rsplit("\n", 1)[-1]
        assert first.startswith(f"{count} dead letter")
        assert options.endswith(f"--through {last_id} --expect {count}"), options
        assert ("--since " in options) == bool(text), options


@FUZZ
@given(filters=FILTERS, through=ids, expect=st.integers(-5, 2**40), purged=st.integers(0, 99))
def test_a_confirmed_purge_sends_its_filters_through_and_expect(
    service: str, filters: dict[str, str], through: int, expect: int, purged: int
) -> None:
    _Recorder.paths.clear()
    _Recorder.methods.clear()
    _Recorder.body = orjson.dumps({"purged": purged})
    argv = ["dlq", "purge", "--url", service, f"--through={through}", f"--expect={expect}"]
    argv += [f"--{name}={value}" for name, value in filters.items()]
    code, out, err = _run(argv)
    assert "Traceback" not in err, err
    if through < 1 or expect < 0:  # refused before anything is sent
        assert code == 2 and "must be from" in err, (argv, code, err)
        assert _Recorder.paths == []
        return
    assert code == 0, (argv, code, err)
    (path,) = _Recorder.paths
    asked = {**filters, "through": str(through), "expect": str(expect)}
    assert _asked(path) == ("/dead-letters", {k: [v] for k, v in asked.items()})
    assert _Recorder.methods == ["DELETE"]
    assert out.startswith(f"purged {purged} dead letter")
