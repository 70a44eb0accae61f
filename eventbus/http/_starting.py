"""The edge while the service behind it starts: alive at once, ready once it is.

``eventbus serve`` listens before the service is up (embedded servers, migrations and the bus
can take seconds, a first start of the embedded PostgreSQL longer), so that a liveness probe
does not kill a process that is only starting and a client is told to come back rather than
refused a connection. Until :meth:`Starting.ready` hands it the running service's application,
:class:`Starting` answers ``GET /healthz`` 200 ``{"status": "starting"}``, ``GET /readyz`` 503
``{"status": "starting"}`` and everything else 503 problem+json with ``Retry-After: 1``.
"""

from __future__ import annotations

import orjson

from eventbus.http._problem import PROBLEM, Problem
from eventbus.http._types import ASGIApp, Receive, Scope, Send

__all__ = ["Starting"]

_STARTING = orjson.dumps({"status": "starting"})


class Starting:
    """An ASGI application: the answers above, then (after :meth:`ready`) ``app``'s."""

    def __init__(self) -> None:
        self._app: ASGIApp | None = None

    def ready(self, app: ASGIApp) -> None:
        """Serve every request from now on with ``app``."""
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None:
            await self._app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        headers = [(b"content-type", b"application/json")]
        if path == "/healthz":
            status, body = 200, _STARTING
        elif path == "/readyz":
            status, body = 503, _STARTING
        else:
            problem = Problem(503, "eventbus is starting; try again in a moment")
            status, body = 503, problem.body(path)
            headers = [(b"content-type", PROBLEM.encode()), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
