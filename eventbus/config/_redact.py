"""Keeping secrets out of what eventbus says: the one place that masks the password of a URL
(a bus, a database, a broker a connector reaches) before it goes into a log line or an error
message. Every module that reports a URL it was configured with passes it through here."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# scheme://user:password@host, for each URL of a comma-separated list of servers; the password
# runs to the last "@" of its URL, so one that holds an unencoded "@" is masked whole
_PASSWORD = re.compile(r"(//[^:/@?,\s]*:)[^/?,\s]*@")
# NATS takes a bare token as the user part: nats://TOKEN@host
_TOKEN = re.compile(r"\b((?:nats|tls|ws|wss)://)[^:/@?,\s]+@")
# libpq's and asyncpg's query parameters: postgresql://u@h/db?password=...
_QUERY = re.compile(r"([?&](?:ssl)?password=)[^&#\s]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with every ``user:password@`` part shown as ``user:***@``, a NATS token
    (``nats://token@``) as ``***``, and a ``password`` or ``sslpassword`` query parameter as
    ``password=***``."""
    return _QUERY.sub(r"\1***", _TOKEN.sub(r"\1***@", _PASSWORD.sub(r"\1***@", url)))
