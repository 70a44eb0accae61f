"""Fuzzing ``eventbus targets enable NAME`` in process, against an HTTP server of the test's own
that records the request line and answers as the service does for an unknown target (404,
problem+json).

The property: whatever the name, the command asks for exactly that target (one path segment,
percent-encoded, which decodes back to the name: no name reaches another route or another
target), ends with exit code 1 and the service's one-line reason, never a traceback; a name
argparse cannot take (one starting with ``-``) is a usage error (2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz._checks import Recorder, run_cli, serving
from tests.fuzz._inputs import FUZZ

# argv cannot hold NUL or lone surrogates
names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)


class _Recorder(Recorder):
    """Answers as the service does for an unknown target."""

    paths: ClassVar[list[str]] = []
    status = 404
    content_type = "application/problem+json"
    body = orjson.dumps({"title": "Not Found", "status": 404, "detail": "no such target"})


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    with serving(_Recorder) as url:
        yield url


@FUZZ
@given(name=names)
def test_enable_asks_for_exactly_the_named_target(service: str, name: str) -> None:
    _Recorder.paths.clear()
    code, err = run_cli(["targets", "--url", service, "enable", name])
    assert "Traceback" not in err, err
    if name.startswith("-"):
        assert code == 2 and err.startswith("usage: "), (name, code, err)
        return
    assert code == 1 and "no such target" in err, (name, code, err)
    (path,) = _Recorder.paths
    prefix, segment, suffix = path[: len("/targets/")], path[9 : -len("/enable")], path[-7:]
    assert (prefix, suffix) == ("/targets/", "/enable"), path
    assert "/" not in segment and "?" not in segment and "#" not in segment, path
    assert unquote(segment) == name, (path, name)
