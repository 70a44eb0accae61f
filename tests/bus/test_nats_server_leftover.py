"""A nats-server left behind by a killed eventbus is stopped before a new one uses its store;
the server runs in its own session, so a Ctrl-C for eventbus's process group does not stop it
under a graceful shutdown. A clean stop removes its pid file; its log is rotated and capped."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import pytest

from eventbus._errors import BusError
from eventbus.bus import NatsServer, _nats_server


async def test_leftover_server_on_the_same_store_is_stopped(tmp_path: Path) -> None:
    first = NatsServer(tmp_path / "store")
    await first.start()
    assert first._proc is not None
    leftover = psutil.Process(first._proc.pid)
    first._proc = None  # forget it, as a process killed with SIGKILL would
    try:
        async with NatsServer(tmp_path / "store") as second:
            assert not leftover.is_running() or leftover.status() == psutil.STATUS_ZOMBIE
            assert second._proc is not None
            assert os.getpgid(second._proc.pid) != os.getpgid(0)  # own session
    finally:
        if leftover.is_running():
            leftover.kill()


async def test_a_clean_stop_removes_the_pid_file(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "store") as server:
        assert (server.store_dir / "nats-server.pid").exists()
    assert not (tmp_path / "store" / "nats-server.pid").exists()


async def test_the_server_log_is_rotated_and_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # small enough that each start-up banner fills dozens of files
    monkeypatch.setattr(_nats_server, "_LOG_LIMIT", 300)
    monkeypatch.setattr(_nats_server, "_LOG_FILES", 3)
    async with NatsServer(tmp_path / "store") as server:
        for _ in range(3):  # each restart logs its banner again
            await server.restart()
        log = server.log_path
    rotated = [p for p in log.parent.iterdir() if p.name.startswith(log.name + ".")]
    # the current file and the two newest old ones
    assert log.exists() and len(rotated) == 2, sorted(p.name for p in rotated)


@pytest.mark.timeout(60)
async def test_a_port_held_by_a_program_that_never_accepts_is_named_at_once(
    tmp_path: Path,
) -> None:
    # Another program listens on the port and accepts nothing, its queue full: nats-server
    # exits at once (address in use), but each look for its greeting waited on a connect
    # the kernel retried for two minutes, and the failure was then told as "did not accept
    # connections within 10 s".
    with socket.socket() as squatter, socket.socket() as queued:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(0)
        port = squatter.getsockname()[1]
        queued.connect(("127.0.0.1", port))  # fills the accept queue: the next SYN waits
        server = NatsServer(tmp_path / "store", port=port)
        with pytest.raises(BusError, match="exited with code"):
            await server.start()
        await server.stop()
