"""``eventbus serve`` start-up checks: a listen address reachable from the network needs API
keys (or an explicit, loudly logged ``allow_unauthenticated``), in one process and with
``--workers``; the shipped compose settings pass it with the keys compose provides; the
open-file limit is raised to fit the connection cap; the embedded database's password stays out
of the logs and of every command line, also with ``--workers``; ``/healthz`` answers as soon
as the process listens, before the service behind it is up."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import resource
import shutil
import signal
import socket
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from eventbus._errors import ConfigError
from eventbus.bus._nats_server import free_port
from eventbus.cli import _serve as serve_module
from eventbus.cli._serve import GC_YOUNG_THRESHOLD, _check_exposure
from eventbus.config import Settings, load_settings
from tests.fixtures.postgres import private_data_root, stop_servers_under
from tests.fixtures.service import ServeProcess, settings_for, write_config
from tests.fixtures.wait import eventually

COMPOSE = Path(__file__).parents[2] / "compose"
KEY = {"name": "ops", "key": "k" * 32, "scopes": ["admin"]}


def _settings(host: str, **extra: object) -> Settings:
    return Settings.model_validate({"listen": {"host": host}, **extra})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_keys(host: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        _check_exposure(_settings(host))
    assert not caplog.records


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "eventbus.example.org"])
def test_reachable_address_without_keys_is_refused(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError) as err:
        _check_exposure(_settings(host))
    assert f"listen.host {host!r}" in str(err.value)
    assert "api_keys" in str(err.value) and "allow_unauthenticated: true" in str(err.value)

    with caplog.at_level(logging.WARNING, logger="eventbus"):
        _check_exposure(_settings(host, api_keys=[KEY]))
        assert not caplog.records
        _check_exposure(_settings(host, allow_unauthenticated=True))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "NO AUTHENTICATION" in caplog.records[0].getMessage()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_refuses_an_open_bind_before_starting_anything(
    tmp_path: Path, workers: str
) -> None:
    text = await _serve_refused(tmp_path, "--host", "0.0.0.0", "--workers", workers)
    assert "listen.host '0.0.0.0' is reachable from the network" in text


async def _serve_refused(cwd: Path, *args: str) -> str:
    """``eventbus serve`` in ``cwd`` exiting 1 before it starts anything: its stderr."""
    if "--port" not in args:  # not the default 8080: another program may hold it
        args = (*args, "--port", str(free_port()))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "eventbus", "serve", *args),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert not (cwd / ".eventbus").exists()  # no embedded server was started
    return text


async def test_serve_names_every_connector_its_adapter_refuses_before_starting_anything(
    tmp_path: Path,
) -> None:
    # Checked when the adapters were built: after the database and the bus were up, one at a
    # time, without file or line.
    (tmp_path / "connectors").mkdir()
    (tmp_path / "connectors" / "sources.yaml").write_text(
        "sources:\n"
        "  - name: mq\n    type: mqtt\n    topics: [t]\n"
        "    tls: {ca: /nonexistent/ca.pem}\n"
        "  - name: s3\n    type: s3-poll\n    bucket: b\n    endpoint_url: not a url\n"
    )
    text = await _serve_refused(tmp_path)
    assert "sources.yaml:2: " in text and "/nonexistent/ca.pem" in text, text
    assert "sources.yaml:6: " in text and "not a url" in text, text


@pytest.mark.timeout(120)
async def test_allowed_unauthenticated_bind_starts_with_a_warning(
    serve_process: Callable[..., ServeProcess],
) -> None:
    proc = serve_process(
        rules="[]",
        targets=[],
        settings={"listen": {"host": "0.0.0.0"}, "allow_unauthenticated": True},
    )
    await proc.start()
    assert await proc.terminate() == 0
    assert "NO AUTHENTICATION: listening on 0.0.0.0" in proc.log.read_text()


def test_compose_settings_start_only_with_the_keys_compose_passes() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    template = compose["services"]["eventbus"]["environment"]["EVENTBUS_API_KEYS"]
    given = {"EVENTBUS_ADMIN_KEY": "a" * 64, "EVENTBUS_PUBLISH_KEY": "b" * 64}
    # compose's ${NAME:?message} interpolation
    keys = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: given[m[1]], template)

    settings = load_settings(COMPOSE / "eventbus.yaml", env={"EVENTBUS_API_KEYS": keys})
    assert [(k.name, k.key.reveal(), k.scopes) for k in settings.api_keys] == [
        ("admin", "a" * 64, ("admin",)),
        ("publisher", "b" * 64, ("publish",)),
    ]
    _check_exposure(settings)
    with pytest.raises(ConfigError, match="no api_keys are set"):
        _check_exposure(load_settings(COMPOSE / "eventbus.yaml", env={}))


async def _numbers_printed_by(script: str) -> list[int]:
    """Run ``script`` in a fresh interpreter (the test process keeps its own limits and
    collector) and return the integers it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return [int(x) for x in out.split()]


async def test_open_file_limit_is_raised_to_fit_the_connection_cap() -> None:
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))\n"
        "from eventbus.cli._serve import _room_for_connections\n"
        "from eventbus.config import Settings\n"
        "_room_for_connections(Settings.model_validate({'listen': {'max_connections': 900}}))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    soft, hard = await _numbers_printed_by(script)
    assert soft == (900 + 256 if hard == resource.RLIM_INFINITY else min(900 + 256, hard))


async def test_serving_freezes_start_up_objects_and_collects_young_ones_less_often() -> None:
    script = (
        "import gc\n"
        "from eventbus.cli._serve import settle_gc\n"
        "before = gc.get_threshold()\n"
        "settle_gc()\n"
        "print(*before, *gc.get_threshold(), gc.get_freeze_count())\n"
    )
    young, middle, oldest, *after, frozen = await _numbers_printed_by(script)
    assert after == [GC_YOUNG_THRESHOLD, middle, oldest]
    assert young < GC_YOUNG_THRESHOLD
    assert frozen > 1000  # the start-up objects (modules) left the collected generations


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_embedded_database_password_stays_out_of_logs_and_command_lines() -> None:
    async with _two_workers_on_the_embedded_default({}) as (root, proc):
        try:
            password = (root / "data" / "postgres.password").read_text().strip()
            for running in psutil.process_iter(["cmdline"]):
                assert password not in " ".join(running.info["cmdline"] or ()), running
        finally:
            assert await proc.terminate() == 0
        log = proc.log.read_text()
        assert "embedded PostgreSQL at postgresql://postgres:***@/postgres?host=" in log
        assert password not in log


@contextlib.asynccontextmanager
async def _two_workers_on_the_embedded_default(
    extra: dict[str, Any],
) -> AsyncIterator[tuple[Path, ServeProcess]]:
    """``serve --workers 2`` on its embedded servers (``extra`` settings added), started;
    the servers stopped and the directory removed afterwards."""
    # not tmp_path: see private_data_root
    root = private_data_root()
    try:
        write_config(root, rules="[]", targets=[])
        port = free_port()
        config = root / "settings.yaml"
        config.write_text(
            yaml.safe_dump(settings_for(root, database_url=None, port=port, extra=extra))
        )
        proc = ServeProcess(config, port, root / "serve.log", workers=2)
        await proc.start()
        yield root, proc
    finally:
        stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)


async def test_workers_sign_in_to_the_embedded_bus_whatever_bus_nats_says() -> None:
    # bus.nats credentials are ignored with the embedded server; a worker, given the server's
    # URL, read them as its own and failed ("choose one way to authenticate, not user and
    # nkey_seed"), restarted for ever. The seed reaches it in its environment only.
    ignored = {"bus": {"nats": {"user": "someone", "password": "not-used-with-embedded"}}}
    async with _two_workers_on_the_embedded_default(ignored) as (_root, proc):
        try:
            await eventually(
                lambda: proc.log.read_text().count("eventbus ready") == 2,
                within=60,
                what="both workers ready",
            )
            seeds = set()
            assert proc.proc is not None
            for worker in psutil.Process(proc.proc.pid).children():
                with contextlib.suppress(psutil.Error):
                    seeds.add(worker.environ().get("EVENTBUS_EMBEDDED_NATS_SEED"))
            (seed,) = seeds - {None}
            await proc.publish({"specversion": "1.0", "id": "w", "source": "s", "type": "t"})
        finally:
            assert await proc.terminate() == 0
        assert seed not in proc.log.read_text()


@pytest.mark.timeout(120)
async def test_healthz_answers_as_soon_as_the_process_listens(
    tmp_path: Path, nats_url: str
) -> None:
    # a database nobody listens on: the service waits for it (10 s), then gives up
    port, nowhere = free_port(), free_port()
    write_config(tmp_path, rules="[]", targets=[])
    config = tmp_path / "settings.yaml"
    bad = f"postgresql://u:p@127.0.0.1:{nowhere}/db"
    config.write_text(
        yaml.safe_dump(settings_for(tmp_path, database_url=bad, nats_url=nats_url, port=port))
    )
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "eventbus", "serve", "--config", str(config)),
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def alive() -> bool:
                try:
                    async with session.get(url + "/healthz") as resp:
                        return resp.status == 200 and await resp.json() == {"status": "starting"}
                except aiohttp.ClientError:
                    return False

            await eventually(alive, within=8, what="/healthz while the database is awaited")
            async with session.get(url + "/readyz") as resp:
                assert resp.status == 503 and await resp.json() == {"status": "starting"}
            async with session.post(url + "/events", data=b"{}") as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert resp.content_type == "application/problem+json"
                assert "starting" in (await resp.json(content_type=None))["detail"]
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1 and "Traceback" not in err.decode()
    assert f"127.0.0.1:{nowhere}" in err.decode()  # the start-up error, then a clean exit
    with socket.create_server(("127.0.0.1", port)):  # the port was let go
        pass


@contextlib.asynccontextmanager
async def _started_listening(
    tmp_path: Path, nats_url: str, database_dsn: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``eventbus serve`` (one process), once it says it listens: bound, and starting the
    service before the HTTP server runs. Killed on the way out if still running."""
    port = free_port()
    write_config(tmp_path, rules="[]", targets=[])
    config = tmp_path / "settings.yaml"
    settings = settings_for(tmp_path, database_url=database_dsn, nats_url=nats_url, port=port)
    config.write_text(yaml.safe_dump(settings))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "eventbus", "serve", "--config", str(config)),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"listening on" not in await proc.stderr.readline():
                pass
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _ready(session: aiohttp.ClientSession, port: int) -> bool:
    """Whether the service on ``port`` answers ``GET /readyz`` 200."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def _terminated(proc: asyncio.subprocess.Process) -> str:
    """SIGTERM, then what it wrote until it exited, which it must do with 0."""
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return err.decode()


@pytest.mark.timeout(120)
async def test_a_signal_during_the_start_stops_the_service_once_started(
    tmp_path: Path, nats_url: str, database_dsn: str
) -> None:
    # The HTTP server took the signals only once it ran, after the service's start: one sent
    # while the service started was ignored, and the service ran on.
    async with _started_listening(tmp_path, nats_url, database_dsn) as (proc, _):
        err = await _terminated(proc)
    assert "HTTP server stopped; shutting the service down" in err


@pytest.mark.timeout(120)
async def test_a_sighup_during_the_start_is_not_the_end_of_it(
    tmp_path: Path, nats_url: str, database_dsn: str
) -> None:
    # Its default action ended the process while the service started (leaving the embedded
    # servers running, on the embedded default); once started, SIGHUP reloads the rules.
    async with _started_listening(tmp_path, nats_url, database_dsn) as (proc, port):
        proc.send_signal(signal.SIGHUP)  # while the service starts
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                assert proc.returncode is None, "the SIGHUP ended it"
                return await _ready(session, port)

            await eventually(ready, within=60, every=0.2, what="ready after the SIGHUP")
        await _terminated(proc)


def _take_terminal() -> None:
    """In the child: a session of its own, whose controlling terminal is its stdin (a pty)."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _take_terminal_under_nohup() -> None:
    _take_terminal()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("workers", "nohup"), [(1, False), (2, False), (1, True)])
async def test_the_terminal_closing_stops_the_service(
    tmp_path: Path, nats_url: str, database_dsn: str, workers: int, nohup: bool
) -> None:
    # SIGHUP reloads the rules, and the kernel's hang-up is a SIGHUP too: with its window
    # closed the service ran on unseen, its logs going nowhere, its data directory held.
    # Under nohup (SIGHUP ignored at its start) it is meant to outlive the terminal.
    port = free_port()
    write_config(tmp_path, rules="[]", targets=[])
    config = tmp_path / "settings.yaml"
    settings = settings_for(tmp_path, database_url=database_dsn, nats_url=nats_url, port=port)
    config.write_text(yaml.safe_dump(settings))
    terminal, side = os.openpty()
    log = (tmp_path / "serve.log").open("wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "eventbus", "serve", "--config", str(config)),
            *("--workers", str(workers)),
            stdin=side,
            stdout=log,
            stderr=log,
            preexec_fn=_take_terminal_under_nohup if nohup else _take_terminal,
        )
    finally:
        os.close(side)
        log.close()
    try:
        async with aiohttp.ClientSession() as session:
            await eventually(lambda: _ready(session, port), within=60, every=0.2, what="ready")
        os.close(terminal)  # the window closed: the kernel hangs the terminal up
        terminal = -1
        if nohup:
            # A short settle, kept on purpose: nothing marks "it did not stop"
            await asyncio.sleep(2.0)
            async with aiohttp.ClientSession() as session:
                assert await _ready(session, port) and proc.returncode is None
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        said = (tmp_path / "serve.log").read_text()
        assert ("hung up (SIGHUP): stopping" in said) != nohup, said[-2000:]
    finally:
        if terminal >= 0:
            os.close(terminal)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_a_sighup_long_after_the_terminal_went_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    # eventbus disowned, its terminal gone, then an operator's `kill -HUP` to reload: stopped
    monkeypatch.setattr(serve_module, "_MAY_HANG_UP", True)
    monkeypatch.setattr(serve_module, "_has_terminal", lambda: False)
    monkeypatch.setattr(serve_module, "_terminal_seen", time.monotonic() - 60)
    assert not serve_module._hung_up()
    monkeypatch.setattr(serve_module, "_terminal_seen", time.monotonic() - 1)
    assert serve_module._hung_up()  # there a moment ago: its hang-up


def test_a_hang_up_while_starting_is_told_apart_as_it_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Acted on once started, it was judged then: a start that held the loop for seconds (rules
    # compiling) made the terminal's hang-up a reload, and eventbus ran on without a terminal.
    monkeypatch.setattr(serve_module, "_MAY_HANG_UP", True)
    monkeypatch.setattr(serve_module, "_has_terminal", lambda: False)
    monkeypatch.setattr(serve_module, "_terminal_seen", time.monotonic() - 0.5)
    monkeypatch.setattr(serve_module, "_hups_while_starting", [])
    serve_module._hup_while_starting(signal.SIGHUP, None)
    monkeypatch.setattr(serve_module, "_terminal_seen", time.monotonic() - 60)  # much later
    assert [verdict is True for verdict in serve_module._hups_while_starting] == [True]


async def test_the_wait_for_an_unreachable_database_is_the_configured_one(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there
    config = tmp_path / "eventbus.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": free_port()},
                "data_dir": str(tmp_path / "data"),
                "database": {
                    "url": f"postgresql://eventbus@127.0.0.1:{port}/eventbus",
                    "connect_timeout": 1.5,
                },
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "eventbus", "serve", "--config", str(config)),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert f"Postgres at postgresql://eventbus@127.0.0.1:{port}/eventbus is unreachable" in text
    assert "gave up after 1.5 s" in text
    assert "Traceback" not in text
    # the embedded nats-server it had started is gone with it
    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left


@pytest.mark.timeout(120)
async def test_ctrl_c_during_the_first_start_is_an_interruption_not_a_broken_database(
    nats_url: str,
) -> None:
    # Ctrl-C reaches the terminal's whole process group: initdb, killed by it, failed, and
    # the start said "embedded PostgreSQL ... failed to start" (exit 1) with a log that initdb
    # had wiped with its directory
    root = private_data_root()
    try:
        write_config(root, rules="[]", targets=[])
        config = root / "settings.yaml"
        settings = settings_for(root, database_url=None, nats_url=nats_url, port=free_port())
        config.write_text(yaml.safe_dump(settings))
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "eventbus", "serve", "--config", str(config)),
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own group, as a terminal gives a command
        )
        try:

            def initdb_runs() -> bool:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    # a child may end between the listing and the look at its name
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if child.name() == "initdb":
                            return True
                return False

            await eventually(initdb_runs, within=60, every=0.01, what="initdb running")
            os.killpg(proc.pid, signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        text = err.decode()
        lines = text.splitlines()  # the CLI's own error line, not a log line naming eventbus
        assert not any(line.startswith("eventbus: ") for line in lines), text
        assert "Traceback" not in text, text
        if "Failed postgres command" in text:  # initdb was killed by the signal
            assert proc.returncode == 130, text
            assert "interrupted while starting" in text, text
        else:  # it had got past the step the signal came in: the start ends, then all stops
            assert proc.returncode == 0, text
    finally:
        stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
async def test_a_reload_asked_while_the_service_starts_is_done_once_it_has(
    nats_url: str,
) -> None:
    # SIGHUP was ignored for the whole start: a worker starting while the others reloaded
    # (the parent passes the signal on) kept the rules it had read before the files changed
    root = private_data_root()
    try:
        write_config(
            root, rules="[]", targets=[{"name": "fn", "type": "http", "url": "http://127.0.0.1:9/"}]
        )
        port = free_port()
        config = root / "settings.yaml"
        settings = settings_for(root, database_url=None, nats_url=nats_url, port=port)
        config.write_text(yaml.safe_dump(settings))
        proc = ServeProcess(config, port, root / "serve.log")
        starting = asyncio.create_task(proc.start())
        try:

            def database_starting() -> bool:  # the files were read before the database starts
                if proc.proc is None:
                    return False
                children = psutil.Process(proc.proc.pid).children(recursive=True)
                return any(c.name() in ("initdb", "pg_ctl", "postgres") for c in children)

            await eventually(database_starting, within=60, every=0.01, what="the database start")
            (root / "rules" / "rules.yaml").write_text("- name: a\n  targets: [fn]\n")
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGHUP)
            await starting
            async with (
                aiohttp.ClientSession() as session,
                session.get(proc.url + "/rules") as resp,
            ):
                body = await resp.json()
            assert [rule["name"] for rule in body["rules"]] == ["a"], body
        finally:
            if not starting.done():
                starting.cancel()
            assert await proc.terminate() == 0
    finally:
        stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)
