"""Fuzzing ``json_body``, which reads every JSON body (webhooks, ``POST /events`` in binary
mode) whatever charset its Content-Type declares, with JSON in many encodings and with random
bytes under random labels.

The properties: a body in UTF-16 or UTF-32 is read as that (its bytes show it); one that is
UTF-8 is read as UTF-8 whatever its label; any other body is read in its declared charset;
what comes back is labelled without a charset other than UTF-8
(eventbus writes JSON in UTF-8); and nothing but CloudEventError (400) or a JSON decoding error
escapes.
"""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from eventbus._errors import CloudEventError
from eventbus.cloudevents import json_body
from tests.fuzz._inputs import FUZZ

CHARSETS = ["utf-8", "UTF-16", "utf-16le", "utf-16-be", "iso-8859-1", "latin1", "cp1252", "ascii"]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TYPES = st.sampled_from(["application/json", "text/json", "application/vnd.x+json"])
PARAMS = st.lists(st.sampled_from(["v=1", " q=x", "profile=a"]), max_size=2)


def _label(media: str, charset: str | None, params: list[str]) -> str:
    parts = [media, *params]
    if charset is not None:
        parts.insert(1 + len(params) // 2, f" charset={charset}")
    return ";".join(parts)


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(VALUES, st.sampled_from(CHARSETS), TYPES, PARAMS)
def test_json_in_any_declared_charset_is_read_and_relabelled(
    value: object, charset: str, media: str, params: list[str]
) -> None:
    text = orjson.dumps(value).decode()
    try:
        body = text.encode(charset)
    except UnicodeEncodeError:
        return  # not writable in that charset: no client sends it so
    label = _label(media, charset, params)
    got, content_type = json_body(body, label)
    # a one-byte charset's text that is valid UTF-8 too is read as UTF-8 (the usual mislabel);
    # UTF-16 and UTF-32 show in the bytes, even ASCII text without a mark (valid UTF-8)
    one_byte = charset.lower() in ("iso-8859-1", "latin1", "cp1252", "ascii")
    expected = orjson.loads(body) if one_byte and _is_utf8(body) else value
    assert got == expected
    if charset.lower().replace("-", "") == "utf8":
        assert content_type == label  # as it came
    else:
        assert "charset" not in content_type.lower(), content_type
        assert content_type.split(";")[0] == media
        assert [p.strip() for p in content_type.split(";")[1:]] == [p.strip() for p in params]


@FUZZ
@given(
    st.binary(max_size=64),
    st.sampled_from([*CHARSETS, "no-such-charset", "utf-32", "", '"utf-16"'])
    | st.text(max_size=12),
    TYPES,
)
def test_any_bytes_under_any_label_are_read_or_refused_cleanly(
    body: bytes, charset: str, media: str
) -> None:
    label = f"{media}; charset={charset}"
    try:
        got, content_type = json_body(body, label)
    except CloudEventError as exc:
        assert exc.status == 400 and exc.detail, exc
        return
    except orjson.JSONDecodeError:
        return
    assert orjson.loads(orjson.dumps(got)) == got  # a value eventbus can write again
    assert content_type.startswith(media)
