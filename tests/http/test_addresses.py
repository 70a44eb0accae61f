"""Client address lists for the whole edge (``client_addresses`` settings), on a real service:
requests sent from several loopback addresses (and over IPv6) are allowed or refused 403
problem+json before any route runs, deny wins over allow, ``X-Forwarded-For`` counts only from
a trusted proxy, the probes are always answered and every refusal is recorded. The matcher
itself: proxy chains by example, and its contract against a plain model of it (hypothesis).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from hypothesis import given
from hypothesis import strategies as st

from eventbus.config import AddressLists
from eventbus.http._addresses import allowed, client_address
from tests.fixtures.service import RunningService, ServeProcess, StartService

KEY = "admin-key-0123456789abcd"
EVENT = orjson.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": "t"})
CE = {"Content-Type": "application/cloudevents+json"}


async def _from(
    svc: RunningService, local: str, method: str, path: str, **headers: str
) -> tuple[int, Any]:
    """A request from the loopback address ``local``: its status and problem detail."""
    connector = aiohttp.TCPConnector(local_addr=(local, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, svc.url + path, data=EVENT, headers=headers) as resp,
    ):
        if resp.status == 403:
            assert resp.headers["Content-Type"] == "application/problem+json"
            problem = await resp.json(content_type=None)
            assert problem["instance"] == path.partition("?")[0]
            return resp.status, problem["detail"]
        return resp.status, None


async def _refusals(svc: RunningService) -> list[tuple[str, str, str]]:
    await svc.service.store.audit.flush()
    rows = await svc.service.store.pool.fetch("SELECT remote, path, reason FROM refusals")
    return sorted((str(r["remote"]), r["path"], r["reason"]) for r in rows)


async def test_every_route_but_the_probes_checks_the_address(eventbus: StartService) -> None:
    svc = await eventbus(
        rules="[]",
        targets=[],
        sources=[{"name": "hook", "type": "webhook"}],
        settings={
            "client_addresses": {
                "allow": ["127.0.0.1/32", "127.0.0.2/32"],
                "deny": ["127.0.0.2/32"],
            },
            "api_keys": [{"name": "adm", "key": KEY, "scopes": ["admin"]}],
        },
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    routes = [
        ("POST", "/events", CE),
        ("POST", "/notifications", {}),
        ("POST", "/events", {**CE, "X-Eventbus-Invocation-Type": "sync"}),
        ("GET", "/rules", {}),
        ("GET", "/metrics", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/console", {}),
        ("POST", "/hooks/hook", {}),
        ("GET", "/no-such-route", {}),
    ]
    for method, path, headers in routes:
        # 127.0.0.3: outside the allow list; 127.0.0.2: inside it, but denied (deny wins)
        for local in ("127.0.0.3", "127.0.0.2"):
            status, detail = await _from(svc, local, method, path, **headers, **auth)
            assert (status, detail) == (403, f"address {local} is not allowed"), (path, local)
    # allowed: on to the route, which asks for an API key like it always does
    assert (await _from(svc, "127.0.0.1", "POST", "/events", **CE))[0] == 401
    assert (await _from(svc, "127.0.0.1", "POST", "/events", **CE, **auth))[0] == 202
    assert (await _from(svc, "127.0.0.1", "GET", "/rules", **auth))[0] == 200
    # no trusted proxies: X-Forwarded-For is read by no one, uvicorn included
    spoofed = {"X-Forwarded-For": "127.0.0.3"}
    assert (await _from(svc, "127.0.0.1", "GET", "/rules", **auth, **spoofed))[0] == 200
    for probe in ("/healthz", "/readyz"):
        assert (await _from(svc, "127.0.0.3", "GET", probe))[0] == 200
    rows = await _refusals(svc)
    refused = [r for r in rows if r[2].endswith("is not allowed")]
    assert len(refused) == 2 * len(routes)
    assert ("127.0.0.3", "/rules", "address 127.0.0.3 is not allowed") in refused
    assert ("127.0.0.2", "/hooks/hook", "address 127.0.0.2 is not allowed") in refused
    assert {r[2] for r in rows} - {r[2] for r in refused} == {"missing API key"}


async def test_forwarded_for_counts_from_trusted_proxies_only(eventbus: StartService) -> None:
    # with API keys: without, a client a proxy relays for is not this machine's (403)
    svc = await eventbus(
        rules="[]",
        targets=[],
        settings={
            "client_addresses": {
                "allow": ["10.0.0.0/8"],
                "deny": ["10.0.0.13/32"],
                "trusted_proxies": ["127.0.0.1/32", "127.0.0.2/32"],
            },
            "api_keys": [{"name": "adm", "key": KEY, "scopes": ["admin"]}],
        },
    )

    async def rules(local: str, forwarded: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {KEY}"}
        if forwarded is not None:
            headers["X-Forwarded-For"] = forwarded
        return await _from(svc, local, "GET", "/rules", **headers)

    assert (await rules("127.0.0.1", "10.1.2.3"))[0] == 200
    # the right-most hop that is not a trusted proxy counts; the rest is the client's word
    assert (await rules("127.0.0.1", "10.1.2.3, 192.0.2.9"))[1] == (
        "address 192.0.2.9 is not allowed"
    )
    assert (await rules("127.0.0.1", "192.0.2.9, 10.1.2.3, 127.0.0.2"))[0] == 200
    assert (await rules("127.0.0.1", "10.0.0.13"))[1] == "address 10.0.0.13 is not allowed"
    # a trusted proxy that names no client: unknown, refused
    assert (await rules("127.0.0.1", None))[1] == "the client's address is unknown"
    assert (await rules("127.0.0.1", "unknown"))[1] == "the client's address is unknown"
    # from a peer that is not a trusted proxy the header counts for nothing
    assert (await rules("127.0.0.3", "10.1.2.3"))[1] == "address 127.0.0.3 is not allowed"
    rows = await _refusals(svc)
    assert ("127.0.0.3", "/rules", "address 127.0.0.3 is not allowed") in rows
    assert ("127.0.0.1", "/rules", "address 192.0.2.9 is not allowed") in rows


async def test_address_lists_over_ipv6(eventbus: StartService) -> None:
    svc = await eventbus(
        rules="[]",
        targets=[],
        settings={"listen": {"host": "::1"}, "client_addresses": {"allow": ["127.0.0.0/8"]}},
    )
    svc.url = svc.url.replace("127.0.0.1", "[::1]")
    status, _, answer = await svc.request("GET", "/rules")
    assert (status, answer["detail"]) == (403, "address ::1 is not allowed")
    assert (await svc.request("GET", "/readyz"))[0] == 200
    svc = await eventbus(
        rules="[]",
        targets=[],
        settings={"listen": {"host": "::1"}, "client_addresses": {"allow": ["::1/128"]}},
    )
    svc.url = svc.url.replace("127.0.0.1", "[::1]")
    assert (await svc.request("GET", "/rules"))[0] == 200


def test_client_address_ipv6_and_proxy_chains() -> None:
    lists = AddressLists.model_validate(
        {"trusted_proxies": ["::1/128", "fd00::/8", "127.0.0.1/32"]}
    )
    v6 = ipaddress.ip_address
    assert client_address(lists.trusted_proxies, "::1", "2001:db8::5") == v6("2001:db8::5")
    chain = "6.6.6.6, 2001:db8::7, fd00::1"
    assert client_address(lists.trusted_proxies, "::1", chain) == v6("2001:db8::7")
    assert client_address(lists.trusted_proxies, "2001:db8::9", chain) == v6("2001:db8::9")
    assert client_address(lists.trusted_proxies, "127.0.0.1", "[::1]") == v6("::1")
    assert client_address(lists.trusted_proxies, "127.0.0.1", "garbage") is None
    assert client_address(lists.trusted_proxies, "127.0.0.1", "") is None
    assert client_address(lists.trusted_proxies, None, "") is None
    # IPv4 clients of a dual-stack socket are IPv4 addresses to the lists
    four = ipaddress.ip_address("127.0.0.1")
    assert client_address(lists.trusted_proxies, "::ffff:127.0.0.1", "[::ffff:127.0.0.1]") == four
    # no trusted proxies: the header is never read
    assert client_address((), "127.0.0.1", "10.0.0.1") == four
    # with a port, as some load balancers write it (read as an unknown client before)
    assert client_address(lists.trusted_proxies, "::1", "10.1.2.3:5555") == v6("10.1.2.3")
    assert client_address(lists.trusted_proxies, "::1", "[2001:db8::5]:443") == v6("2001:db8::5")
    assert client_address(lists.trusted_proxies, "::1", "10.1.2.3:x") is None
    assert client_address(lists.trusted_proxies, "::1", "[2001:db8::5") is None


_V4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
_V6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
_MAPPED = st.builds(lambda n: ipaddress.IPv6Address(0xFFFF00000000 + n), st.integers(0, 2**32 - 1))
_ADDRESS = st.one_of(_V4, _V6, _MAPPED)


@st.composite
def _networks(draw: st.DrawFn) -> str:
    address = draw(_ADDRESS)
    prefix = draw(st.integers(0, address.max_prefixlen))
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _unmapped(value: Any) -> Any:
    """An IPv4-mapped IPv6 address or block (::ffff:0:0/96 and within) as IPv4."""
    if isinstance(value, ipaddress.IPv6Address):
        return value.ipv4_mapped or value
    if isinstance(value, ipaddress.IPv6Network) and value.prefixlen >= 96:
        mapped = value.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{value.prefixlen - 96}")
    return value


def test_an_ipv4_mapped_block_in_a_list_is_its_ipv4_block() -> None:
    # accepted as written and matching no client (clients are matched as IPv4): a deny of
    # ::ffff:10.0.0.13 let 10.0.0.13 through
    deny = AddressLists.model_validate({"deny": ["::ffff:10.0.0.13/128", "::ffff:192.168.0.0/112"]})
    for text in ("10.0.0.13", "::ffff:10.0.0.13", "192.168.7.7"):
        assert not allowed(deny, client_address(deny.trusted_proxies, text, "")), text
    assert allowed(deny, client_address(deny.trusted_proxies, "10.0.0.14", ""))
    allow = AddressLists.model_validate({"allow": ["::ffff:0:0/96"]})  # every IPv4 client
    assert allowed(allow, client_address(allow.trusted_proxies, "10.0.0.14", ""))
    assert not allowed(allow, client_address(allow.trusted_proxies, "2001:db8::1", ""))


@given(
    allow=st.lists(_networks(), max_size=4),
    deny=st.lists(_networks(), max_size=4),
    address=_ADDRESS,
)
def test_allowed_is_deny_first_then_allow(allow: list[str], deny: list[str], address: Any) -> None:
    lists = AddressLists.model_validate({"allow": allow, "deny": deny})
    # an IPv4 client, on a dual-stack socket or written in a list, is matched as IPv4
    client = _unmapped(address)

    def within(blocks: list[str]) -> bool:
        nets = [_unmapped(ipaddress.ip_network(b)) for b in blocks]
        return any(n.version == client.version and client in n for n in nets)

    expected = not within(deny) and (not allow or within(allow))
    assert allowed(lists, client) is expected
    # unknown clients pass only when nothing is restricted
    assert allowed(lists, None) is (not allow and not deny)
    # the peer itself is the client when no proxy is trusted, whatever the header says
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is None:
        assert client_address(lists.trusted_proxies, str(address), "10.9.9.9") == address


async def test_eventbus_serve_checks_addresses(
    serve_process: Callable[..., ServeProcess],
) -> None:
    """The real command: ready (its /readyz answers the denied address), the lists in front
    of every other route."""
    proc = serve_process(
        rules="[]", targets=[], settings={"client_addresses": {"deny": ["127.0.0.1/32"]}}
    )
    await proc.start()
    try:
        for local, expected in (("127.0.0.1", 403), ("127.0.0.2", 200)):
            connector = aiohttp.TCPConnector(local_addr=(local, 0))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(proc.url + "/rules") as resp,
            ):
                assert resp.status == expected, local
    finally:
        assert await proc.terminate() == 0
