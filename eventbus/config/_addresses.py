"""Client address lists: CIDR blocks allowed, denied, and the proxies whose ``X-Forwarded-For``
names the client. The service's ``client_addresses`` settings and every webhook trigger
(``eventbus.sources``, type webhook) write them the same way; the HTTP edge
(``eventbus.http``) matches requests against them.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainValidator

__all__ = ["AddressLists", "Network"]


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR block (IPv4 or IPv6) or one address; host bits set are refused as a likely typo.

    IPv4-mapped IPv6 (``::ffff:10.0.0.0/104``) is its IPv4 block: a client's mapped address is
    matched as IPv4 (a dual-stack socket's view of an IPv4 client), so as written such a
    block matched no one, and a deny listing one let its address through."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"write a CIDR block or an address as a string, not {value!r}")
    try:
        network = ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"not a CIDR block or address: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= _MAPPED_PREFIX:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - _MAPPED_PREFIX))
    return network


_MAPPED_PREFIX = 96  # ::ffff:0:0/96, RFC 4291 2.5.5.2


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(_network)]


class AddressLists(BaseModel):
    """Which client addresses may call: none listed, every one; a denied address is refused
    even when an allow block holds it."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )

    allow: tuple[Network, ...] = ()
    """Client networks allowed (none listed: every one not denied)."""
    deny: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    """Peers whose ``X-Forwarded-For`` names the client (none listed: the header is ignored)."""

    @property
    def restricted(self) -> bool:
        """Whether any address is refused (an allow or deny list is set)."""
        return bool(self.allow or self.deny)
