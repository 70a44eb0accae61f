"""Fuzzing ``eventbus events list`` in process, against an HTTP server of the test's own that
records the request and answers one page of events whose attributes are the fuzzed text.

The property: whatever the filters, the command asks ``GET /events`` with exactly those
filters as query parameters (each decodes back to the value given, none added or lost: no
value reaches another parameter or route), prints the page and exits 0, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz._checks import Recorder, run_cli, serving
from tests.fuzz._inputs import FUZZ

# argv cannot hold NUL or lone surrogates
values = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)


class _Recorder(Recorder):
    paths: ClassVar[list[str]] = []


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    with serving(_Recorder) as url:
        yield url


@FUZZ
@given(
    filters=st.dictionaries(
        st.sampled_from(["source", "type", "since", "until", "after"]), values, max_size=5
    ),
    limit=st.integers(-5, 2000),
    text=values,
)
def test_list_asks_for_exactly_the_filters_given(
    service: str, filters: dict[str, str], limit: int, text: str
) -> None:
    _Recorder.paths.clear()
    item = {
        "source": text,
        "id": text,
        "type": text,
        "subject": None,
        "time": None,
        "received_at": "2026-12-05T12:00:00+00:00",
        "via": text,
        "size": 3,
    }
    _Recorder.body = orjson.dumps({"items": [item], "next_after": text or None})
    argv = ["events", "list", "--url", service, f"--limit={limit}"]
    argv += [f"--{name}={value}" for name, value in filters.items()]
    code, err = run_cli(argv)
    assert "Traceback" not in err, err
    if not 1 <= limit <= 1000:  # the API's bound: refused before anything is sent
        assert code == 2 and "--limit: must be from 1 to 1000" in err, (argv, code, err)
        assert _Recorder.paths == []
        return
    assert code == 0, (argv, code, err)
    (path,) = _Recorder.paths
    parts = urlsplit(path)
    assert parts.path == "/events", path
    asked = parse_qs(parts.query, keep_blank_values=True)
    assert asked == {name: [value] for name, value in {**filters, "limit": str(limit)}.items()}
