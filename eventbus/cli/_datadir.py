"""One ``eventbus serve`` per data directory, and where the CLI finds it.

``eventbus serve`` holds an exclusive ``flock`` on ``<data_dir>/serve.lock`` for as long as it
runs: the embedded nats-server and PostgreSQL under the directory belong to that process, and a
second ``serve`` on the same directory is refused at once, naming the first, instead of
stopping its servers under it. The kernel drops the lock when the process ends, however it
ends (a ``kill -9`` too), so the next start knows that any server still running there was left
behind by a dead owner and may be stopped. The lock file holds the owner's PID and the URL of
its HTTP API, which the other commands use when neither ``--url`` nor ``EVENTBUS_URL`` is
given (:func:`default_url`); it is removed on a clean stop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from eventbus._errors import ConfigError

__all__ = ["LOCK_NAME", "client_url", "default_url", "hold_data_dir", "running_service"]

LOCK_NAME = "serve.lock"
_FALLBACK_URL = "http://127.0.0.1:8080"


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a server listening on ``host:port`` at (an
    every-interface address is reached on loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"http://{host}:{port}"


@contextlib.contextmanager
def hold_data_dir(data_dir: Path, *, host: str, port: int) -> Iterator[None]:
    """Own ``data_dir`` (created if missing) while the block runs.

    Raises ConfigError "data dir D is in use by PID N (eventbus serve on HOST:PORT)" at once
    when another live process owns it. The lock file is removed when the block ends, and the
    directory too if this call created it and nothing else was put there.
    """
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_NAME
        fd = _lock(path, data_dir)
    except OSError as exc:  # a file there, under a file, read-only, no permission
        raise ConfigError(
            f"data dir {str(data_dir)!r} cannot be used: {exc.strerror or exc}"
        ) from exc
    try:
        owner = {"pid": os.getpid(), "listen": f"{host}:{port}", "url": client_url(host, port)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, orjson.dumps(owner) + b"\n", 0)
        except OSError as exc:  # the disk full: a traceback said so
            raise ConfigError(
                f"data dir {str(data_dir)!r} cannot be used: {exc.strerror or exc}"
            ) from exc
        yield
    finally:
        # Unlinked while still locked: whoever opened the old file and locks it after us sees
        # that the path no longer names it (see _lock) and starts over.
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:  # a start refused before anything ran leaves no trace
            with contextlib.suppress(OSError):
                data_dir.rmdir()


def _lock(path: Path, data_dir: Path) -> int:
    # A holder that names no owner is another serve between its lock and its write, or a
    # command reading the file (running_service): worth a short wait, never a long one.
    patience = time.monotonic() + 1.0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            owner = _owner(path)
            if (owner is None or "pid" not in owner) and time.monotonic() < patience:
                time.sleep(0.05)
                continue
            raise ConfigError(f"data dir {data_dir} is in use by {_describe(owner)}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the owner we waited on removed this file on its way out: take the new one


def _owner(path: Path) -> dict[str, object] | None:
    """What the lock file at ``path`` says about its live owner, or None if nobody holds it.
    Raises ConfigError when it cannot be read (another user's, readable by that user only: it
    read as "nobody runs here" while that user's service ran)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        raise ConfigError(
            f"cannot read {path}: that data dir belongs to another user, whose eventbus serve "
            "may be running there; run this command as that user, or name the service with "
            "--url or EVENTBUS_URL"
        ) from None
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # held: someone runs here
        else:
            return None  # nobody holds it: a file left by a process that is gone
        raw = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    return _said(raw)


def _said(raw: bytes) -> dict[str, object]:
    """What a lock file holds: ``{}`` while its owner is still writing it (or for junk)."""
    try:
        owner = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, object] | None) -> str:
    if owner is None or "pid" not in owner:
        return "another process"
    return f"PID {owner['pid']} (eventbus serve on {owner.get('listen')})"


def running_service(data_dir: str | Path) -> str | None:
    """The HTTP URL of the ``eventbus serve`` that owns ``data_dir`` now, or None."""
    url = (_owner(Path(data_dir) / LOCK_NAME) or {}).get("url")
    return url if isinstance(url, str) else None


def default_url() -> str:
    """Where the commands find the service: ``$EVENTBUS_URL``, else the service running on the
    data directory here (``$EVENTBUS_DATA_DIR`` or ``.eventbus``), else http://127.0.0.1:8080
    when there is no data directory here. With ``$EVENTBUS_CONFIG`` set, the data directory
    and the address are that settings file's (with the ``EVENTBUS_*`` overrides), as ``serve``
    reads them: the commands went to 127.0.0.1:8080, perhaps another instance.

    Raises ConfigError when the data directory here was used by a service that is not running
    now: the fallback would have been another instance (a purge or a replay acting on it)."""
    url = os.environ.get("EVENTBUS_URL")
    if url:
        return url
    data_dir = Path(os.environ.get("EVENTBUS_DATA_DIR") or ".eventbus")
    fallback = _FALLBACK_URL
    config = os.environ.get("EVENTBUS_CONFIG")
    if config:
        from eventbus.config import service_address

        try:
            data_dir, host, port = service_address(config)
        except ConfigError as exc:
            raise ConfigError(f"finding the service from EVENTBUS_CONFIG: {exc}") from exc
        fallback = client_url(host, port)
    owner = _owner(data_dir / LOCK_NAME)
    if owner is not None:  # held: a service runs there
        held = owner.get("url")
        if isinstance(held, str):
            return held
        raise ConfigError(f"the eventbus serve on data dir {data_dir} is starting: try again")
    if _used(data_dir):
        last = _last_owner(data_dir / LOCK_NAME)
        gone = f" (its last one, {_describe(last)}, is gone)" if last else ""
        raise ConfigError(
            f"no eventbus serve is running on data dir {data_dir}{gone}: start it, or name the "
            "service with --url or EVENTBUS_URL"
        )
    return fallback


def _used(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds anything (a service ran on it): not an empty directory."""
    try:
        return any(data_dir.iterdir())
    except OSError:  # absent, not a directory, unreadable
        return False


def _last_owner(path: Path) -> dict[str, object] | None:
    """What a lock file left by an owner that is gone (killed) says about it, or None."""
    try:
        owner = _said(path.read_bytes())
    except OSError:
        return None
    return owner if "pid" in owner else None
