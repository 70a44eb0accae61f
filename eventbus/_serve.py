"""``eventbus serve``: run the service under uvicorn, in one process or several.

One process: ``Service`` (every component) plus the HTTP API on ``listen.host:port``.
SIGTERM/SIGINT stop the HTTP server first (no new events accepted), then the service shuts
down gracefully: in-flight deliveries finish, nothing undelivered is acknowledged.

Several processes (``--workers N``, to use more than one core): the parent starts the embedded
nats-server and PostgreSQL if no URLs are configured and runs N worker processes; each binds
the port with ``SO_REUSEPORT`` so the kernel spreads connections evenly among them (one shared
listening socket let one worker take most of them), and they share the work through the bus's
durable consumer (or consumer group). Sources run in the first worker only. The parent
forwards SIGTERM to the workers, restarts one that dies, supervises the embedded servers (and
stops everything, exiting non-zero, when one cannot be brought back), and stops them last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import uvicorn

from eventbus._errors import EventBusError
from eventbus.api import create_app
from eventbus.app import Service, start_embedded
from eventbus.config import Settings

__all__ = ["serve"]

log = logging.getLogger("eventbus")


def _quiet_signals() -> None:
    # uvicorn re-raises the signal it caught once it has stopped; with these handlers that
    # re-raise is harmless and the service below it still shuts down gracefully.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


async def _serve_one(settings: Settings, reuse_port: bool) -> None:
    async with Service(settings) as service:
        config = uvicorn.Config(
            create_app(service),
            host=settings.listen.host,
            port=settings.listen.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.router.shutdown_grace),
        )
        server = uvicorn.Server(config)
        _quiet_signals()
        # Start-up objects (compiled rules, modules) live for the whole run: keep them out of
        # every future garbage collection pass.
        gc.freeze()
        await server.serve(sockets=[_bind(settings, listen=True)] if reuse_port else None)
        log.info("HTTP server stopped; shutting the service down")


def _bind(settings: Settings, *, listen: bool) -> socket.socket:
    """A socket on the listen address with SO_REUSEPORT; only listening ones get connections,
    so the parent's unlistened one just holds the port (and fails early if it is taken)."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.listen.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.listen.host, settings.listen.port))
    if listen:
        sock.listen(2048)
    return sock


async def _supervise(settings: Settings, workers: int, config_path: str | None) -> None:
    env = dict(os.environ)
    async with contextlib.AsyncExitStack() as stack:
        embedded = await start_embedded(stack, settings)
        if settings.embedded_bus:
            env["EVENTBUS_BUS__NATS__URL"] = str(embedded.nats_url)
        if settings.embedded_database:
            env["EVENTBUS_DATABASE__URL"] = embedded.database_url
        sock = _bind(settings, listen=False)
        stack.callback(sock.close)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        failed = False

        def spawn(i: int) -> subprocess.Popen[bytes]:
            cmd = [sys.executable, "-m", "eventbus", "serve", "--reuse-port"]
            if config_path:
                cmd += ["--config", config_path]
            worker_env = dict(
                env,
                EVENTBUS_RUN_SOURCES="true" if i == 0 else "false",
                EVENTBUS_LISTEN__HOST=settings.listen.host,
                EVENTBUS_LISTEN__PORT=str(settings.listen.port),
            )
            return subprocess.Popen(cmd, env=worker_env)

        for i in range(workers):
            procs[i] = spawn(i)
        log.info("started %d workers on %s:%d", workers, settings.listen.host, settings.listen.port)
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
            if embedded.supervisor.failed is not None:
                # The workers cannot work without their servers: stop everything and exit
                # non-zero, so whatever runs eventbus restarts it.
                log.error("giving up: %s", embedded.supervisor.failed)
                failed = True
                break
            for i, proc in enumerate(procs):
                if proc is not None and proc.poll() is not None and not stopping.is_set():
                    log.warning("worker %d exited with %s; restarting", i, proc.returncode)
                    procs[i] = spawn(i)
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # a worker's grace for deliveries, then the audit flush (up to 10 s), then margin
        deadline = settings.router.shutdown_grace + 30
        for proc in procs:
            if proc is None:
                continue
            try:
                await asyncio.to_thread(proc.wait, deadline)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if failed:
        raise EventBusError(f"stopped: {embedded.supervisor.failed}")


def serve(
    settings: Settings,
    *,
    workers: int = 1,
    reuse_port: bool = False,
    config_path: str | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. Raises ConfigError, StoreError or BusError at start-up."""
    runner: Any
    runner = (
        _supervise(settings, workers, config_path)
        if workers > 1
        else _serve_one(settings, reuse_port)
    )
    try:
        import uvloop

        uvloop.run(runner)
    except ImportError:
        asyncio.run(runner)
