"""Fuzzing ``eventbus invoke``'s options in process, against a port nobody listens on.

The property: whatever the options, the command ends with a clear one-line error and exit code
2 (unusable input, nothing sent) or 1 (the service cannot be reached), never a traceback; and
input the event could carry is sent (exit 1 here), never refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus.bus._nats_server import free_port
from tests.fuzz._checks import run_cli
from tests.fuzz._inputs import FUZZ, json_values

NOWHERE = f"http://127.0.0.1:{free_port()}"
# argv cannot hold NUL or lone surrogates
arguments = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30
)
# not "-" or "@FILE": standard input and files are not this test's input
inline_data = arguments.filter(lambda d: d != "-" and not d.startswith("@"))


@FUZZ
@given(
    target=arguments,
    options=st.lists(
        st.tuples(
            st.sampled_from(["--type", "--source", "--id", "--subject", "--datacontenttype"]),
            arguments,
        ),
        max_size=4,
    ),
    data=st.none() | inline_data | json_values.map(json.dumps),
    asynchronous=st.booleans(),
)
def test_invoke_options(
    target: str,
    options: list[tuple[str, str]],
    data: str | None,
    asynchronous: bool,
) -> None:
    argv = ["invoke", target, "--url", NOWHERE]
    for name, value in options:
        argv.append(f"{name}={value}")
    if data is not None:
        argv.append(f"--data={data}")
    if asynchronous:
        argv.append("--async")
    code, err = run_cli(argv)
    assert code in (1, 2), (argv, code, err)
    assert "Traceback" not in err and err.startswith(("eventbus: ", "usage: ")), err
    if code == 1:
        assert f"cannot reach eventbus at {NOWHERE}" in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["invoke"], "the following arguments are required: target"),
        (["invoke", "fn", "--data", "{"], "--data is not valid JSON"),
        (["invoke", "fn", "--type", ""], "invalid event"),
        (["invoke", "fn", "--datacontenttype", "json"], "invalid event"),
    ],
)
def test_invoke_bad_input(argv: list[str], message: str) -> None:
    code, err = run_cli([*argv, "--url", NOWHERE])
    assert code == 2 and message in err, err
