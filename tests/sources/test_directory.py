"""The directory source on a real directory (tmp_path) with checkpoints in PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from eventbus._errors import ConfigError
from eventbus.sources import DirectorySource, build_source
from tests.fixtures.nats import configured_nats_server
from tests.fixtures.wait import eventually
from tests.sources._harness import (
    Recorder,
    failing_with,
    make_context,
    running,
    source_pool,
    started,
)
from tests.sources.test_queue_support import bus_tap, context


def _spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "drop", "type": "directory", "path": str(path), "interval": 0.02, **extra}


def _write(path: Path, text: str, mtime: int) -> None:
    path.write_text(text)
    # Explicit mtimes: two writes within one clock tick would otherwise look unchanged.
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


async def test_new_and_changed_files_once_across_restart(tmp_path: Path, database_dsn: str) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "a.csv", "id\n1\n", 1_000)
    _write(tmp_path / "skip.tmp", "x", 1_001)
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        spec = _spec(tmp_path, pattern="**/*.csv", content_max_bytes=64)
        source = build_source(spec)
        ctx = make_context(pool, "drop", recorder)
        async with running(source, ctx):
            [first] = await recorder.wait_for(1)
            _write(tmp_path / "sub" / "b.csv", "b" * 100, 1_002)
            await recorder.wait_for(2)
            _write(tmp_path / "a.csv", "id\n1\n2\n", 1_003)
            await recorder.wait_for(3)
            await eventually(lambda: _checkpointed(ctx.checkpoints, "f:a.csv", 1_003))
        assert first == {
            "specversion": "1.0",
            "id": first["id"],
            "source": "urn:eventbus:source:drop",
            "type": "eventbus.file.created",
            "subject": "a.csv",
            "time": "1970-01-01T00:16:40Z",
            "datacontenttype": "application/json",
            "data": {
                "path": str(tmp_path / "a.csv"),
                "relative_path": "a.csv",
                "size": 5,
                "mtime": "1970-01-01T00:16:40+00:00",
                "content": "id\n1\n",
            },
        }
        second, third = recorder.events[1:]
        assert second["subject"] == "sub/b.csv"
        assert "content" not in second["data"]  # larger than content_max_bytes, and it says so
        assert second["data"]["content_omitted"] == "the file is larger than content_max_bytes (64)"
        assert third["type"] == "eventbus.file.modified"
        assert third["data"]["content"] == "id\n1\n2\n"

        _write(tmp_path / "c.csv", "c", 1_004)
        restarted = Recorder()
        async with running(build_source(spec), make_context(pool, "drop", restarted)):
            await restarted.wait_for(1)
            _write(tmp_path / "d.csv", "d", 1_005)
            await restarted.wait_for(2)
        assert [e["subject"] for e in restarted.events] == ["c.csv", "d.csv"]


async def _checkpointed(checkpoints: Any, key: str, mtime: int) -> bool:
    value = await checkpoints.get(key)
    return value is not None and value["mtime_ns"] == mtime * 10**9


async def test_bus_down_checkpoints_nothing_and_retries(tmp_path: Path, database_dsn: str) -> None:
    _write(tmp_path / "a.txt", "a", 1_000)
    recorder = Recorder()
    recorder.down = True
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "drop", recorder)
        async with running(build_source(_spec(tmp_path)), ctx):
            await recorder.wait_refused(1)
            assert await ctx.checkpoints.items() == {}
            assert ctx.status.state == "backoff"
            recorder.down = False
            await recorder.wait_for(1)
            await eventually(lambda: _checkpointed(ctx.checkpoints, "f:a.txt", 1_000))
        assert [e["subject"] for e in recorder.events] == ["a.txt"]
        assert ctx.status.errors == 1


async def test_a_clean_scan_clears_the_failure(tmp_path: Path, database_dsn: str) -> None:
    # The bus refused the one file there, which then went away: every later scan was clean,
    # and the status kept saying backoff's error until the next file, whenever that came.
    _write(tmp_path / "a.txt", "a", 1_000)
    recorder = Recorder()
    recorder.down = True
    async with started(database_dsn, _spec(tmp_path), recorder) as ctx:
        await eventually(failing_with(ctx, "BusUnavailable"), what="the refusal reported")
        (tmp_path / "a.txt").unlink()

        async def cleared() -> bool:
            return ctx.status.last_error is None and ctx.status.state == "running"

        await eventually(cleared, what="the failure cleared by a clean scan")
    assert recorder.events == [] and ctx.status.errors >= 1


async def test_a_missing_directory_backs_off_until_it_is_there(
    tmp_path: Path, database_dsn: str
) -> None:
    # A ConfigError marked the source failed for good: a drop folder moved aside and made
    # again (or a mount not up yet) needed a restart of the service.
    recorder = Recorder()
    later = tmp_path / "later"
    async with started(database_dsn, _spec(later), recorder) as ctx:
        await eventually(failing_with(ctx, "does not exist"), what="the missing directory")
        later.mkdir()
        _write(later / "b.csv", "b", 1_000)
        (event,) = await recorder.wait_for(1)
    assert event["subject"] == "b.csv"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"interval": -1}, "field 'interval'"),
        ({"content_max_bytes": 10**9}, "field 'content_max_bytes'"),
        ({"glob": "*"}, "field 'glob'"),
        # each passed, then failed every scan (the source crashing, restarted for ever), or
        # reported files outside the directory
        ({"pattern": ""}, "field 'pattern': .*empty"),
        ({"pattern": "/etc/*"}, "field 'pattern': .*relative"),
        ({"pattern": "../../outside/*"}, "field 'pattern': .*'\\.\\.'"),
        ({"pattern": "logs/../../*"}, "field 'pattern': .*'\\.\\.'"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_source(_spec(tmp_path, **extra))


def test_content_is_the_file_as_its_size_says(tmp_path: Path) -> None:
    # The content was read after the file's stat: a file still being written went out with a
    # size of 63 bytes (and the id of that version) and 84 bytes of content. And an empty
    # file had neither content nor a reason.
    source = build_source(_spec(tmp_path, content_max_bytes=100))
    assert isinstance(source, DirectorySource)
    growing = tmp_path / "slow.txt"
    growing.write_text("a" * 63)
    seen = growing.stat()
    with growing.open("a") as handle:
        handle.write("b" * 21)
    data = source._event("slow.txt", seen, False, 1 << 20)["data"]
    assert data["size"] == 63 and "content" not in data
    assert "changed while it was read" in data["content_omitted"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert source._event("empty.txt", empty.stat(), False, 1 << 20)["data"]["content"] == ""


async def test_a_drop_folder_that_is_a_symlink_is_followed_where_it_points_now(
    tmp_path: Path, database_dsn: str
) -> None:
    # The path was resolved once, at the start: a symlink re-pointed on a deploy kept the
    # source watching the old folder, and the new one's files were never reported.
    old, new, link = tmp_path / "release-1", tmp_path / "release-2", tmp_path / "current"
    old.mkdir()
    new.mkdir()
    _write(old / "a.txt", "a", 1_000)
    _write(new / "b.txt", "b", 1_001)
    link.symlink_to(old)
    recorder = Recorder()
    (tmp_path / "elsewhere").mkdir()
    # "..": taken out, as resolving the path did
    async with started(database_dsn, _spec(tmp_path / "elsewhere" / ".." / "current"), recorder):
        (first,) = await recorder.wait_for(1)
        link.unlink()
        link.symlink_to(new)
        _, second = await recorder.wait_for(2)
    assert first["data"]["path"] == str(link / "a.txt")
    assert second["data"]["path"] == str(link / "b.txt")


async def test_big_content_odd_names_and_removed_files(tmp_path: Path, database_dsn: str) -> None:
    # A text over the event size with content_max_bytes at its maximum (the bus refused the
    # event for good and every newer file waited behind it), a name with a control character
    # (the subject), a drop folder's processed files (their checkpoints stayed for ever), and
    # a symlink loop.
    _write(tmp_path / "big.txt", "x" * 300_000, 1_000)
    _write(tmp_path / "odd\x1bname.txt", "odd", 1_001)
    _write(tmp_path / "later.txt", "later", 1_002)
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")  # failed every scan
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")  # no content, and no reason given
    os.utime(tmp_path / "latin.txt", ns=(1_003 * 10**9, 1_003 * 10**9))
    # a name that is not UTF-8: each scan failed on it, and no file after it got through
    (tmp_path / os.fsdecode(b"bad\xffname.txt")).write_bytes(b"x")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "drop", recorder)
        async with running(build_source(_spec(tmp_path, content_max_bytes=1 << 20)), ctx):
            big, odd, later, latin = await recorder.wait_for(4)
            for name in ("big.txt", "odd\x1bname.txt", "later.txt", "latin.txt"):
                (tmp_path / name).unlink()

            async def forgotten() -> bool:
                return await ctx.checkpoints.items("f:") == {}

            await eventually(forgotten, what="the removed files' checkpoints deleted")
            _write(tmp_path / "later.txt", "later", 1_002)  # back: reported again
            await recorder.wait_for(5)
        assert "content" not in big["data"] and "limit" in big["data"]["content_omitted"]
        assert latin["data"]["content_omitted"] == "the file is not UTF-8 text"
        assert odd["subject"] == "odd name.txt" and odd["data"]["content"] == "odd"
        assert later["data"]["content"] == "later"
        back = recorder.events[4]
        assert back["type"] == "eventbus.file.created"
        # the same size and mtime: it had the first one's id, and the bus dropped it as a copy
        assert back["id"] != later["id"]


async def test_contents_are_held_to_the_service_size_limit(
    tmp_path: Path, database_dsn: str
) -> None:
    # The library's default (256 KiB) stood whatever max_event_size said: with 1 MiB allowed
    # a 300 KB text still went without its content, with 4 KiB a 10 KB one went with it.
    _write(tmp_path / "big.txt", "x" * 300_000, 1_000)
    _write(tmp_path / "mid.txt", "y" * 10_000, 1_001)
    for limit, carried in ((1 << 20, {"big.txt", "mid.txt"}), (4096, set())):
        recorder = Recorder()
        async with source_pool(database_dsn) as pool:
            ctx = make_context(pool, f"drop{limit}", recorder)
            ctx.max_event_size = limit
            async with running(build_source(_spec(tmp_path, content_max_bytes=1 << 20)), ctx):
                events = await recorder.wait_for(2)
        with_content = {e["data"]["relative_path"] for e in events if "content" in e["data"]}
        assert with_content == carried
        if not carried:
            assert all("4096-byte limit" in e["data"]["content_omitted"] for e in events)


async def test_a_file_too_large_for_the_bus_with_its_content_is_reported_without_it(
    tmp_path: Path, database_dsn: str
) -> None:
    # A NATS server taking 8 KiB: the event with the file's 10 KB of text was dead-lettered with
    # the file's name only, where one over max_event_size goes without its content.
    drop = tmp_path / "drop"
    drop.mkdir()
    _write(drop / "big.txt", "x" * 10_000, 1_000)
    config = "jetstream { store_dir: {store} }\nmax_payload: 8192"
    async with (
        configured_nats_server(tmp_path / "nats", config) as port,
        source_pool(database_dsn) as pool,
        bus_tap(f"nats://127.0.0.1:{port}") as tap,
    ):
        ctx = context(pool, "drop", tap, type="directory")
        async with running(build_source(_spec(drop, content_max_bytes=1 << 20)), ctx):
            (event,) = await tap.take(1)
    assert "content" not in event["data"]
    assert "max_payload" in event["data"]["content_omitted"]
