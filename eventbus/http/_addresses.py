"""The client's address and the CIDR lists it must pass: the webhook triggers' lists
(``_hooks``), matched by these functions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from eventbus.config import AddressLists

__all__ = ["allowed", "client_address", "forwarded_for"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    # a dual-stack socket (listen on ::) sees IPv4 clients as ::ffff:a.b.c.d
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Every ``X-Forwarded-For`` of the ASGI ``headers``, joined as one list (RFC 9110: field
    lines of one name are one comma-separated value)."""
    return ",".join(v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for")


def client_address(lists: AddressLists, peer: str | None, forwarded: str) -> Address | None:
    """The client's address: the ``peer``'s, or when the peer is a trusted proxy the right-most
    address of ``forwarded`` (the ``X-Forwarded-For`` value) that is not a trusted proxy
    itself (the left part of the header is whatever the client wrote, so it counts for
    nothing). None when the address that counts is not one, or a trusted proxy sent no
    ``X-Forwarded-For``: the client is then unknown."""
    address = _address(peer)
    if address is None or not lists.trusted_proxies:
        return address
    hops = forwarded.split(",")
    while address is not None and any(address in net for net in lists.trusted_proxies):
        if not hops:
            break
        address = _address(hops.pop())
    return address


def allowed(lists: AddressLists, address: Address | None) -> bool:
    """Whether ``address`` passes ``lists``: not denied, and allowed when an allow list is set
    (deny wins). With either list set, an unknown address (None) does not pass."""
    if not lists.restricted:
        return True
    if address is None:
        return False
    if any(address in net for net in lists.deny):
        return False
    return not lists.allow or any(address in net for net in lists.allow)
