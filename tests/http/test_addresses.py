"""The client address matcher: proxy chains by example, and its contract against a plain
model of it (hypothesis)."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from eventbus.config import AddressLists
from eventbus.http._addresses import allowed, client_address


def test_client_address_ipv6_and_proxy_chains() -> None:
    lists = AddressLists.model_validate(
        {"trusted_proxies": ["::1/128", "fd00::/8", "127.0.0.1/32"]}
    )
    v6 = ipaddress.ip_address
    assert client_address(lists, "::1", "2001:db8::5") == v6("2001:db8::5")
    chain = "6.6.6.6, 2001:db8::7, fd00::1"
    assert client_address(lists, "::1", chain) == v6("2001:db8::7")
    assert client_address(lists, "2001:db8::9", chain) == v6("2001:db8::9")
    assert client_address(lists, "127.0.0.1", "[::1]") == v6("::1")
    assert client_address(lists, "127.0.0.1", "garbage") is None
    assert client_address(lists, "127.0.0.1", "") is None
    assert client_address(lists, None, "") is None
    # IPv4 clients of a dual-stack socket are IPv4 addresses to the lists
    four = ipaddress.ip_address("127.0.0.1")
    assert client_address(lists, "::ffff:127.0.0.1", "[::ffff:127.0.0.1]") == four
    # no trusted proxies: the header is never read
    assert client_address(AddressLists(), "127.0.0.1", "10.0.0.1") == four


_V4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
_V6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
_ADDRESS = st.one_of(_V4, _V6)


@st.composite
def _networks(draw: st.DrawFn) -> str:
    address = draw(_ADDRESS)
    prefix = draw(st.integers(0, address.max_prefixlen))
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@given(
    allow=st.lists(_networks(), max_size=4),
    deny=st.lists(_networks(), max_size=4),
    address=_ADDRESS,
)
def test_allowed_is_deny_first_then_allow(allow: list[str], deny: list[str], address: Any) -> None:
    lists = AddressLists.model_validate({"allow": allow, "deny": deny})

    def within(blocks: list[str]) -> bool:
        nets = [ipaddress.ip_network(b) for b in blocks]
        return any(n.version == address.version and address in n for n in nets)

    expected = not within(deny) and (not allow or within(allow))
    assert allowed(lists, address) is expected
    # unknown clients pass only when nothing is restricted
    assert allowed(lists, None) is (not allow and not deny)
    # the peer itself is the client when no proxy is trusted, whatever the header says
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is None:
        assert client_address(lists, str(address), "10.9.9.9") == address
