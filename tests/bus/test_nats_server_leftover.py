"""A nats-server left behind by a killed eventbus is stopped before a new one uses its store;
the server runs in its own session, so a Ctrl-C for eventbus's process group does not stop it
under a graceful shutdown."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from eventbus.bus import NatsServer


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
