"""The log-tail source on real files (tmp_path), checkpoints in PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventbus._errors import ConfigError
from eventbus.sources import SourceContext, _log_tail, build_source
from eventbus.sources._base import MAX_SET_ASIDE
from eventbus.store import EmbeddedPostgres
from tests.fixtures.wait import eventually
from tests.sources._harness import (
    Recorder,
    dead_letters,
    failing_with,
    make_context,
    running,
    source_pool,
    started,
)


def _spec(pattern: Path | str, **extra: Any) -> dict[str, Any]:
    return {"name": "app-log", "type": "log-tail", "path": str(pattern), "interval": 0.02, **extra}


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def _messages(recorder: Recorder) -> list[str]:
    return [e["data"]["message"] for e in recorder.events]


async def _committed(ctx: SourceContext, path: Path) -> bool:
    """True once every byte of ``path`` is checkpointed."""
    st = os.stat(path)
    saved = await ctx.checkpoints.get(f"{st.st_dev}:{st.st_ino}")
    return saved is not None and saved["offset"] == st.st_size


async def test_lines_become_events_and_restart_resumes_exactly(
    tmp_path: Path, database_dsn: str
) -> None:
    log = tmp_path / "app.log"
    log.write_text("first\r\nsecond\npart")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(tmp_path / "*.log")), ctx):
            first, _ = await recorder.wait_for(2)
            _append(log, "ial\n")  # the unterminated line is held until it is complete
            await recorder.wait_for(3)
            await eventually(lambda: _committed(ctx, log))
        assert first["type"] == "eventbus.log.line"
        assert first["source"] == "urn:eventbus:source:app-log"
        assert first["subject"] == str(log)
        assert first["datacontenttype"] == "application/json"
        assert first["data"] == {"path": str(log), "offset": 0, "message": "first"}
        assert _messages(recorder) == ["first", "second", "partial"]
        assert recorder.events[2]["data"]["offset"] == len("first\r\nsecond\n")

        _append(log, "while stopped\n")
        again = Recorder()
        ctx = make_context(pool, "app-log", again)
        async with running(build_source(_spec(tmp_path / "*.log")), ctx):
            await again.wait_for(1)
            _append(log, "after restart\n")
            await again.wait_for(2)
        assert _messages(again) == ["while stopped", "after restart"]


async def test_rename_rotation_reads_the_old_file_on_until_it_is_quiet(
    tmp_path: Path, database_dsn: str
) -> None:
    # Rotated to a name the glob does not match, the old file was finished at once: what its
    # writer added before reopening its log (logrotate's "create") was lost. It is read on
    # until quiet for close_inactive; its last line without a newline goes out then.
    log = tmp_path / "app.log"
    log.write_text("a1\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log, close_inactive=0.5)), ctx):
            await recorder.wait_for(1)
            with log.open("a", encoding="utf-8") as writer:  # the app's handle
                writer.write("a2\n")
                writer.flush()
                log.rename(tmp_path / "app.log.1")
                log.write_text("b1\n")
                await recorder.wait_for(3)
                writer.write("a3 written after the rotation\na4 no newline")
            await recorder.wait_for(5)
            _append(log, "b2\n")
            await recorder.wait_for(6)
        messages = _messages(recorder)
        old = [m for m in messages if m.startswith("a")]
        assert old == ["a1", "a2", "a3 written after the rotation", "a4 no newline"], messages
        assert [m for m in messages if m.startswith("b")] == ["b1", "b2"], messages
        (b1,) = [e for e in recorder.events if e["data"]["message"] == "b1"]
        assert b1["data"]["offset"] == 0


@pytest.mark.parametrize("how", ["deleted", "renamed out of the glob"])
async def test_a_file_gone_while_the_bus_is_down_is_read_to_its_end(
    tmp_path: Path, database_dsn: str, how: str
) -> None:
    # The file gone was taken out of the tracked ones before its last lines were published:
    # the bus refusing them, nothing rewound them, the next scan no longer listed the file,
    # and they were lost, with no error left and the deleted file held open.
    log = tmp_path / "app.log"
    log.write_text("before\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        # (renamed, it is read on until quiet for close_inactive: its last line goes out then)
        async with running(build_source(_spec(log, close_inactive=0.5)), ctx):
            await recorder.wait_for(1)
            recorder.down = True
            _append(log, "while down 1\nwhile down 2\nno newline")
            await recorder.wait_refused(1)
            if how == "deleted":
                log.unlink()
            else:
                log.rename(tmp_path / "app.log.old")
            refused = recorder.refused
            await recorder.wait_refused(refused + 2)  # tried again, the file gone
            recorder.down = False
            await recorder.wait_for(4)
            await eventually(lambda: ctx.status.state == "running" and ctx.status.lag == 0)
        assert _messages(recorder) == ["before", "while down 1", "while down 2", "no newline"]


async def test_after_a_restart_files_read_to_their_end_hold_no_open_slot(
    tmp_path: Path, database_dsn: str
) -> None:
    # At start every tracked file was opened, in name order, up to max_open_files: old logs
    # read to their end held every slot, and the live log (last in name order) waited
    # close_inactive for each round of them before a line of it was read.
    logs = [tmp_path / f"app-2026-11-0{day}.log" for day in range(1, 6)]
    for day, path in enumerate(logs[:-1], 1):
        path.write_text(f"old {day}\n")
    live = logs[-1]
    live.write_text("live 1\n")
    spec = _spec(tmp_path / "*.log", max_open_files=2, close_inactive=0.2)
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(spec), ctx):
            await recorder.wait_for(5)
            for path in logs:
                await eventually(lambda path=path: _committed(ctx, path))
        again = Recorder()
        ctx = make_context(pool, "app-log", again)
        restarted = build_source({**spec, "close_inactive": 600})
        async with running(restarted, ctx):
            await asyncio.sleep(0.3)  # scanned: every file read to its end, none open
            _append(live, "live 2\n")
            _append(logs[0], "old 1 again\n")
            await again.wait_for(2)
        assert sorted(_messages(again)) == ["live 2", "old 1 again"]
        assert _messages(recorder).count("live 1") == 1


async def test_copy_truncate_restarts_at_zero(tmp_path: Path, database_dsn: str) -> None:
    log = tmp_path / "app.log"
    log.write_text("old line one\nold line two\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log)), ctx):
            await recorder.wait_for(2)
            with log.open("r+") as handle:
                handle.truncate(0)
            _append(log, "new\n")
            await recorder.wait_for(3)
            await eventually(lambda: _committed(ctx, log))
        assert _messages(recorder) == ["old line one", "old line two", "new"]
        assert recorder.events[2]["data"]["offset"] == 0
        assert recorder.events[2]["id"] != recorder.events[0]["id"]


async def test_the_same_lines_after_a_truncation_are_new_events(
    tmp_path: Path, database_dsn: str
) -> None:
    # Same inode, same offsets, same text: the same ids, and the bus dropped them as duplicates
    # within its window (5 of 11 health-check lines vanished in the review's run).
    log = tmp_path / "app.log"
    log.write_text("GET /health 200\nGET /health 200\n")
    recorder = Recorder()
    async with started(database_dsn, _spec(log), recorder) as ctx:
        await recorder.wait_for(2)
        await eventually(lambda: _committed(ctx, log))
        with log.open("r+") as handle:
            handle.truncate(0)
        await eventually(lambda: _committed(ctx, log))
        _append(log, "GET /health 200\nGET /health 200\n")
        await recorder.wait_for(4)
        await eventually(lambda: _committed(ctx, log))
    ids = [e["id"] for e in recorder.events]
    assert len(set(ids)) == 4, ids
    # ... and a restart finds its generation: the same ids, nothing again
    async with started(database_dsn, _spec(log), recorder):
        _append(log, "after\n")
        await recorder.wait_for(5)
    assert [e["id"] for e in recorder.events[:4]] == ids and len(recorder.events) == 5


async def test_start_at_end_keeps_what_was_written_while_stopped(
    tmp_path: Path, database_dsn: str
) -> None:
    # Nothing read before the stop left no checkpoint: the next start was a first start
    # again and began at the end, skipping what came meanwhile.
    log = tmp_path / "app.log"
    log.write_text("old\n")
    recorder = Recorder()
    async with started(database_dsn, _spec(log, start_at="end"), recorder) as ctx:
        await eventually(lambda: _committed(ctx, log))
    _append(log, "while stopped\n")
    async with started(database_dsn, _spec(log, start_at="end"), recorder):
        await recorder.wait_for(1)
    assert _messages(recorder) == ["while stopped"]


async def test_start_at_end_reads_a_file_that_came_while_stopped_from_its_start(
    tmp_path: Path, database_dsn: str
) -> None:
    # The glob matched nothing at the first start, which left no row: the next start was
    # taken for the first again, and the file that came meanwhile began at its end (its ten
    # lines lost). Files present at the very first start alone begin at their end.
    logs = tmp_path / "logs"
    logs.mkdir()
    spec = _spec(logs / "*.log", start_at="end")
    recorder = Recorder()
    async with started(database_dsn, spec, recorder) as ctx:
        await eventually(lambda: ctx.checkpoints.get("started"), what="the first start saved")
    lines = [f"F-{i}" for i in range(1, 21)]
    _append(logs / "e.log", "".join(f"{line}\n" for line in lines[:10]))
    async with started(database_dsn, spec, recorder):
        _append(logs / "e.log", "".join(f"{line}\n" for line in lines[10:]))
        await recorder.wait_for(20)
    assert _messages(recorder) == lines


async def test_rows_an_older_eventbus_wrote_get_the_started_row_too(
    tmp_path: Path, database_dsn: str
) -> None:
    # A table of file rows without `started` (written before there was one) was never given
    # it: once those rows were deleted (the files gone an hour), a start was a first start
    # again, and with start_at: end a file that came while stopped lost its lines.
    log = tmp_path / "a.log"
    log.write_text("a1\n")
    spec = _spec(tmp_path / "*.log", start_at="end")
    recorder = Recorder()
    async with started(database_dsn, spec, recorder) as ctx:
        await eventually(lambda: ctx.checkpoints.get("started"), what="the first start saved")
        await ctx.checkpoints.delete_many(["started"])  # as an older eventbus left the table
    async with started(database_dsn, spec, recorder) as ctx:
        await eventually(lambda: ctx.checkpoints.get("started"), what="the started row")
        assert set(await ctx.checkpoints.items()) == {"started", _key(log)}


async def test_bus_down_checkpoints_nothing_then_delivers_everything(
    tmp_path: Path, database_dsn: str
) -> None:
    log = tmp_path / "app.log"
    log.write_text("one\ntwo\n")
    recorder = Recorder()
    recorder.down = True
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log)), ctx):
            await recorder.wait_refused(1)
            assert await ctx.checkpoints.items() == {}
            assert ctx.status.state == "backoff"

            async def waiting_counted() -> bool:  # it read 0 through the outage
                return ctx.status.lag == len("one\ntwo\n")

            await eventually(waiting_counted, what="the unsent lines in lag")
            _append(log, "three\n")
            recorder.down = False
            await recorder.wait_for(3)
            await eventually(lambda: _committed(ctx, log))
        assert _messages(recorder) == ["one", "two", "three"]
        assert ctx.status.lag == 0


async def test_json_lines_and_bad_json_kept_with_error(tmp_path: Path, database_dsn: str) -> None:
    log = tmp_path / "app.json"
    huge = '{"n": 123456789012345678901234567890}'  # read as a float, it would change
    log.write_text(f'{{"level": "error", "n": 1}}\nnot json\n{huge}\n')
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log, format="json")), ctx):
            good, bad, long = await recorder.wait_for(3)
    assert good["data"] == {"path": str(log), "offset": 0, "json": {"level": "error", "n": 1}}
    assert bad["data"]["message"] == "not json"
    assert "json_error" in bad["data"]
    assert long["data"]["message"] == huge and "beyond 64 bits" in long["data"]["json_error"]


@pytest.mark.parametrize("format", ["json", "text"])
async def test_a_byte_order_mark_is_not_part_of_the_first_record(
    tmp_path: Path, database_dsn: str, format: str
) -> None:
    # a file written on Windows: its first record was "BOM is not supported" in JSON, and
    # began with U+FEFF as text
    log = tmp_path / "app.json"
    log.write_bytes('\ufeff{"n": 1}\n\ufeff{"n": 2}\n'.encode())
    recorder = Recorder()
    async with started(database_dsn, _spec(log, format=format), recorder):
        first, second = await recorder.wait_for(2)
    if format == "json":
        assert first["data"]["json"] == {"n": 1}, first["data"]
        assert "json_error" in second["data"]  # a BOM inside the file is no byte order mark
    else:
        assert first["data"]["message"] == '{"n": 1}'
        assert second["data"]["message"] == '\ufeff{"n": 2}'


async def test_multiline_joins_continuations_with_bounds(tmp_path: Path, database_dsn: str) -> None:
    log = tmp_path / "app.log"
    log.write_text(
        "ERROR boom\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1\n'
        "INFO next\n"
        "  a\n  b\n  c\n"
    )
    recorder = Recorder()
    multiline = {"pattern": r"^(\s|Traceback|Caused by)", "max_lines": 3, "flush_after": 0.05}
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log, multiline=multiline)), ctx):
            # The last record has no following line: the flush timeout publishes it.
            await recorder.wait_for(3)
            await eventually(lambda: _committed(ctx, log))
    assert _messages(recorder) == [
        'ERROR boom\nTraceback (most recent call last):\n  File "x.py", line 1',
        "INFO next\n  a\n  b",
        "  c",
    ]
    assert recorder.events[0]["data"]["lines"] == 3


async def test_batches_by_count_and_wait_and_long_lines_truncated(
    tmp_path: Path, database_dsn: str
) -> None:
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(7)) + "x" * 100 + "\n")
    recorder = Recorder()
    spec = _spec(log, batch={"max_lines": 3, "max_wait": 0.05}, max_line_bytes=16)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(spec), ctx):
            events = await recorder.wait_for(3)
            await eventually(lambda: _committed(ctx, log))
    assert [e["type"] for e in events] == ["eventbus.log.batch"] * 3
    sizes = [len(e["data"]["records"]) for e in events]
    assert sizes == [3, 3, 2]
    last = events[2]["data"]["records"]
    assert last[0] == {"offset": 42, "message": "line 6"}
    assert last[1] == {"offset": 49, "message": "x" * 16, "truncated": True}


async def test_start_at_end_skips_existing_content_on_first_start(
    tmp_path: Path, database_dsn: str
) -> None:
    log = tmp_path / "app.log"
    log.write_text("old\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log, start_at="end")), ctx):
            await eventually(lambda: _committed_or_tracked(ctx))
            _append(log, "new\n")
            await recorder.wait_for(1)
    assert _messages(recorder) == ["new"]


def _open_logs(directory: Path) -> int:
    """How many descriptors of this process are open on files in ``directory``."""
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return sum(t.startswith(f"{directory}/") for t in targets)


async def test_at_most_max_open_files_are_open_inactive_ones_close_and_reopen(
    tmp_path: Path, database_dsn: str
) -> None:
    logs = [tmp_path / f"app{i}.log" for i in range(6)]
    for i, log in enumerate(logs):
        log.write_text(f"line {i}\n")
    recorder = Recorder()
    spec = _spec(tmp_path / "*.log", max_open_files=2, close_inactive=0.1)
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(spec), ctx):
            seen = 0

            async def read_on() -> int:
                nonlocal seen
                seen = max(seen, _open_logs(tmp_path))
                return len(recorder.events) == 6 and _open_logs(tmp_path) == 0

            # each waits for a slot, and they all come through two
            await eventually(read_on, within=10, every=0.005, what="every file read, closed")
            assert sorted(_messages(recorder)) == [f"line {i}" for i in range(6)]
            assert 1 <= seen <= 2
            _append(logs[4], "more\n")  # a closed file that grows is opened again
            await recorder.wait_for(7)
            await eventually(lambda: _committed(ctx, logs[4]))
        assert _messages(recorder)[6] == "more"
        assert recorder.events[6]["data"]["offset"] == len("line 4\n")


async def test_lag_counts_the_files_waiting_for_a_slot(tmp_path: Path, database_dsn: str) -> None:
    # Computed over the open files only, lag read 0 while files sat unread for close_inactive.
    for i in range(3):
        (tmp_path / f"app{i}.log").write_text(f"line {i}\n")
    recorder = Recorder()
    spec = _spec(tmp_path / "*.log", max_open_files=1, close_inactive=60)
    async with started(database_dsn, spec, recorder) as ctx:
        await recorder.wait_for(1)

        async def two_waiting() -> bool:
            return ctx.status.lag == 2 * len("line 0\n")

        await eventually(two_waiting, what="the two waiting files in lag")
    assert len(recorder.events) == 1


async def test_a_file_rewritten_behind_the_same_header_is_read_again(
    tmp_path: Path, database_dsn: str
) -> None:
    # A report rewritten while closed for inactivity, behind the same first bytes (its
    # header): to the same size it was never read again; larger, from the old offset on.
    report = tmp_path / "report.log"
    header = "id,name,amount,currency,created_at,updated_at,status,region,owner\n" * 2

    def write(generation: str, lines: int) -> None:
        report.write_text(header + "".join(f"{generation}-line{i}\n" for i in range(lines)))

    write("gen1", 3)
    recorder = Recorder()
    async with started(database_dsn, _spec(report, close_inactive=0.2), recorder) as ctx:

        async def closed() -> bool:
            return await _committed(ctx, report) and _open_logs(tmp_path) == 0

        # each generation: its two header lines and its lines (gen1 made 5 events)
        for generation, lines, total in (("gen2", 3, 10), ("gen3", 5, 17)):
            await eventually(closed, what="the report read and closed")
            write(generation, lines)
            await recorder.wait_for(total)
    messages = _messages(recorder)
    assert [m for m in messages if "-line" in m] == [
        *(f"gen1-line{i}" for i in range(3)),
        *(f"gen2-line{i}" for i in range(3)),
        *(f"gen3-line{i}" for i in range(5)),
    ]


async def test_a_renamed_file_still_matched_gives_its_last_line_and_copies_can_be_excluded(
    tmp_path: Path, database_dsn: str
) -> None:
    # With the documented app.log* glob, a rotated file's last line without a newline waited
    # until the file was deleted; and a copy-truncate's copy was read again whole.
    log = tmp_path / "app.log"
    log.write_text("l1\nl2-partial")
    recorder = Recorder()
    spec = _spec(tmp_path / "app.log*", close_inactive=0.2, exclude=["*.copy"])
    async with started(database_dsn, spec, recorder) as ctx:
        await recorder.wait_for(1)
        log.rename(tmp_path / "app.log.1")
        log.write_text("n1\n")
        (tmp_path / "app.log.copy").write_text("copied\n")
        await recorder.wait_for(3)
        await eventually(lambda: _committed(ctx, tmp_path / "app.log.1"))
    assert sorted(_messages(recorder)) == ["l1", "l2-partial", "n1"]


async def test_the_checkpoint_of_a_file_gone_is_deleted(
    tmp_path: Path, database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One row stayed for every file the glob ever matched (a folder of daily logs).
    monkeypatch.setattr(_log_tail, "_FORGET_AFTER", 0.2)  # an hour by default
    old, kept = tmp_path / "old.log", tmp_path / "kept.log"
    old.write_text("old\n")
    kept.write_text("kept\n")
    old_key = _key(old)
    recorder = Recorder()
    async with started(database_dsn, _spec(tmp_path / "*.log"), recorder) as ctx:
        await recorder.wait_for(2)
        await eventually(lambda: _committed(ctx, old))
        old.unlink()

        async def forgotten() -> bool:
            return set(await ctx.checkpoints.items()) == {_key(kept), "started"}

        await eventually(forgotten, what="the deleted file's checkpoint deleted")
    assert old_key != _key(kept)


def _key(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


async def _committed_or_tracked(ctx: SourceContext) -> bool:
    return ctx.status.lag == 0


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"multiline": {"pattern": "("}}, "invalid regular expression"),
        ({"multiline": {"pattern": "^ ", "max_lines": 1}}, "field 'multiline.max_lines'"),
        ({"batch": {"max_lines": 0}}, "field 'batch.max_lines'"),
        ({"format": "xml"}, "field 'format'"),
        ({"max_line_bytes": 1}, "field 'max_line_bytes'"),
        ({"follow": True}, "field 'follow'"),
        ({"max_open_files": 0}, "field 'max_open_files'"),
        ({"close_inactive": 0}, "field 'close_inactive'"),
        ({"exclude": "*.gz"}, "field 'exclude'"),
    ],
)
def test_bad_settings_name_the_field(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_source(_spec("/tmp/x.log", **extra))


async def test_postgres_outage_neither_loses_nor_repeats_lines(
    tmp_path: Path, database_dsn: str, postgres_server: EmbeddedPostgres
) -> None:
    log = tmp_path / "app.log"
    log.write_text("before\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(log)), ctx):
            await recorder.wait_for(1)
            await eventually(lambda: _committed(ctx, log))
            await postgres_server.stop()
            try:
                _append(log, "during outage\n")
                await recorder.wait_for(2)  # the bus is up: the line is published
                await eventually(lambda: _state_is(ctx, "backoff"))
                assert "StoreUnavailable" in (ctx.status.last_error or "")
                _append(log, "after outage\n")

                async def waiting_counted() -> bool:  # it read 0 through the outage
                    return ctx.status.lag == len("after outage\n")

                await eventually(waiting_counted, what="the unread line in lag")
            finally:
                await postgres_server.start()
            await recorder.wait_for(3)
            await eventually(lambda: _committed(ctx, log))
    assert _messages(recorder) == ["before", "during outage", "after outage"]


async def _state_is(ctx: SourceContext, state: str) -> bool:
    return ctx.status.state == state


async def test_restart_rereads_an_unfinished_multiline_record_whole(
    tmp_path: Path, database_dsn: str
) -> None:
    log = tmp_path / "app.log"
    log.write_text("INFO ok\nERROR boom\n  at a\n")
    spec = _spec(log, multiline={"pattern": r"^\s", "flush_after": 60})
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(spec), ctx):
            await recorder.wait_for(1)  # "INFO ok" closed by the next record's first line
            await eventually(lambda: _offset_is(ctx, log, len("INFO ok\n")))
        _append(log, "  at b\nINFO next\n")
        again = Recorder()
        async with running(build_source(spec), make_context(pool, "app-log", again)):
            await again.wait_for(1)
    assert _messages(recorder) == ["INFO ok"]
    assert _messages(again)[0] == "ERROR boom\n  at a\n  at b"
    assert again.events[0]["data"]["offset"] == len("INFO ok\n")


async def _offset_is(ctx: SourceContext, path: Path, offset: int) -> bool:
    st = os.stat(path)
    saved = await ctx.checkpoints.get(f"{st.st_dev}:{st.st_ino}")
    return saved is not None and saved["offset"] == offset


async def test_records_no_event_can_carry_do_not_stop_the_tail(
    tmp_path: Path, database_dsn: str
) -> None:
    # Each raised out of the source, which restarted from its checkpoint on the same record for
    # ever (every file of the source stopped): JSON nested deeper than an event may carry, a
    # line of NULs (common after a power loss) over the event size once escaped, a file name
    # with a control character (the subject). A symlink loop matching the glob failed every
    # scan before any file was read.
    deep = "[" * 70 + "]" * 70
    log = tmp_path / "a.log"
    log.write_text(f"good 1\n{deep}\n" + "\x00" * 60_000 + "\ngood 2\n")
    (tmp_path / "b\x1bc.log").write_text("odd\n")
    (tmp_path / "loop.log").symlink_to(tmp_path / "loop.log")
    # a name that is not UTF-8: the source crashed on it again and again, every file waiting
    (tmp_path / os.fsdecode(b"a\xff.log")).write_bytes(b"unnamed\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(tmp_path / "*.log", format="json")), ctx):
            await recorder.wait_for(4)
            await eventually(lambda: _committed(ctx, log))
        assert _messages(recorder) == ["good 1", deep, "good 2", "odd"]
        assert "levels deep" in recorder.events[1]["data"]["json_error"]
        assert recorder.events[3]["subject"] == str(tmp_path / "b c.log")
        assert recorder.events[3]["data"]["path"] == str(tmp_path / "b\x1bc.log")
        [dead] = await dead_letters(pool, "app-log")
        assert dead["payload"] == b"\x00" * 60_000
        assert "a log record no event can carry" in dead["error"]


async def test_a_record_too_big_to_keep_whole_says_how_big_it_was(
    tmp_path: Path, database_dsn: str
) -> None:
    # Cut before it was handed over, its dead letter read as a record of exactly 262,144
    # bytes: nothing said it had been longer.
    log = tmp_path / "big.log"
    line = '{"big": "' + "x" * 300_000 + '"}'
    log.write_text(f"{line}\nafter\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "big-log", recorder)
        spec = _spec(tmp_path / "*.log", format="json", max_line_bytes=400_000)
        async with running(build_source(spec), ctx):
            await recorder.wait_for(1)
            await eventually(lambda: _committed(ctx, log))
        [dead] = await dead_letters(pool, "big-log")
    assert dead["payload"] == line.encode()[:MAX_SET_ASIDE]
    meta = orjson.loads(dead["meta"])
    assert (meta["size"], meta["kept"], meta["lines"]) == (len(line), MAX_SET_ASIDE, 1), meta
    assert _messages(recorder) == ["after"]


async def test_a_batch_too_big_for_one_event_goes_record_by_record(
    tmp_path: Path, database_dsn: str
) -> None:
    # 100 lines of 3 KB: one event of 300 KB, over the limit; nothing was published again.
    log = tmp_path / "app.log"
    log.write_text("".join(f"{i:03} {'x' * 3000}\n" for i in range(101)))
    recorder = Recorder()
    spec = _spec(log, batch={"max_lines": 100, "max_wait": 0.05})
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(spec), ctx):
            await recorder.wait_for(101)
            await eventually(lambda: _committed(ctx, log))
        starts = [r["message"][:3] for e in recorder.events for r in e["data"]["records"]]
        assert starts == [f"{i:03}" for i in range(101)]
        assert await dead_letters(pool, "app-log") == []


async def test_a_busy_file_does_not_hold_the_others_back(tmp_path: Path, database_dsn: str) -> None:
    # A turn of a file read up to 1 MiB: with short lines some 35,000 records, published one
    # by one before the next file's turn (a line of another file waited 46 s in a review).
    (tmp_path / "a.log").write_text("".join(f"busy {i:06}\n" for i in range(30_000)))
    (tmp_path / "b.log").write_text("quiet\n")
    recorder = Recorder()
    async with source_pool(database_dsn) as pool:
        ctx = make_context(pool, "app-log", recorder)
        async with running(build_source(_spec(tmp_path / "*.log")), ctx):
            await recorder.wait_for(30_001)
    messages = _messages(recorder)
    assert messages.index("quiet") < 10_000, messages.index("quiet")
    assert [m for m in messages if m != "quiet"] == [f"busy {i:06}" for i in range(30_000)]


async def test_a_glob_under_a_missing_directory_backs_off_until_it_is_there(
    tmp_path: Path, database_dsn: str
) -> None:
    # It showed running, 0 events, no warning, for ever (a typo in the directory); the
    # directory source in that case backs off and says so.
    logs = tmp_path / "logs"
    recorder = Recorder()
    async with started(database_dsn, _spec(logs / "*.log"), recorder) as ctx:
        await eventually(failing_with(ctx, "does not exist"), what="the missing directory said")
        assert str(logs) in (ctx.status.last_error or "")
        logs.mkdir()
        (logs / "app.log").write_text("hello\n")
        await recorder.wait_for(1)
        await eventually(lambda: _state_is(ctx, "running"))
    assert _messages(recorder) == ["hello"]
