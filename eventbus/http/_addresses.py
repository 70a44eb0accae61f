"""The client's address and the CIDR lists it must pass, for the whole edge and for each
webhook trigger.

    request ─> AddressGate: /healthz or /readyz? (always answered)
            ─> client address: the peer's, or from X-Forwarded-For when the peer is a trusted
               proxy (for /hooks/<name>, the trigger's trusted proxies too) ─> denied, or not
               allowed? 403 problem+json, refusal recorded
            ─> the rest of the edge (API keys, routes)

Where it sits: outermost in ``create_app``, before any route reads a header or a body, and only
when the ``client_addresses`` settings refuse some address (otherwise it costs nothing).
``HookApp`` (``_hooks``) matches each trigger's own lists with the same two functions.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from eventbus import metrics
from eventbus.config import AddressLists
from eventbus.http._problem import PROBLEM, Problem
from eventbus.http._types import ASGIApp, Receive, Scope, Send, send_answer

if TYPE_CHECKING:
    from eventbus.http._access import RefusalLog

__all__ = ["AddressGate", "allowed", "client_address", "forwarded_for"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
_PROBES = frozenset({"/healthz", "/readyz"})
_PORT = re.compile(r":[0-9]{1,5}")


def _address(text: str | None) -> Address | None:
    """The address ``text`` names: ``a.b.c.d``, an IPv6 address, bracketed or not, and either
    with a port (``a.b.c.d:port``, ``[v6]:port``: some load balancers write one); None for
    anything else."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text, closed, port = text[1:].partition("]")
        if not closed or (port and not _PORT.fullmatch(port)):
            return None
    elif text.count(":") == 1:  # not IPv6, which has two or more
        text, _, port = text.partition(":")
        if not port.isascii() or not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # a dual-stack socket (listen on ::) sees IPv4 clients as ::ffff:a.b.c.d
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Every ``X-Forwarded-For`` of the ASGI ``headers``, joined as one list (RFC 9110: field
    lines of one name are one comma-separated value)."""
    return ",".join(v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for")


def client_address(trusted: Networks, peer: str | None, forwarded: str) -> Address | None:
    """The client's address: the ``peer``'s, or when the peer is a ``trusted`` proxy the
    right-most address of ``forwarded`` (the ``X-Forwarded-For`` value) that is not a trusted
    proxy itself (the left part of the header is whatever the client wrote, so it counts for
    nothing). None when the address that counts is not one, or a trusted proxy sent no
    ``X-Forwarded-For``: the client is then unknown."""
    address = _address(peer)
    if address is None or not trusted:
        return address
    hops = forwarded.split(",")
    while address is not None and any(address in net for net in trusted):
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


class AddressGate:
    """ASGI: answers 403 problem+json to a client ``lists`` refuses (every route but the
    probes), recording the refusal in ``refusals``; hands the rest to ``app``."""

    def __init__(
        self,
        lists: AddressLists,
        refusals: RefusalLog,
        app: ASGIApp,
        proxies: Callable[[str], Networks] | None = None,
    ) -> None:
        """``proxies``: the trusted proxies for a request's path (``lists.trusted_proxies``
        for every path without it)."""
        self._lists = lists
        self._refusals = refusals
        self._app = app
        self._proxies = proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The edge serves no websocket route: only http scopes reach a route.
        if scope["type"] != "http" or scope["path"] in _PROBES:
            await self._app(scope, receive, send)
            return
        peer = scope.get("client")
        remote = peer[0] if peer else None
        path = scope["path"]
        trusted = self._lists.trusted_proxies if self._proxies is None else self._proxies(path)
        address = client_address(trusted, remote, forwarded_for(scope["headers"]))
        if allowed(self._lists, address):
            await self._app(scope, receive, send)
            return
        reason = (
            f"address {address} is not allowed"
            if address is not None
            else "the client's address is unknown"
        )
        self._refusals.record(remote=remote, path=path, reason=reason)
        metrics.EVENTS_REJECTED.labels("http", "forbidden").inc()
        await send_answer(send, 403, PROBLEM, Problem(403, reason).body(path))
