"""Keeping secrets out of what eventbus says: the one place that masks the password of a URL
(a bus, a database, a broker a connector reaches) before it goes into a log line or an error
message. Every module that reports a URL it was configured with passes it through here."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# Each URL of a comma-separated list starts at its scheme (a comma inside a password stays
# in its URL); a NATS URL may carry a bare token as its user part: nats://TOKEN@host
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_TOKEN_SCHEMES = frozenset({"nats://", "tls://", "ws://", "wss://"})
_WEB_SCHEMES = frozenset({"http://", "https://"})
# host, host:port, [v6]:port, or a list of them: what may follow the userinfo's "@"
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:@/?#\[\]]*)(:\d+)?")
# libpq's and asyncpg's query parameters: postgresql://u@h/db?password=...
_QUERY = re.compile(r"([?&](?:ssl)?password=)[^&#\s]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with every ``user:password@`` part shown as ``user:***@``, a NATS token
    (``nats://token@``) as ``***``, and a ``password`` or ``sslpassword`` query parameter as
    ``password=***``. A password holding an unencoded ``@``, ``/``, ``?``, ``#``, ``,`` or a
    space is masked whole: it runs to the URL's last ``@`` (in a web URL, unless that ``@``
    starts a path segment after a host: ``https://u:1/x/@h`` is taken for a path)."""
    # the first URL starts wherever it is ("cannot reach nats://..."); another follows a
    # list's comma, spaces after it allowed ("://" inside a password starts none, one after a
    # space in it neither: "u: p://@h" showed " p://")
    found = [m.start() for m in _SCHEME.finditer(url)]
    starts = found[:1] + [i for i in found[1:] if url[:i].rstrip(" ").endswith(",")]
    if not starts:
        return _QUERY.sub(r"\1***", url)
    pieces = [url[: starts[0]]]
    pieces += [url[a:b] for a, b in zip(starts, [*starts[1:], len(url)], strict=True)]
    return _QUERY.sub(r"\1***", "".join(_masked(piece) for piece in pieces))


def _masked(piece: str) -> str:
    found = _SCHEME.match(piece)
    if found is None:
        return piece
    scheme, rest = found.group(0), piece[found.end() :]
    # The password runs to the URL's last "@", whatever it holds ("/", "?", "#", ","): a
    # broker's or a database's URL has no "@" after its host (over-masking a query or path that
    # has one hides the host, never the password). A web URL's path segment may start with one.
    at = rest.rfind("@")
    if at < 0:
        return piece
    if scheme.lower() in _WEB_SCHEMES and rest[at - 1 : at] == "/":
        end = rest.find("/")
        if _is_host(rest[:end]):  # a path segment of a web URL: /users/@me, /@scope/pkg
            return piece
    return _masked_at(scheme, rest, at)


def _masked_at(scheme: str, rest: str, at: int) -> str:
    userinfo, tail = rest[:at], rest[at:]
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        if "@" in user:
            # not a user's name: a token URL and text after it up to another URL's password
            # ("tls://TOKEN@h; also ws://u:pw@h2" showed the token): all of it masked
            return f"{scheme}***{tail}"
        return f"{scheme}{user}:***{tail}"
    if scheme.lower() in _TOKEN_SCHEMES:
        return f"{scheme}***{tail}"
    return scheme + rest


def _is_host(authority: str) -> bool:
    return all(_HOST_PORT.fullmatch(part) for part in authority.rstrip(",").split(","))
