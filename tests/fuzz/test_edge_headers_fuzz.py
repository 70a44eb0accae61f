"""Fuzzing the edge's header readers, which every request passes through before any route:
``request_headers`` (a header repeated: its lines as one list, or refused) and
``client_address`` (X-Forwarded-For from a trusted proxy, its entries with or without a port).

The properties: nothing escapes but ``Problem`` 400; a header that may repeat reads as all of
its lines, in order; any other repeated is refused; an address written with a port names that
address, and text that is no address names no client.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus.http._addresses import client_address
from eventbus.http._problem import Problem
from eventbus.http._types import REPEATABLE_HEADERS, request_headers
from tests.fuzz._inputs import FUZZ

_NAMES = st.sampled_from(
    [*sorted(REPEATABLE_HEADERS), "ce-type", "content-type", "authorization", "x-api-key", "x-a"]
)
_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=20)
_PROXY = (ipaddress.ip_network("127.0.0.1/32"),)


@FUZZ
@given(lines=st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
def test_repeated_headers_read_as_one_list_or_are_refused(lines: list[tuple[str, str]]) -> None:
    raw = [(name.encode(), value.encode("latin-1")) for name, value in lines]
    names = [name for name, _ in lines]
    refused = any(names.count(n) > 1 and n not in REPEATABLE_HEADERS for n in names)
    if refused:
        with pytest.raises(Problem) as info:
            request_headers(raw)
        assert info.value.status == 400
        return
    headers = request_headers(raw)
    for name in set(names):
        assert headers[name] == ", ".join(value for n, value in lines if n == name)


@FUZZ
@given(
    address=st.one_of(
        st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
        st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
    ),
    port=st.one_of(st.none(), st.integers(0, 65535)),
    before=st.sampled_from(["", "  ", "6.6.6.6, "]),
)
def test_a_forwarded_address_with_or_without_a_port_names_it(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int | None, before: str
) -> None:
    if port is None:
        entry = str(address)
    elif address.version == 4:
        entry = f"{address}:{port}"
    else:
        entry = f"[{address}]:{port}"
    found = client_address(_PROXY, "127.0.0.1", before + entry)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    expected = mapped or address
    assert found == expected or (expected in _PROXY[0] and found is not None)


@FUZZ
@given(text=st.text(max_size=40))
def test_any_forwarded_text_names_an_address_or_none(text: str) -> None:
    found = client_address(_PROXY, "127.0.0.1", text)
    assert found is None or isinstance(found, ipaddress.IPv4Address | ipaddress.IPv6Address)
