"""Access control of the HTTP edge: API keys with scopes, and the audit of refused requests,
rate-limited so that a flood of requests without a valid API key does not cost a database row
each.

Where it sits: every route of the edge but the health checks and metrics asks :class:`Access`
first. With API keys configured, a request needs ``Authorization: Bearer <key>`` (or
``X-API-Key``); scope ``publish`` may publish, ``admin`` may do everything. A refused request
(401/403) goes to :class:`RefusalLog`: up to ``per_second`` refusals a second become rows of
the ``refusals`` table through the audit writer. The rest are counted in
``eventbus_refusals_unrecorded`` and, once their second is over, summed up in one summary row
and one log line. So the table grows by at most ``per_second + 1`` rows a second per process,
whatever the request rate.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from eventbus import metrics
from eventbus.config import ApiKey
from eventbus.http._addresses import Networks, client_address
from eventbus.http._problem import Problem

if TYPE_CHECKING:
    from eventbus.app import Service

__all__ = ["Access", "RefusalLog", "is_loopback"]

log = logging.getLogger("eventbus.http")


# What a proxy adds to a request it relays (nginx setups often add X-Real-IP alone)
_RELAY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


class RefusalLog:
    """Records refusals through ``service``, at most ``per_second`` one by one each second."""

    def __init__(self, service: Service, per_second: int = 20) -> None:
        self._service = service
        self._per_second = per_second
        self._second = -1
        self._recorded = 0  # rows written in the current second
        self._unrecorded = 0  # refusals waiting for their summary row
        self._summary: asyncio.Task[None] | None = None

    def record(self, *, remote: str | None, path: str, reason: str) -> None:
        """Record one refusal, or count it for the summary. Never waits: with the audit
        buffer full it is counted for the summary too."""
        now = time.monotonic()
        second = int(now)
        if second != self._second:
            self._second, self._recorded = second, 0
        if self._recorded < self._per_second:
            self._recorded += 1
            if self._service.record_refusal(remote=remote, path=path, reason=reason):
                return
        self._unrecorded += 1
        metrics.REFUSALS_UNRECORDED.inc()
        if self._summary is None:
            self._summary = asyncio.create_task(self._summarize(second + 1 - now))

    async def _summarize(self, delay: float) -> None:
        await asyncio.sleep(delay)
        count, self._unrecorded = self._unrecorded, 0
        self._summary = None
        reason = (
            f"{count} more refused requests were not recorded one by one "
            f"(over {self._per_second} a second)"
        )
        log.warning("refused requests: %s", reason)
        if not self._service.record_refusal(remote=None, path="*", reason=reason):
            # the audit buffer is full or the service stopping: the log line and metric remain
            log.warning("refused requests: summary row not written")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, without a port) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").partition("%")[0]).is_loopback
    except ValueError:
        return False  # "" (every interface) or a host name, which may resolve to anything


def _host_name(authority: str) -> str:
    """``host`` of ``host[:port]`` (``[v6]:port`` included); "" when it is not one."""
    try:
        return urlsplit(f"//{authority}").hostname or ""
    except ValueError:
        return ""


class Access:
    """API keys with scopes ``publish`` and ``admin``; no keys configured means open access.

    ``check`` raises Problem 401 (no or unknown key) or 403 (key without the scope) and
    audits the refusal (rate-limited: :class:`RefusalLog`). Open access on a loopback address
    (``local``) is for this machine's programs, not for the web pages its browser shows: a
    request addressed to another host name (DNS rebinding: a page whose name resolves to
    127.0.0.1 reads what it likes) or sent from a page of another origin (a cross-site form
    posting to ``/dead-letters/replay``) is refused with 403. So is one a proxy relayed
    (``X-Forwarded-For`` or ``Forwarded``) for a client other than this machine: behind a
    proxy on this machine, its Host and Origin can say loopback while the client is anyone.
    ``trusted``: the proxies whose ``X-Forwarded-For`` names the client (the service's
    ``client_addresses.trusted_proxies``)."""

    def __init__(
        self,
        keys: tuple[ApiKey, ...],
        refusals: RefusalLog,
        *,
        local: bool = False,
        trusted: Networks = (),
    ) -> None:
        self._keys = [(k.key.reveal().encode(), frozenset(k.scopes), k.name) for k in keys]
        self._refusals = refusals
        self._local = local and not keys
        self._trusted = trusted
        self._hosts: dict[str, bool] = {}

    async def check(
        self,
        headers: Mapping[str, str],
        path: str,
        remote: str | None,
        scope: str,
        *,
        from_anywhere: bool = False,
    ) -> str | None:
        """``headers`` with lower-case names. Returns the name of the key that was given, None
        when no keys are configured. ``from_anywhere``: a webhook, which senders elsewhere
        reach through whatever names them (a tunnel's host name); see
        :meth:`from_this_machine`."""
        if not self._keys:
            if not from_anywhere:
                self.from_this_machine(headers, path, remote)
            return None
        header = headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        given = given or headers.get("x-api-key", "")
        found = None
        for key, scopes, name in self._keys:
            # compare against every key, so timing does not tell which prefix matched
            if given and hmac.compare_digest(given.encode(), key):
                found = (scopes, name)
        if found is None:
            reason = "missing API key" if not given else "invalid API key"
            self._refusals.record(remote=remote, path=path, reason=reason)
            metrics.EVENTS_REJECTED.labels("http", "unauthorized").inc()
            raise Problem(401, reason, headers={"WWW-Authenticate": "Bearer"})
        scopes, name = found
        if scope not in scopes and "admin" not in scopes:
            reason = f"key {name!r} lacks scope {scope!r}"
            self._refusals.record(remote=remote, path=path, reason=reason)
            raise Problem(403, reason)
        return name

    def from_this_machine(
        self,
        headers: Mapping[str, str],
        path: str,
        remote: str | None,
        remedy: str = "",
        trusted: Networks | None = None,
    ) -> None:
        """Without API keys on loopback, refuse (403) a request that is not from this
        machine's programs or the console, its reason ending with ``remedy``; with keys, or
        exposed on purpose, nothing to check. ``trusted``: the proxies whose
        ``X-Forwarded-For`` names the client (the service's unless given: a trigger adds its
        own)."""
        if not self._local:
            return
        host = headers.get("host", "")
        local = self._hosts.get(host)
        if local is None:  # parsed once per Host value (a handful), not on every request
            local = is_loopback(_host_name(host))
            if len(self._hosts) < 64:
                self._hosts[host] = local
        reason = None
        if not local:
            reason = (
                f"Host {host[:100]!r} is not a loopback name: without API keys eventbus answers "
                "requests to localhost or a loopback address only"
            )
        elif any(name in headers for name in _RELAY_HEADERS):
            reason = self._relayed(headers, remote, self._trusted if trusted is None else trusted)
        if local and reason is None:
            origin = headers.get("origin")
            # a browser names the page that sent the request; this machine's own programs
            # (curl, SDKs, the CLI) send no Origin, the console the service's own
            if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
                reason = (
                    f"a request from the web page of {origin[:100]!r} is refused: without API "
                    "keys only this machine's programs and the console may call eventbus"
                )
            elif headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                # A GET from another site's page (an <img>, a no-cors fetch) carries no
                # Origin; browsers say where it came from here.
                reason = (
                    "a request from another site's web page is refused: without API keys only "
                    "this machine's programs and the console may call eventbus"
                )
        if reason is not None:
            reason += remedy
            self._refusals.record(remote=remote, path=path, reason=reason)
            metrics.EVENTS_REJECTED.labels("http", "forbidden").inc()
            raise Problem(403, reason)

    @staticmethod
    def _relayed(headers: Mapping[str, str], remote: str | None, trusted: Networks) -> str | None:
        """Why a request a proxy relayed is refused, or None when a ``trusted`` proxy's
        ``X-Forwarded-For`` names this machine as the client."""
        forwarded = headers.get("x-forwarded-for", "")
        peer = client_address((), remote, "")
        client = None
        if forwarded and peer is not None and any(peer in net for net in trusted):
            client = client_address(trusted, remote, forwarded)
            if client is not None and client.is_loopback:
                return None
        who = f"client {client}" if client is not None else "a client it does not name"
        return (
            f"a request a proxy relayed for {who} is refused: without API keys eventbus "
            "answers this machine's programs only; set api_keys (a proxy on this machine "
            "relaying for itself: list it in client_addresses.trusted_proxies)"
        )
