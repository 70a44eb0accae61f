"""``eventbus serve``: run the service under uvicorn, in one process or several.

One process: ``Service`` (every component) plus the HTTP API on ``listen.host:port``.
SIGTERM/SIGINT stop the HTTP server first (no new events accepted), then the service shuts
down gracefully: in-flight deliveries finish, nothing undelivered is acknowledged. SIGHUP
reloads the rules, as ``POST /rules/reload`` does.

Several processes (``--workers N``, to use more than one core): the parent starts the embedded
nats-server and PostgreSQL if no URLs are configured and runs N worker processes; each binds
the port with ``SO_REUSEPORT`` so the kernel spreads connections evenly among them (one shared
listening socket let one worker take most of them), and they share the work through the bus's
durable consumer (or consumer group). Sources run in the first worker only. Any worker answers
for all: the workers count their metrics in files of ``data_dir/workers/metrics`` (see
``eventbus.metrics``), share their sources' statuses in ``data_dir/workers/sources`` and their
live feeds through sockets in ``data_dir/workers/live`` (the console's live stream on any
worker shows what every worker routes: ``eventbus.router.PeerFeed``). The parent forwards
SIGTERM and SIGHUP to the workers (a worker whose rules were reloaded over HTTP sends its
parent SIGHUP, so that every worker reloads), restarts one that dies, supervises the embedded
servers (and stops everything, exiting non-zero, when one cannot be brought back), and stops
them last.

Either way the HTTP server runs with the limits of ``listen`` (header and body deadlines, a
connection cap: ``eventbus.http``), and a ``listen.host`` reachable from the network is
refused without ``api_keys`` unless ``allow_unauthenticated`` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from eventbus import metrics
from eventbus._errors import ConfigError, EventBusError
from eventbus._files import replace_file
from eventbus._tasks import cancel_and_wait, wait_event
from eventbus.app import CONNECTORS_SNAPSHOT, FINGERPRINTS, Service, start_embedded
from eventbus.cli._datadir import client_url, hold_data_dir
from eventbus.config import (
    EMBEDDED_NATS_ENV,
    PARENT_ENV,
    RESTARTED_ENV,
    WORKER_ENV,
    Settings,
    connector_texts,
)
from eventbus.http import HttpServer, Starting, create_app, http_server, is_loopback
from eventbus.sources import SharedStatuses

__all__ = ["serve"]

log = logging.getLogger("eventbus")

# descriptors a process needs besides client connections: database pool, bus, targets, logs
_OTHER_FILES = 256
_QUICK_EXIT = 10.0
_FIRST_BEAT = 30.0  # seconds from a worker's spawn to its first beat, besides worker_hang_timeout
_BEAT_EVERY = 1.0  # seconds between two beats of a worker (see _beat)
"""Seconds after its start within which a worker's exit counts as failing to start."""
_QUICK_EXITS_TO_GIVE_UP = 5
"""Such exits in a row of every worker after which the parent stops everything and exits
non-zero."""
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SETTINGS_SNAPSHOT = "settings.yaml"  # the settings file as the parent read it, in the shared dir
_LIVE_PREFIX = "eventbus-live-"  # the workers' live-feed sockets' directory, in the temporary one


def _address(settings: Settings) -> tuple[str, int]:
    return settings.listen.host, settings.listen.port


def _console_url(settings: Settings) -> str:
    """Where a browser on this machine finds the console (``GET /`` leads there too)."""
    return client_url(settings.listen.host, settings.listen.port) + "/console"


def _stop_on_signals(server: HttpServer) -> None:
    """SIGTERM/SIGINT tell ``server`` to stop, before it runs and takes them itself, and
    after, to stop at once (see ``HttpServer.stop_signal``). Ignored until then, a signal
    during the start was lost: the service started and ran on."""

    def stop(signum: int, frame: object) -> None:
        server.stop_signal()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def _check_exposure(settings: Settings) -> None:
    """Refuse (ConfigError) to offer purge, replay and reload to the network without API keys;
    with ``allow_unauthenticated`` say loudly that it is so."""
    host = settings.listen.host
    if settings.api_keys or is_loopback(host):
        return
    if not settings.allow_unauthenticated:
        raise ConfigError(
            f"listen.host {host!r} is reachable from the network but no api_keys are set: "
            "anyone could publish events, purge and replay dead letters and reload rules. "
            "Set api_keys (for example EVENTBUS_API_KEYS, see docs/configuration.md), listen on "
            "127.0.0.1, or set allow_unauthenticated: true when something in front of eventbus "
            "authenticates every request"
        )
    log.warning(
        "NO AUTHENTICATION: listening on %s:%d without api_keys (allow_unauthenticated: true); "
        "anyone who reaches this port may publish, purge, replay and reload",
        host,
        settings.listen.port,
    )


def _room_for_connections(settings: Settings) -> None:
    """Raise the soft open-file limit (up to the hard one) so that ``listen.max_connections``,
    not a failing accept() or database connect, is what turns clients away."""
    want = settings.listen.max_connections + _OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning(
            "the open-file limit (hard %d) leaves room for fewer than listen.max_connections "
            "(%d) clients; raise it (ulimit -n) or lower the setting",
            hard,
            settings.listen.max_connections,
        )


GC_YOUNG_THRESHOLD = 20_000
"""Net container allocations between two collections of the youngest generation (CPython's
default is 700). An event's objects (request, dicts, coroutines, futures) nearly all die within
milliseconds: with 700, a collection ran every few events and walked the ones still in flight,
about a tenth of a worker's CPU at 800-1,600 events/s, and a full collection now and then paused the
loop for up to ~70 ms. With 20,000 most of them are gone before a collection looks."""


def settle_gc() -> None:
    """Tune the garbage collector for serving, once the service has started: start-up objects
    (modules, compiled rules) live for the whole run, so they leave every future collection
    (``gc.freeze``), and the youngest generation is collected less often."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


async def _serve_one(settings: Settings, reuse_port: bool) -> None:
    # A SIGHUP while the service starts (a reload asked too early, a parent passing one on, a
    # closed terminal) is not the end of it: its default action ended the process, leaving the
    # embedded servers running unowned. It is remembered, and the rules are reloaded once
    # started (a worker starting while the others reloaded kept the old rules: it had read
    # the files before they changed, and the signal was dropped). Once started, SIGHUP reloads.
    signal.signal(signal.SIGHUP, _hup_while_starting)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # a worker is born with it blocked
    if reuse_port:
        _end_with_parent()
        beat = asyncio.create_task(_beat(_workers_dir(settings) / "beats" / str(os.getpid())))
        try:
            await _serve_worker(settings)
        finally:
            await cancel_and_wait(beat)
        return
    # One process: listen at once, so /healthz answers while the service starts (Starting);
    # a taken port is refused before anything starts.
    sock = _bind(settings, listen=True, share=False)
    front = Starting()
    server = http_server(front, settings)
    _stop_on_signals(server)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("listening on %s:%d (the console: %s)", *_address(settings), _console_url(settings))
    async with contextlib.AsyncExitStack() as stack:
        # Leaving early (the service failed to start): stop listening too. A signal during the
        # start stops the HTTP server at once; the start is let finish (cutting it short could
        # leave an embedded server running unowned), then everything stops in order.
        stack.push_async_callback(_stop_serving, server, serving)
        try:
            service = await stack.enter_async_context(Service(settings))
        except EventBusError as exc:
            if not server.should_exit:
                raise
            # Ctrl-C reaches the whole process group: initdb or pg_ctl, killed by it, made
            # the start fail, and that was reported as a broken PostgreSQL.
            log.info("interrupted while starting; stopping what had started")
            log.debug("the start ended with: %s", exc)
            raise KeyboardInterrupt from None
        _reload_on_sighup(service, server)
        front.ready(create_app(service))
        server.on_shutdown = service.closing
        # Not under --workers N: Ctrl-C reaches a worker beside the parent's SIGTERM.
        server.on_hurry = service.hurry
        settle_gc()
        await serving
        log.info("HTTP server stopped; shutting the service down")


async def _serve_worker(settings: Settings) -> None:
    """A worker of ``--workers N``: it shares its sources' statuses with the others, and
    listens once ready, for the kernel hands a listening worker its share of the connections
    (the others keep serving while one restarts)."""
    async with Service(settings, shared=_workers_dir(settings)) as svc:
        _reload_on_sighup(svc)
        parent = os.getppid()
        svc.rules_reloaded = functools.partial(_tell_parent, parent)
        if os.environ.get(RESTARTED_ENV):
            _tell_parent(parent)  # see _supervise: every worker reads the files it read
        server = http_server(create_app(svc), settings)
        server.on_shutdown = svc.closing
        _stop_on_signals(server)
        settle_gc()
        await server.serve(sockets=[_bind(settings, listen=True)])
        log.info("HTTP server stopped; shutting the service down")


async def _beat(path: Path) -> None:
    """Touch ``path`` every second while this worker's event loop turns: its parent kills and
    restarts a worker whose beat has stopped (frozen, or its loop blocked), which answered none
    of its share of the connections and of the probes for as long as that lasted."""
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # said below, every second
        await asyncio.to_thread(path.touch)
    while True:
        # on the loop itself, not in a thread: a blocked loop must stop the beat
        try:
            os.utime(path)
        except OSError as exc:
            log.warning("cannot beat in %s: %s", path, exc)
        await asyncio.sleep(_BEAT_EVERY)


def _end_with_parent() -> None:
    """A worker is told SIGTERM when its parent dies (Linux's parent-death signal), and stops
    as on any SIGTERM. A parent killed with SIGKILL (the OOM killer) left its workers serving,
    beside the next parent's, on the same port and data."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to end with the parent: %s", os.strerror(ctypes.get_errno()))
    if str(os.getppid()) != parent:  # it died before the request took
        raise EventBusError(f"the parent process {parent} is gone")


_hups_while_starting: list[bool] = []  # each: whether it was the terminal's hang-up
_reloads: set[asyncio.Task[None]] = set()  # the reloads SIGHUP started (a task needs an owner)


def _hup_while_starting(signum: int, frame: object) -> None:
    # told apart as it comes (see _hung_up): acted on once started, seconds later maybe
    _hups_while_starting.append(_hung_up())


def _has_terminal() -> bool:
    """Whether this process has a controlling terminal still (one that hung up has none)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


# Whether a terminal's hang-up may stop eventbus: started from one (not by systemd or a
# container), and not under nohup (SIGHUP ignored: its user wants it to outlive the terminal).
_MAY_HANG_UP = _has_terminal() and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
_TERMINAL_SEEN_EVERY = 1.0  # seconds between checks that the terminal is still there
_terminal_seen = time.monotonic()  # when it was last seen


def _watch_terminal() -> None:
    """Note, every second, that the terminal eventbus was started from is still there; in a
    thread of its own (the event loop may be held for seconds, compiling rules at the start),
    ended when the terminal is gone."""
    global _terminal_seen

    def watch() -> None:
        global _terminal_seen
        while _has_terminal():
            _terminal_seen = time.monotonic()
            time.sleep(_TERMINAL_SEEN_EVERY)

    if _MAY_HANG_UP:
        _terminal_seen = time.monotonic()
        threading.Thread(target=watch, name="eventbus-terminal", daemon=True).start()


def _hung_up() -> bool:
    """Whether a SIGHUP is the hang-up of the terminal eventbus was started from (its window
    closed: gone now, there moments ago), not "reload the rules": it went on serving unseen,
    its logs lost, its data directory held (the next start refused). A SIGHUP long after the
    terminal went (eventbus disowned, then an operator's ``kill -HUP``) reloads."""
    return (
        _MAY_HANG_UP
        and not _has_terminal()
        and time.monotonic() - _terminal_seen < 3 * _TERMINAL_SEEN_EVERY
    )


def _say_hung_up() -> None:
    log.warning("the terminal eventbus ran in hung up (SIGHUP): stopping")


def _reload_on_sighup(service: Service, server: HttpServer | None = None) -> None:
    """SIGHUP reloads the rules, as ``POST /rules/reload`` does (and as it reloads nginx's
    configuration); a rule set that does not load is logged, the running one stays. One that
    came while the service started is acted on now. With ``server`` (one process), a SIGHUP
    from the terminal hanging up stops it instead (see ``_hung_up``)."""

    async def reloading() -> None:
        try:
            await service.reload_rules(announce=False)
        except EventBusError:
            pass  # logged by reload_rules
        except Exception:  # a defect: said here, not as a task's exception never retrieved
            log.exception("rules reload failed")

    def reload(hung_up: bool | None = None) -> None:
        if server is not None and (_hung_up() if hung_up is None else hung_up):
            _say_hung_up()
            server.should_exit = True
            return
        task = asyncio.create_task(reloading(), name="rules-reload")
        _reloads.add(task)
        task.add_done_callback(_reloads.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    if _hups_while_starting:
        hung_up = any(_hups_while_starting)
        _hups_while_starting.clear()
        reload(hung_up)


def _tell_parent(parent: int) -> None:
    """A worker reloaded its rules over HTTP: its parent passes SIGHUP on to every worker, so
    that all of them route with the new rules (the one that was asked reloads again, finding
    no file changed)."""
    if os.getppid() == parent:  # not when orphaned: the pid may be another process's now
        os.kill(parent, signal.SIGHUP)


async def _stop_serving(server: HttpServer, serving: asyncio.Task[None]) -> None:
    server.should_exit = True
    await serving


def _workers_dir(settings: Settings) -> Path:
    """What the workers of --workers N share: their metrics' files and their sources' states;
    made afresh by their parent, which owns the data directory."""
    return Path(settings.data_dir) / "workers"


def _bind(settings: Settings, *, listen: bool, share: bool = True) -> socket.socket:
    """A socket on the listen address, with SO_REUSEPORT when ``share``d among workers (only
    listening ones get connections, so the parent's unlistened one just holds the port).

    Raises ConfigError when the address cannot be bound (taken, say)."""
    host, port = settings.listen.host, settings.listen.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


async def _supervise(settings: Settings, workers: int, config_path: str | None) -> None:
    env = dict(os.environ)
    procs: list[subprocess.Popen[bytes] | None] = [None] * workers
    stopping = asyncio.Event()

    def reload_all() -> None:
        """SIGHUP to every live worker: each reloads its rules (the terminal hanging up
        stops them all instead)."""
        if _hung_up():
            _say_hung_up()
            stopping.set()
            return
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    loop = asyncio.get_running_loop()
    # before the embedded servers start: SIGTERM's default action would leave them running
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # The rules and connectors, read as a worker will: a mistake in them is the parent's
    # error, at once, as in one process (each worker failed on it, restarted, for ever). A
    # SIGHUP meanwhile (the loop held: compiling) is told apart as it comes, acted on after.
    signal.signal(signal.SIGHUP, _hup_while_starting)
    # What every worker starts with, one restarted later too: the settings file and the
    # connectors as read now (a worker restarted after an edit ran the edit beside the
    # others: another target URL, API keys, a second durable consumer). The rules are read
    # by each, and a restarted one has the others read them again (below).
    settings_text, texts = _read_configuration(settings, config_path)
    loop.add_signal_handler(signal.SIGHUP, reload_all)
    if any(_hups_while_starting):
        _say_hung_up()
        stopping.set()
    _hups_while_starting.clear()
    async with contextlib.AsyncExitStack() as stack:
        embedded = await start_embedded(stack, settings)
        if stopping.is_set():  # a signal during their start: stop them again, start no worker
            return
        # The workers get the embedded servers' URLs and credentials in their environment:
        # only the same user (and root) can read a process's environment, unlike its command
        # line, which every local user can see.
        if settings.embedded_bus:
            assert embedded.nats_auth is not None and embedded.nats_auth.nkey_seed is not None
            env["EVENTBUS_BUS__NATS__URL"] = str(embedded.nats_url)
            env[EMBEDDED_NATS_ENV] = embedded.nats_auth.nkey_seed.reveal()
        if settings.embedded_database:
            env["EVENTBUS_DATABASE__URL"] = embedded.database_url
        sock = _bind(settings, listen=False)
        stack.callback(sock.close)
        shared = _workers_dir(settings)
        # A crashed run's, counting nothing now, and the live-feed directory it linked to (a
        # parent killed with SIGKILL left one in the temporary directory at each run).
        with contextlib.suppress(OSError):
            left = (shared / "live").readlink()
            if left.parent == Path(tempfile.gettempdir()) and left.name.startswith(_LIVE_PREFIX):
                shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
        (shared / "metrics").mkdir(parents=True)
        (shared / "sources").mkdir()
        (shared / "beats").mkdir()
        (shared / FINGERPRINTS).mkdir()
        stack.callback(shutil.rmtree, shared, True)
        snapshot = {CONNECTORS_SNAPSHOT: orjson.dumps(texts)}
        if settings_text is not None:
            snapshot[_SETTINGS_SNAPSHOT] = settings_text

        def write_snapshot() -> None:
            """The copies every worker starts from, written again before each start (a
            cleaner that took them from under the parent failed every restarted worker);
            owner-only, for they hold whatever secrets the files hold literally."""
            for name, data in snapshot.items():
                replace_file(shared / name, data, private=True)

        write_snapshot()
        # The workers' live-feed sockets: in a new private directory (0700) of the temporary
        # one, linked from the shared one, for a Unix socket's path must stay short.
        live = tempfile.mkdtemp(prefix=_LIVE_PREFIX)
        stack.callback(shutil.rmtree, live, True)
        (shared / "live").symlink_to(live, target_is_directory=True)
        env[metrics.MULTIPROC_ENV] = str(shared / "metrics")
        figures = metrics.ParentFigures(shared / "metrics")
        failed: str | None = None
        started = [0.0] * workers  # when each worker was last spawned
        quick_exits = [0] * workers  # exits in a row within _QUICK_EXIT of the spawn
        restart_at: list[float | None] = [None] * workers

        def spawn(i: int, again: bool = False) -> subprocess.Popen[bytes]:
            cmd = [sys.executable, "-m", "eventbus", "serve", "--reuse-port"]
            if settings_text is not None:
                cmd += ["--config", str(shared / _SETTINGS_SNAPSHOT)]
            worker_env = dict(
                env,
                EVENTBUS_RUN_SOURCES="true" if i == 0 else "false",
                EVENTBUS_LISTEN__HOST=settings.listen.host,
                EVENTBUS_LISTEN__PORT=str(settings.listen.port),
            )
            started[i] = time.monotonic()
            worker_env[PARENT_ENV] = str(os.getpid())
            worker_env[WORKER_ENV] = str(i)
            if again:
                worker_env[RESTARTED_ENV] = "1"
            # Born with SIGHUP blocked (the mask is inherited): one sent before the worker
            # installs its handler (a reload, another worker's restart) killed it, its
            # default action; it waits, pending, and is taken once the handler is there.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                return subprocess.Popen(cmd, env=worker_env)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

        # Each worker takes some 1.5 s of CPU to import and start: 64 on 2 cores took minutes,
        # and the parent killed each at its first beat's deadline, for ever, all at once. The
        # cores are those this process may run on (a container's, a taskset's).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        cores = cores or os.cpu_count() or 1
        first_beat = _FIRST_BEAT * max(1.0, workers / cores)
        if workers > 4 * cores:
            log.warning(
                "%d workers on %d cores: each needs its own CPU to start and to serve (one per "
                "core is the usual count); they get %g s to start instead of %g",
                workers,
                cores,
                first_beat,
                _FIRST_BEAT,
            )
        for i in range(workers):
            procs[i] = spawn(i)
        log.info(
            "started %d workers on %s:%d (the console: %s)",
            workers,
            *_address(settings),
            _console_url(settings),
        )
        while not stopping.is_set():
            try:
                figures.publish()
            except OSError as exc:  # a full disk: the figures wait, the service goes on
                log.warning("cannot write the parent's figures for the workers: %s", exc)
            await wait_event(stopping, 1.0)
            if embedded.supervisor.failed is not None:
                # The workers cannot work without their servers: stop everything and exit
                # non-zero, so whatever runs eventbus restarts it.
                failed = embedded.supervisor.failed
                break
            now = time.monotonic()
            for i, proc in enumerate(procs):
                if stopping.is_set():
                    break
                if proc is not None and proc.returncode is None and now - started[i] > _QUICK_EXIT:
                    quick_exits[i] = 0  # it started: a run of failures ends
                if proc is not None and proc.poll() is None:
                    hang = settings.worker_hang_timeout
                    _kill_if_hung(i, proc, shared / "beats", hang, now - started[i], first_beat)
                if proc is not None and proc.poll() is not None:
                    metrics.forget_process(proc.pid, shared / "metrics")
                    try:
                        SharedStatuses.retire(shared / "sources", proc.pid)
                    except OSError as exc:  # a full disk: its counts leave the sums
                        log.warning("cannot keep worker %d's source counts: %s", i, exc)
                        (shared / "sources" / f"{proc.pid}.json").unlink(missing_ok=True)
                    (shared / "live" / str(proc.pid)).unlink(missing_ok=True)
                    (shared / "beats" / str(proc.pid)).unlink(missing_ok=True)
                    (shared / FINGERPRINTS / str(proc.pid)).unlink(missing_ok=True)
                    procs[i] = None
                    quick = now - started[i] < _QUICK_EXIT
                    quick_exits[i] = quick_exits[i] + 1 if quick else 0
                    # Only when none can start: with one serving, the others keep trying (a rule
                    # file broken on disk fails a restarted worker, not the running ones).
                    if min(quick_exits) >= _QUICK_EXITS_TO_GIVE_UP:
                        failed = (
                            f"every worker exited {_QUICK_EXITS_TO_GIVE_UP} times or more in a "
                            f"row within {_QUICK_EXIT:g} s of its start (worker {i} last with "
                            f"{proc.returncode})"
                        )
                        break
                    # one that keeps failing waits longer each time: 1, 2, 4 ... 30 s
                    first = settings.worker_restart_delay
                    delay = min(first * 2.0 ** (quick_exits[i] - 1), 30.0) if quick else 0.0
                    log.warning(
                        "worker %d exited with %s; restarting in %g s", i, proc.returncode, delay
                    )
                    restart_at[i] = now + delay
                if procs[i] is None and (due := restart_at[i]) is not None and now >= due:
                    restart_at[i] = None
                    # It reads the rule files as they are then, edited since the others
                    # loaded them perhaps, and once it has, asks (SIGHUP) that every worker
                    # reloads, so that all route by one set (a third of the events went by
                    # rules nobody had applied). Reloaded here at its spawn, the others read
                    # the files seconds before it did: an edit meanwhile split them again.
                    try:
                        write_snapshot()
                    except OSError as exc:  # a full disk: the copies there serve
                        log.warning("cannot write the workers' settings and connectors: %s", exc)
                    procs[i] = spawn(i, again=True)
                    metrics.WORKER_RESTARTS.labels(str(i)).inc()
            if failed is not None:
                break
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # a worker's grace for deliveries, then the audit flush (up to 10 s), then margin
        # One deadline for all of them (each had its own: N times that, one after another).
        deadline = time.monotonic() + settings.router.shutdown_grace + 30
        for proc in procs:
            if proc is None:
                continue
            try:
                await asyncio.to_thread(proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker (pid %d) still running at the shutdown deadline: killed", proc.pid
                )
                proc.kill()
                proc.wait()
    if failed is not None:
        log.error("giving up: %s", failed)
        raise EventBusError(f"stopped: {failed}")


def _read_configuration(
    settings: Settings, config_path: str | None
) -> tuple[bytes | None, dict[str, str | None]]:
    """The settings file's bytes (None without one) and the connectors' texts, checked as a
    worker reads them (raises ConfigError or RuleSetError, the rules checked too)."""
    config_file = config_path or os.environ.get("EVENTBUS_CONFIG")
    settings_text = Path(config_file).read_bytes() if config_file else None
    texts = connector_texts(settings.connectors)
    Service(settings).read_files(texts)
    return settings_text, texts


def _kill_if_hung(
    index: int,
    proc: subprocess.Popen[bytes],
    beats: Path,
    timeout: float,
    spawned_ago: float,
    first_beat: float = _FIRST_BEAT,
) -> None:
    """SIGKILL worker ``index`` when its beat (see ``_beat``) is older than ``timeout`` seconds:
    frozen, or its event loop blocked, it answered none of the connections the kernel handed it
    and no probe (the parent's exit check then restarts it). A worker that has not beaten yet
    (spawned ``spawned_ago`` seconds ago) gets ``first_beat`` seconds more, for its imports
    and the start of its loop (one frozen then was left alone for ever, the service a worker
    short)."""
    try:
        age = time.time() - (beats / str(proc.pid)).stat().st_mtime
        silence = f"for {age:.0f} s"
    except OSError:
        age = spawned_ago - first_beat
        silence = f"since its spawn {spawned_ago:.0f} s ago"
    if age > timeout:
        log.error(
            "worker %d (pid %d) has not been heard from %s (frozen, or its event loop "
            "blocked): killing it to start it again",
            index,
            proc.pid,
            silence,
        )
        proc.kill()
        proc.wait()


def serve(
    settings: Settings,
    *,
    workers: int = 1,
    reuse_port: bool = False,
    config_path: str | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, owning ``settings.data_dir`` (workers excepted: their parent
    owns it). Raises ConfigError (also when another live process owns the data directory),
    StoreError or BusError at start-up."""
    _check_exposure(settings)
    _room_for_connections(settings)
    if reuse_port:  # a worker of --workers: its parent owns the data directory
        _run(settings, workers, reuse_port, config_path)
        return
    with hold_data_dir(settings.data_dir, host=settings.listen.host, port=settings.listen.port):
        _run(settings, workers, reuse_port, config_path)


def _run(settings: Settings, workers: int, reuse_port: bool, config_path: str | None) -> None:
    if not reuse_port:  # the one process, or the parent of --workers N; not a worker
        _watch_terminal()
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
