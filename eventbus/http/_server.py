"""The HTTP server of the edge: uvicorn serving the application behind the connection limits.

Where it sits: ``eventbus serve`` (``eventbus.cli``) runs one per process; the tests run the
same server in-process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from eventbus.config import Settings
from eventbus.http._connections import ConnectionGuard
from eventbus.http._types import ASGIApp

__all__ = ["HttpServer", "http_server"]

log = logging.getLogger("eventbus.http")


class HttpServer(uvicorn.Server):
    """uvicorn's server, calling ``on_shutdown`` (when set) as its shutdown begins: long-lived
    responses (the console's live stream) end then, instead of holding the shutdown for the
    whole ``router.shutdown_grace``. With ``on_hurry`` set, a second SIGTERM or SIGINT, while
    it shuts down or after (the service's own stop), ends the requests still running (as the
    end of the grace does) and calls ``on_hurry``; uvicorn alone took only a second SIGINT,
    and only to stop waiting for them."""

    on_shutdown: Callable[[], None] | None = None
    on_hurry: Callable[[], None] | None = None
    served = False
    """Whether ``serve`` has returned: a signal now comes after the first."""
    _loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets)
        finally:
            # (uvicorn raised the signals it caught again before returning: they were seen)
            self.served = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_hurry is not None:
            log.info(
                "stopping: up to %g s for the work under way (router.shutdown_grace); "
                "a second SIGTERM or Ctrl-C stops at once",
                self.config.timeout_graceful_shutdown,
            )
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's handler while it serves."""
        if self.should_exit:
            self._hurry_soon()
        super().handle_exit(sig, frame)

    def stop_signal(self) -> None:
        """A SIGTERM or SIGINT outside uvicorn's handling: before it serves (stop when it
        starts), or once it has served (stop at once)."""
        if self.served:
            self._hurry_soon()
        else:
            self.should_exit = True

    def _hurry_soon(self) -> None:
        # a signal handler runs between any two bytecodes: the work goes to the loop
        loop = self._loop
        if self.on_hurry is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.hurry)

    def hurry(self) -> None:
        """Stop now: end the requests still running (each answered as cut off by the end of
        the grace) and call ``on_hurry``."""
        self.force_exit = True
        for task in self.server_state.tasks:
            task.cancel(msg="a second signal: stopping now")
        if self.on_hurry is not None:
            self.on_hurry()


def http_server(app: ASGIApp, settings: Settings, *, http: str = "auto") -> HttpServer:
    """The uvicorn server for ``app`` on ``listen.host:port`` with the ``listen`` limits;
    ``http`` picks uvicorn's parser (``auto``: httptools when installed, else h11). Logs which
    parser and event loop serve: both weigh on the CPU each request costs."""
    listen = settings.listen
    parser = http
    if http == "auto":
        parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    try:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop = "none running yet"
    log.info("HTTP server: parser %s, event loop %s", parser, loop)
    guard = ConnectionGuard(
        header_timeout=listen.header_timeout,
        body_timeout=listen.body_timeout,
        max_connections=listen.max_connections,
        send_timeout=listen.send_timeout,
    )
    config = uvicorn.Config(
        guard.wrap(app),
        host=listen.host,
        port=listen.port,
        http=guard.protocol(http),
        log_config=None,
        # one line per request costs CPU on the hot path: only when someone reads them
        access_log=logging.getLogger("uvicorn.access").isEnabledFor(logging.DEBUG),
        lifespan="off",
        # uvicorn would otherwise take the client's address from X-Forwarded-For of any
        # loopback peer (or $FORWARDED_ALLOW_IPS): the address lists trust only the proxies
        # they name (_addresses)
        proxy_headers=False,
        # whole seconds (uvicorn's type): rounded up, a grace of 0.5 s is not none at all
        timeout_graceful_shutdown=math.ceil(settings.router.shutdown_grace),
    )
    return HttpServer(config)
