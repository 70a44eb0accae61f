"""The HTTP server of the edge: uvicorn serving the application behind the connection limits.

Where it sits: ``eventbus serve`` (``eventbus.cli``) runs one per process; the tests run the
same server in-process.
"""

from __future__ import annotations

import uvicorn

from eventbus.config import Settings
from eventbus.http._connections import ConnectionGuard
from eventbus.http._types import ASGIApp

__all__ = ["http_server"]


def http_server(app: ASGIApp, settings: Settings, *, http: str = "auto") -> uvicorn.Server:
    """The uvicorn server for ``app`` on ``listen.host:port`` with the ``listen`` limits;
    ``http`` picks uvicorn's parser (``auto``: httptools when installed, else h11)."""
    listen = settings.listen
    guard = ConnectionGuard(
        header_timeout=listen.header_timeout,
        body_timeout=listen.body_timeout,
        max_connections=listen.max_connections,
    )
    config = uvicorn.Config(
        guard.wrap(app),
        host=listen.host,
        port=listen.port,
        http=guard.protocol(http),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(settings.router.shutdown_grace),
    )
    return uvicorn.Server(config)
