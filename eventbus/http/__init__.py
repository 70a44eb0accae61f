"""The HTTP edge: where publishers and operators reach the running service.

    socket ─> ConnectionGuard (_connections: header/body deadlines, connection cap)
           ─> AddressGate (_addresses: client address lists, when configured; not the probes)
           ─> IngestApp (_ingest: POST /events, POST /notifications as bare ASGI, the hot path)
           ─> FastAPI (_api: audit trail, rules, dead letters, targets, sources, health, metrics;
                       _invoke: POST /targets/{name}/invoke, a target called directly)
    every route: Access (_access: API keys, refusals audited) and Problem (_problem: RFC 9457)

Where it sits: at the top of the pipeline, over the one facade of the running service
(``eventbus.app.Service``); it never reaches into the components behind it.
``create_app(service)`` is the whole ASGI application, ``http_server(app, settings)`` the
uvicorn server that serves it with the ``listen`` limits; ``Starting`` (_starting) answers in
front of it while the service starts, so ``/healthz`` is green as soon as the process listens.
"""

from __future__ import annotations

from eventbus.http._access import is_loopback
from eventbus.http._api import create_app
from eventbus.http._server import HttpServer, http_server
from eventbus.http._starting import Starting

__all__ = ["HttpServer", "Starting", "create_app", "http_server", "is_loopback"]
