"""One ``eventbus serve`` per data directory: a second one is refused at once, naming the first,
and leaves the first's embedded servers alone; a killed owner releases the directory, and the
next start stops what it left running; a clean stop leaves no pid or lock file. The commands
find the running service through the lock file when no URL is given."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
import yaml

from eventbus._errors import ConfigError
from eventbus.bus._nats_server import free_port
from eventbus.cli._datadir import LOCK_NAME, default_url, hold_data_dir, running_service
from tests.fixtures.postgres import private_data_root, stop_servers_under
from tests.fixtures.service import ServeProcess, settings_for, write_config

HOLD = """
import sys
from pathlib import Path
from eventbus.cli._datadir import hold_data_dir
with hold_data_dir(Path(sys.argv[1]), host="0.0.0.0", port=8123):
    print("held", flush=True)
    sys.stdin.read()
"""


async def _holder(data_dir: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD,
        str(data_dir),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"held\n"
    return proc


async def test_a_held_directory_is_refused_naming_its_owner_until_the_owner_dies(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    holder = await _holder(data)
    try:
        assert running_service(data) == "http://127.0.0.1:8123"  # every interface: loopback
        with pytest.raises(ConfigError) as err, hold_data_dir(data, host="127.0.0.1", port=9):
            pass
        assert str(err.value) == (
            f"data dir {data} is in use by PID {holder.pid} (eventbus serve on 0.0.0.0:8123)"
        )
    finally:
        holder.kill()  # SIGKILL: no clean-up ran, the kernel dropped the lock
        await holder.wait()
    assert (data / LOCK_NAME).exists()
    assert running_service(data) is None
    with hold_data_dir(data, host="::", port=9):
        assert running_service(data) == "http://[::1]:9"
    assert not (data / LOCK_NAME).exists()  # removed on a clean stop
    assert running_service(data) is None


def test_default_url_prefers_the_environment_then_the_running_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.setenv("EVENTBUS_DATA_DIR", str(tmp_path))
    assert default_url() == "http://127.0.0.1:8080"
    with hold_data_dir(tmp_path, host="127.0.0.1", port=8765):
        assert default_url() == "http://127.0.0.1:8765"
        monkeypatch.setenv("EVENTBUS_URL", "http://elsewhere:1")
        assert default_url() == "http://elsewhere:1"


def test_default_url_follows_eventbus_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the commands went to 127.0.0.1:8080 (another instance, perhaps) whatever it said
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.delenv("EVENTBUS_DATA_DIR", raising=False)
    data = tmp_path / "data"
    config = tmp_path / "eventbus.yaml"
    # its secrets are none of the commands' business (a client may not read their files)
    config.write_text(
        f"data_dir: {data}\nlisten: {{port: 37080}}\n"
        f"database: {{url: 'postgresql://u@h/d', password: {{file: {tmp_path / 'none'}}}}}\n"
    )
    monkeypatch.setenv("EVENTBUS_CONFIG", str(config))
    assert default_url() == "http://127.0.0.1:37080"  # nothing ran there yet
    data.mkdir()
    with hold_data_dir(data, host="127.0.0.1", port=37081):
        assert default_url() == "http://127.0.0.1:37081"
    config.write_text("listen: {port: many}\n")
    with pytest.raises(ConfigError, match=r"^finding the service from EVENTBUS_CONFIG: .*port"):
        default_url()


def test_a_data_dir_whose_service_is_gone_is_an_error_not_another_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a killed service's lock file named it; the commands asked 127.0.0.1:8080, another
    # instance, and `rules reload` (or a purge) acted on that one without a word
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.setenv("EVENTBUS_DATA_DIR", str(tmp_path))
    (tmp_path / LOCK_NAME).write_bytes(
        orjson.dumps({"pid": 999_999, "listen": "127.0.0.1:8083", "url": "http://127.0.0.1:8083"})
    )
    with pytest.raises(ConfigError) as caught:
        default_url()
    assert str(caught.value) == (
        f"no eventbus serve is running on data dir {tmp_path} (its last one, PID 999999 "
        "(eventbus serve on 127.0.0.1:8083), is gone): start it, or name the service with "
        "--url or EVENTBUS_URL"
    )
    (tmp_path / LOCK_NAME).unlink()
    (tmp_path / "postgres").mkdir()  # stopped cleanly: no lock file, its servers' files stay
    with pytest.raises(ConfigError, match=r"^no eventbus serve is running on data dir \S+: "):
        default_url()
    monkeypatch.setenv("EVENTBUS_URL", "http://elsewhere:1")
    assert default_url() == "http://elsewhere:1"


def test_a_service_still_writing_its_lock_file_is_starting_not_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.setenv("EVENTBUS_DATA_DIR", str(tmp_path))
    path = tmp_path / LOCK_NAME
    path.write_text('{"pid": 1')  # held, and half written
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match=r"is starting: try again$"):
            default_url()
    finally:
        os.close(fd)


async def _cli(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventbus",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _nats_pid(data: Path) -> int:
    return int((data / "nats" / "nats-server.pid").read_text())


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_second_serve_is_refused_and_the_first_survives_until_killed() -> None:
    # not tmp_path: see private_data_root
    root = private_data_root()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    try:
        write_config(root, rules="[]", targets=[])
        port = free_port()
        config = root / "settings.yaml"
        config.write_text(yaml.safe_dump(settings_for(root, database_url=None, port=port)))
        data = root / "data"
        first = ServeProcess(config, port, root / "first.log")
        await first.start()
        assert first.proc is not None
        nats_pid = _nats_pid(data)

        started = time.monotonic()
        code, _, err = await _cli("serve", "--config", str(config), cwd=root, env=env)
        assert code == 1 and time.monotonic() - started < 15
        assert f"data dir {data} is in use by PID {first.proc.pid} " in err
        assert f"(eventbus serve on 127.0.0.1:{port})" in err
        assert "Traceback" not in err
        # the first one's servers untouched, and it still answers
        assert psutil.Process(nats_pid).is_running() and _nats_pid(data) == nats_pid
        code, out, err = await _cli(
            "sources", "--json", cwd=root, env={**env, "EVENTBUS_DATA_DIR": str(data)}
        )
        assert (code, err) == (0, "") and '"sources"' in out  # found without --url

        await first.kill()  # SIGKILL: the nats-server and PostgreSQL it started stay behind
        assert psutil.Process(nats_pid).is_running()
        second = ServeProcess(config, port, root / "second.log")
        await second.start()
        assert not psutil.pid_exists(nats_pid) or (
            psutil.Process(nats_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert await second.terminate() == 0
        assert not (data / "nats" / "nats-server.pid").exists()
        assert not (data / LOCK_NAME).exists()
        assert not (data / "postgres" / "postmaster.pid").exists()
    finally:
        stop_servers_under(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_service_of_another_user_is_not_taken_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its lock file is readable by its owner only: a command run as another user could not
    # open it and said "no eventbus serve is running" while one was.
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.setenv("EVENTBUS_DATA_DIR", str(tmp_path))
    lock = tmp_path / LOCK_NAME
    real_open = os.open

    def as_another_user(path: object, flags: int, *args: int) -> int:
        if Path(str(path)) == lock and not flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    with hold_data_dir(tmp_path, host="127.0.0.1", port=8765):
        monkeypatch.setattr(os, "open", as_another_user)
        with pytest.raises(ConfigError, match=r"belongs to another user, whose eventbus serve"):
            default_url()
        monkeypatch.setenv("EVENTBUS_URL", "http://127.0.0.1:8765")
        assert default_url() == "http://127.0.0.1:8765"
        monkeypatch.undo()
