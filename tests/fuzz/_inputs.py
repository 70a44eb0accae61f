"""What the fuzz tests throw at eventbus: hypothesis strategies for random bytes and for
near-valid input (a valid event with one attribute mutated), plus the fixed settings that make
every run reproduce (derandomized: the same examples on every machine, every run)."""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# One fixed, derandomized profile: CI runs the same examples every time, so a failure
# reproduces. The running service is deliberately shared by a test's examples.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

BASE = {
    "specversion": "1.0",
    "id": "fuzz-1",
    "source": "tests/fuzz",
    "type": "com.example.fuzz",
}
ATTRIBUTES = (
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "dataschema",
    "datacontenttype",
    "data",
    "data_base64",
    "partitionkey",
)

# Text without surrogates (orjson cannot write them); control characters included.
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
control_text = st.text(st.characters(codec="ascii", categories=["Cc"]), min_size=1, max_size=3)
huge_text = st.integers(1_000, 300_000).map(lambda n: "x" * n)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# Around the depth limit and around the JSON serializer's limit (254), and anywhere between.
deep = (st.sampled_from([63, 64, 65, 66, 252, 253, 254, 255]) | st.integers(1, 400)).map(nested)


def _two(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(lambda n: f"{n:02d}")


# Times that look right and are not: every field pushed past its range, odd offsets and forms.
odd_times = st.builds(
    lambda y, mo, d, t, h, mi, s, frac, z: f"{y:04d}-{mo}-{d}{t}{h}:{mi}:{s}{frac}{z}",
    st.sampled_from([0, 1, 2016, 9999]),
    _two(0, 13),
    _two(0, 32),
    st.sampled_from("Tt "),
    _two(0, 25),
    _two(0, 61),
    _two(0, 61),
    st.sampled_from(["", ".5", ".999999999", "."]),
    st.sampled_from(["Z", "z", ""])
    | st.builds(
        lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"), _two(0, 25), _two(0, 99)
    ),
) | st.datetimes().map(lambda moment: moment.isoformat())

wrong_types = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(text, st.integers(), max_size=2)
)

attribute_values = (
    text
    | control_text
    | huge_text
    | wrong_types
    | odd_times
    | deep
    | json_values
    | st.sampled_from(["", "café", "é" * 3000, "\x00", "AAEC", "=="])
)
# What each attribute is most likely to get wrong, tried as often as anything else.
_SPECIFIC: dict[str, st.SearchStrategy[Any]] = {
    "time": odd_times
    | st.sampled_from(
        [
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59-00:01",
            "9999-12-31T23:59:60Z",
            "0001-01-01t00:00:00-23:59",
            "2016-12-31T23:59:60z",
            "2024-02-29T12:00:00+05:75",
        ]
    ),
    "data": deep | json_values,
    "data_base64": st.sampled_from(["café", "AA==", "A", "AAEC\n", "=" * 4]) | text,
    "datacontenttype": text
    | st.sampled_from(["text/plain; charset=ascii", "text/plain; charset=nope", "a/b; x=é"]),
    "dataschema": text | st.sampled_from(["urn:x", "http://é", "x:"]),
}
extension_names = st.sampled_from(["ext", "Ext", "e-x", "data", "ce", "x" * 300, ""]) | text
extension_counts = st.sampled_from([49, 50, 51]) | st.integers(1, 200)


# Ways to make an event near-valid: change one attribute, add an extension, add many, drop one.
CHANGES = (*ATTRIBUTES, "extension", "extensions", "removal")


def changed_events(change: str) -> st.SearchStrategy[dict[str, Any]]:
    """Valid events (with or without data) changed in one way from ``CHANGES``; an attribute
    mostly gets a value that attribute is likely to get wrong."""
    specific = _SPECIFIC.get(change)
    values = attribute_values if specific is None else specific | specific | attribute_values

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        event: dict[str, Any] = dict(BASE)
        if draw(st.booleans()):
            event["data"] = draw(json_values)
        if change == "extension":
            event[draw(extension_names)] = draw(attribute_values)
        elif change == "extensions":
            value = draw(st.sampled_from(["v", "é" * 10, "x" * 200, 7, True]))
            event.update({f"ext{i}": value for i in range(draw(extension_counts))})
        elif change == "removal":
            event.pop(draw(st.sampled_from(sorted(BASE))))
        else:
            event[change] = draw(values)
        return event

    return build()


def near_valid_events() -> st.SearchStrategy[dict[str, Any]]:
    """Events changed in any one of the ways in ``CHANGES``."""
    return st.sampled_from(CHANGES).flatmap(changed_events)


# Header values an HTTP client may send: no control characters but tab (HTTP forbids them, and
# aiohttp refuses to); anything else goes, non-ASCII included (sent as raw UTF-8).
header_values = st.text(
    st.characters(exclude_categories=["Cs", "Cc"], include_characters="\t"), max_size=60
)
token = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=20)
# Header names a client sets from the request itself (framing, the connection): aiohttp refuses
# to send some of them as given ("Content-Length: ''") and would be the one tested.
_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
header_names = token.filter(lambda name: name.lower() not in _FRAMING)


@st.composite
def binary_headers(draw: st.DrawFn) -> dict[str, str]:
    """``ce-*`` headers of a near-valid event, or of random names and values."""
    if draw(st.booleans()):
        headers = {f"ce-{name}": value for name, value in BASE.items()}
        if draw(st.booleans()):
            headers[draw(st.sampled_from(sorted(headers)))] = draw(header_values)
        else:
            headers["ce-" + draw(token | st.sampled_from(["data", "data_base64", "time"]))] = draw(
                header_values | odd_times.map(lambda t: quote(t, safe=":+"))
            )
    else:
        headers = draw(st.dictionaries(token.map(lambda t: "ce-" + t), header_values, max_size=6))
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(["application/json", "text/plain; charset=latin-1", "image/png"])
            | header_values
        )
    return headers


durations_ago = st.tuples(  # since=/until= take them: that long before now
    st.integers(0, 10**25).map(str) | st.floats(0, 1e12).map(lambda f: f"{f:f}"),
    st.sampled_from(["ms", "s", "m", "h", "d"]),
).map("".join)

query_values = (
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "99999999999999999999",
            "-9223372036854775809",
            "4294967296",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-00:01",
            "true",
            "1e3",
            "١٢",
        ]
    )
    | text
    | st.integers(-(2**80), 2**80).map(str)
    | odd_times
    | durations_ago
)


def url_part(value: str) -> str:
    """``value`` percent-encoded for a URL path or query (UTF-8)."""
    return quote(value, safe="")
