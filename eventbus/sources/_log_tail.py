"""The ``log-tail`` source: lines appended to log files become events.

    files matching ``path`` (glob) ─> lines ─> [multi-line records] ─> [batches] ─> ctx.emit
      ─> checkpoint ``<device>:<inode>`` = {offset, path, head, gen}

Files are tracked by identity (device and inode), not by name, which is what makes rotation
work. Rename rotation (``app.log`` -> ``app.log.1``, new ``app.log``): the old file is read to
its end through the still-open handle and finished before the new one is read. Copy-truncate
rotation: a file shorter than what was read, or whose first bytes changed, is read again from
offset 0. The checkpointed offset is the end of the last record on the bus; everything after it
(partial lines, an open multi-line record, an unsent batch) is re-read after a restart, so a
crash duplicates at most what was published but not yet checkpointed, and loses nothing. (A
file rotated away *while eventbus was stopped* is no longer matched: include rotated names in
the glob, e.g. ``app.log*``, to finish it after a restart.)

File I/O runs in a worker thread, so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import logging
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Literal

import orjson
import pydantic

from eventbus._errors import BusError, CloudEventError, EventTooLargeForBus, StoreError
from eventbus.cloudevents import attribute_text, load_json, new_event
from eventbus.config import NumbersNotBools, SourceSpec
from eventbus.sources._base import SourceContext, UnreadablePaths
from eventbus.sources._clock import Backoff

__all__ = ["LogTailSource", "LogTailSourceSpec"]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("0b6d3e2a-93f1-4c57-8e0d-5a4c1f2b7e90")
# Bytes read per file per cycle: bounds memory and keeps one busy file from starving others
# (1 MiB of short lines was some 35,000 records published before the next file's turn).
_CHUNK = 64 << 10
# Bytes at the start of a file that identify its content (copy-truncate and inode reuse).
_HEAD = 128
_TAIL = 64  # bytes before the checkpointed offset that must still be there
_FORGET_AFTER = 3600.0  # seconds a checkpointed file is gone before its checkpoint is deleted
_STARTED = "started"  # the row saying the source's first start is done (file rows are dev:ino)


class MultilineConfig(NumbersNotBools):
    """Join continuation lines (those matching ``pattern``) onto the record before them."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    pattern: str
    max_lines: int = pydantic.Field(default=500, ge=2, le=100_000)
    flush_after: float = pydantic.Field(default=1.0, gt=0)

    @pydantic.field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return value


class BatchConfig(NumbersNotBools):
    """Send up to ``max_lines`` records of one file in one event, waiting at most ``max_wait``."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_lines: int = pydantic.Field(default=100, ge=1, le=10_000)
    max_wait: float = pydantic.Field(default=1.0, gt=0)


class LogTailSourceSpec(SourceSpec):
    """Settings of a ``type: log-tail`` source."""

    path: str = pydantic.Field(min_length=1)
    interval: float = pydantic.Field(default=0.5, gt=0)
    start_at: Literal["beginning", "end"] = "beginning"
    format: Literal["text", "json"] = "text"
    max_line_bytes: int = pydantic.Field(default=64 * 1024, ge=16, le=16 * 1024 * 1024)
    multiline: MultilineConfig | None = None
    batch: BatchConfig | None = None
    close_inactive: float = pydantic.Field(default=300.0, gt=0)
    max_open_files: int = pydantic.Field(default=256, ge=1, le=65_536)
    exclude: tuple[str, ...] = ()
    """Globs (fnmatch, on the whole path) of matching files not to read: the copies a
    copy-truncate rotation makes, when ``path`` would match them."""


@dataclass
class _Record:
    """One log record: a line, or a line and its continuation lines."""

    start: int
    end: int
    lines: list[str]
    truncated: bool
    last_at: datetime


@dataclass
class _File:
    key: str
    path: str
    handle: BinaryIO | None  # None while closed for inactivity
    head: bytes
    committed: int
    opened_as: str = ""
    """The path it had when opened (a rotation renames it)."""
    tail: bytes = b""
    """The bytes just before ``tail_at`` (up to ``_TAIL``) when it was checkpointed: a file
    rewritten behind the same first bytes (a report's constant header) no longer has them."""
    tail_at: int = 0
    """The offset ``tail`` ends at (``committed`` when it was last saved)."""
    mtime_ns: int = 0  # when closed for inactivity
    generation: int = 0
    """How many times the file was seen to start over (truncated, rewritten, or its inode taken
    by a new file): part of each event's id, so the same line at the same offset after a
    truncation is a new event, not a duplicate the bus drops."""
    grew_at: float = 0.0  # loop time of the last read that found new bytes
    read_pos: int = 0
    line_start: int = 0
    partial: bytearray = field(default_factory=bytearray)
    overflowed: bool = False
    record: _Record | None = None
    batch: list[_Record] = field(default_factory=list)
    batch_started: datetime | None = None

    def start_over(self, head: bytes) -> None:
        """The file begins again (truncated, rewritten, its inode taken by a new file): a new
        generation, read from offset 0."""
        self.committed = 0
        self.generation += 1
        self.head = head
        self.tail, self.tail_at = b"", 0
        self.rewind()

    def rewind(self) -> None:
        """Forget everything not on the bus; the next read starts at the committed offset."""
        self.read_pos = self.line_start = self.committed
        self.partial.clear()
        self.overflowed = False
        self.record = None
        self.batch.clear()
        self.batch_started = None

    @property
    def idle(self) -> bool:
        """Everything read is on the bus: nothing is lost by closing the handle."""
        return (
            self.read_pos == self.line_start == self.committed
            and self.record is None
            and not self.batch
        )


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _read_head(handle: BinaryIO) -> bytes:
    return os.pread(handle.fileno(), _HEAD, 0)


def _unread(f: _File) -> int:
    """Bytes of an open ``f`` beyond its checkpoint (0 for a closed one, or one gone)."""
    if f.handle is None:
        return 0
    try:
        return max(os.fstat(f.handle.fileno()).st_size - f.committed, 0)
    except OSError:
        return 0


def _tail_at(fd: int, offset: int) -> bytes:
    """The bytes just before ``offset`` (up to ``_TAIL``)."""
    return os.pread(fd, min(_TAIL, offset), max(0, offset - _TAIL)) if offset > 0 else b""


def _read_chunk(handle: BinaryIO, pos: int, committed: int) -> tuple[bytes, int, bytes, bytes]:
    """(bytes from ``pos``, current size, current head, the bytes before ``committed``) in one
    thread hop."""
    fd = handle.fileno()
    return (
        os.pread(fd, _CHUNK, pos),
        os.fstat(fd).st_size,
        os.pread(fd, _HEAD, 0),
        _tail_at(fd, committed),
    )


class LogTailSource:
    """Tails every file matching a glob; see the module docstring for the guarantees."""

    one_instance = True  # under a lease: see SourceRunner

    def __init__(self, config: LogTailSourceSpec) -> None:
        self.name = config.name
        self.type = config.type
        self.config = config
        self._continuation = (
            None if config.multiline is None else re.compile(config.multiline.pattern)
        )
        self._files: dict[str, _File] = {}
        self._saved: dict[str, Any] = {}
        self._dirty: dict[str, dict[str, Any]] = {}
        self._gone: dict[str, float] = {}  # checkpointed files no longer there: since when
        self._unreadable = UnreadablePaths(log, f"log-tail {self.name}")
        self._waiting_warned = False

    async def run(self, ctx: SourceContext) -> None:
        """Tail until cancelled. Bus, database and file errors are reported in ``ctx.status``
        and retried with backoff from the last checkpointed offsets."""
        backoff = Backoff(ctx.clock, maximum=max(self.config.interval, 30.0))
        loaded = first_start = started = False
        try:
            while True:
                try:
                    if not loaded:
                        self._saved = await ctx.checkpoints.items()
                        # No row at all was taken for the first start: a file that came while
                        # stopped, the glob having matched nothing before, began at its end
                        # (its lines lost with start_at: end), as did every file once the rows
                        # of those gone were deleted.
                        started = self._saved.pop(_STARTED, None) is not None
                        first_start = not started and not self._saved
                        loaded = True
                    more = await self._cycle(ctx, first_start)
                    if not started:  # a first start, or rows an older eventbus wrote
                        await self._save(ctx)  # the files' rows before the row saying so
                        await ctx.checkpoints.put(_STARTED, True)
                        started = True
                    first_start = False
                except StoreError as exc:
                    # What is on the bus stays known in memory (and in _dirty until saved):
                    # re-reading it would publish it again on every retry.
                    ctx.report_error(exc)
                    # what waits meanwhile (lag read 0 through a PostgreSQL outage, 1,600
                    # lines behind)
                    ctx.status.lag = sum(map(_unread, self._files.values()))
                    await backoff.wait()
                    continue
                except (BusError, OSError) as exc:
                    ctx.report_error(exc)
                    for f in self._files.values():
                        f.rewind()  # (a closed file has nothing beyond its checkpoint)
                    # what waits meanwhile (lag read 0 through a bus outage)
                    ctx.status.lag = sum(map(_unread, self._files.values()))
                    await backoff.wait()
                    continue
                backoff.reset()
                ctx.recovered()
                if not more:
                    await ctx.clock.sleep(self.config.interval)
        finally:
            for f in self._files.values():
                if f.handle is not None:
                    f.handle.close()
            self._files.clear()

    async def _cycle(self, ctx: SourceContext, first_start: bool) -> bool:
        """Read and publish what is new in every file; True when a file has more to read."""
        # Progress not yet saved is saved first: nothing more is read while Postgres is down.
        await self._save(ctx)
        try:
            current = await asyncio.to_thread(self._scan)
            # Rotated away or deleted: finish the old file before reading its successor. It
            # stays tracked until then: when the bus refuses its last lines, the retry rewinds
            # and reads them again from the handle still open (a file taken out first lost
            # them, the next scan no longer finding it).
            for key in [k for k in self._files if k not in current]:
                f = self._files[key]
                if f.handle is not None:
                    try:
                        while await self._read(ctx, f):
                            # (read 883,354 bytes behind for the whole drain of a deleted file)
                            ctx.status.lag = sum(map(_unread, self._files.values()))
                        if self._written_elsewhere(f):
                            await self._flush_due(ctx, f)
                            continue
                    except OSError as exc:
                        # its handle fails (EIO, a stale NFS handle): retried, it held the
                        # source in backoff for good, no other file read
                        if isinstance(exc, ConnectionError):
                            raise  # a publish's, retried as any
                        log.warning(
                            "log-tail %s: %s is gone and its handle cannot be read (%s): "
                            "the rest of it is not read",
                            self.name,
                            f.path,
                            exc,
                        )
                    await self._finish(ctx, f)
                    with contextlib.suppress(OSError):  # a stale handle may fail to close too
                        f.handle.close()
                del self._files[key]
            await self._forget_gone(ctx, current)
            await self._open_what_grew(current, first_start)
            more = False
            lag = 0
            now = asyncio.get_running_loop().time()
            for f in list(self._files.values()):
                if f.key not in current:  # renamed out of the glob: read above
                    lag += _unread(f)
                    continue
                f.path, size, _mtime = current[f.key]
                if f.handle is None:
                    lag += max(size - f.committed, 0)
                    continue
                more = await self._read(ctx, f) or more
                await self._flush_due(ctx, f)
                if (
                    f.path != f.opened_as
                    and not f.idle
                    and now - f.grew_at >= self.config.close_inactive
                ):
                    # Renamed away (app.log -> app.log.1, still matched by app.log*) and done
                    # growing: its last line, without a newline, waited for it to be deleted.
                    await self._finish(ctx, f)
                lag += _unread(f)
                if f.idle and now - f.grew_at >= self.config.close_inactive:
                    # reopened when it grows or is written (max_open_files)
                    f.mtime_ns = os.fstat(f.handle.fileno()).st_mtime_ns
                    f.handle.close()
                    f.handle = None
            # Files waiting for one of max_open_files: what their checkpoint has not reached
            # (lag read 0 while 344 files sat unread in the review's run).
            for key, (_path, size, _mtime) in current.items():
                if key not in self._files:
                    saved = self._saved.get(key)
                    done = int(saved.get("offset", 0)) if isinstance(saved, dict) else 0
                    lag += max(size - done, 0)
            ctx.status.lag = lag
            return more
        finally:
            await self._save(ctx)

    def _written_elsewhere(self, f: _File) -> bool:
        """Whether ``f``, open but no longer matched by the glob, is still a file (renamed, not
        deleted) that grew within ``close_inactive``: read on, as one renamed within the glob
        is. Rotated to a name the glob does not match (``0.log`` to ``0.log.2``), it was
        finished at once, and the lines its writer added before reopening its log (logrotate's
        ``create``) were lost. A deleted one is finished at once (its space is freed once
        closed)."""
        assert f.handle is not None
        if os.fstat(f.handle.fileno()).st_nlink == 0:
            return False
        return asyncio.get_running_loop().time() - f.grew_at < self.config.close_inactive

    async def _forget_gone(self, ctx: SourceContext, current: dict[str, Any]) -> None:
        """Delete the checkpoints of files gone for ``_FORGET_AFTER`` s (their path no longer
        there, or another file now): one row stayed for every file the glob ever matched (a
        folder of daily logs), waiting for its inode to be reused."""
        stale = [key for key in self._saved if key not in current and key not in self._files]
        gone = await asyncio.to_thread(self._vanished, stale) if stale else set()
        now = asyncio.get_running_loop().time()
        self._gone = {key: self._gone.get(key, now) for key in gone}
        due = [key for key, since in self._gone.items() if now - since >= _FORGET_AFTER]
        if due:
            await ctx.checkpoints.delete_many(due)
            for key in due:
                del self._gone[key]
                self._saved.pop(key, None)
                self._dirty.pop(key, None)

    def _vanished(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` whose checkpointed path is gone or is another file now."""
        found = set()
        for key in keys:
            saved = self._saved.get(key)
            path = saved.get("path") if isinstance(saved, dict) else None
            try:
                if path is None or _identity(os.stat(path)) != key:
                    found.add(key)
            except FileNotFoundError:
                found.add(key)
            except OSError:
                continue  # cannot tell (no permission, a mount gone astray): kept
        return found

    async def _open_what_grew(
        self, current: dict[str, tuple[str, int, int]], first_start: bool
    ) -> None:
        """Open files not tracked yet, and closed ones whose size moved, while fewer than
        ``max_open_files`` are open; the others wait for a file to be closed for inactivity."""
        room = self.config.max_open_files - sum(f.handle is not None for f in self._files.values())
        waiting = 0
        now = asyncio.get_running_loop().time()
        for key, (path, size, mtime) in current.items():
            f = self._files.get(key)
            if f is not None and (
                f.handle is not None or (size == f.committed and mtime == f.mtime_ns)
            ):
                continue
            if f is None:
                if room <= 0 and not self._read_to(key, size):
                    waiting += 1
                    continue
                opened = await asyncio.to_thread(self._open, key, path, first_start, room > 0)
                if opened is not None:
                    opened.grew_at = now
                    self._files[key] = opened
                    room -= opened.handle is not None
                    if self.config.start_at == "end" and key not in self._saved:
                        # Where it starts is a checkpoint at once: with start_at: end, lines
                        # written before the first read and while stopped were skipped at the
                        # next start, which again found no checkpoint and began at the end.
                        self._mark(opened)
            elif room <= 0:
                waiting += 1
            elif await asyncio.to_thread(self._reopen, f, path):
                f.grew_at = now
                room -= 1
        if waiting and not self._waiting_warned:
            log.warning(
                "log-tail %s: %d matching files wait for one of max_open_files (%d) to be closed "
                "for inactivity (close_inactive %gs)",
                self.name,
                waiting,
                self.config.max_open_files,
                self.config.close_inactive,
            )
        self._waiting_warned = waiting > 0

    def _scan(self) -> dict[str, tuple[str, int, int]]:
        """Identity -> (path, size, mtime_ns) of every regular file the glob matches now."""
        found: dict[str, tuple[str, int, int]] = {}
        for path in sorted(glob.glob(self.config.path, recursive=True)):
            if not self._unreadable.named(path):
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:  # a symlink loop, no permission: that file, not the others
                self._unreadable.skip(path, exc)
                continue
            if stat.S_ISREG(st.st_mode) and not any(
                fnmatch.fnmatchcase(path, pattern) for pattern in self.config.exclude
            ):
                found.setdefault(_identity(st), (path, st.st_size, st.st_mtime_ns))
        if not found and not self._files:
            # Retried with backoff, as the directory source does: a glob under a directory
            # that is not there (a typo, a mount not up) showed running, 0 events, for ever.
            fixed = re.split(r"[*?\[]", self.config.path, maxsplit=1)[0]
            directory = os.path.dirname(fixed) or "."
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"directory {directory!r} does not exist")
        return found

    def _handle(self, key: str, path: str) -> BinaryIO | None:
        """``path`` opened, if it still is the file ``key``."""
        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - kept while the file is active
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unreadable.skip(path, exc)
            return None
        if _identity(os.fstat(handle.fileno())) != key:
            handle.close()  # replaced between scan and open: the next scan sees the new one
            return None
        return handle

    def _reopen(self, f: _File, path: str) -> bool:
        """Open ``f`` again after it was closed for inactivity; it reads on from its checkpoint
        (a file truncated or rewritten meanwhile is seen by its size and first bytes)."""
        f.handle = self._handle(f.key, path)
        if f.handle is None:
            return False
        fd = f.handle.fileno()
        if os.fstat(fd).st_size < f.committed or _tail_at(fd, f.tail_at) != f.tail:
            # Rewritten while closed (removed and made again on the same inode, or truncated
            # and written to the same size): behind the same first bytes, its lines were
            # skipped. Everything read before is on the bus (it closed idle): start over.
            f.start_over(_read_head(f.handle))
            self._mark(f)
        return True

    def _read_to(self, key: str, size: int) -> bool:
        """Whether file ``key``'s checkpoint says it was read to ``size``, its size now."""
        saved = self._saved.get(key)
        return isinstance(saved, dict) and int(saved.get("offset", -1)) == size

    def _open(self, key: str, path: str, first_start: bool, room: bool) -> _File | None:
        """``path`` (the file ``key``) opened where its checkpoint says it was read to; one
        read to its end is checked and closed again, holding none of ``max_open_files`` until
        it grows (a folder of old logs read before a restart held them all, opened in name
        order, and the live log waited ``close_inactive`` for each round of them); one with
        more to read is kept open only with ``room``."""
        handle = self._handle(key, path)
        if handle is None:
            return None
        st = os.fstat(handle.fileno())
        head = _read_head(handle)
        saved = self._saved.get(key)
        offset = generation = 0
        if isinstance(saved, dict):
            generation = int(saved.get("gen", 0))
            saved_head = bytes.fromhex(saved.get("head", ""))
            # Same inode but shorter, or different first bytes: truncated while closed, or a
            # new file reusing the inode: start over, as a new generation.
            saved_tail = bytes.fromhex(saved.get("tail", ""))
            at = int(saved.get("offset", 0))
            if (
                at <= st.st_size
                and (head.startswith(saved_head) or saved_head.startswith(head))
                and ("tail" not in saved or _tail_at(handle.fileno(), at) == saved_tail)
            ):
                offset = at
            else:
                generation += 1
        elif saved is None and first_start and self.config.start_at == "end":
            offset = st.st_size
        f = _File(
            key=key, path=path, handle=handle, head=head, committed=offset, generation=generation
        )
        # the name it had when last saved: renamed while eventbus was stopped is renamed too
        f.opened_as = str(saved.get("path", path)) if isinstance(saved, dict) else path
        f.tail, f.tail_at = _tail_at(handle.fileno(), offset), offset
        f.rewind()
        if offset == st.st_size:
            f.mtime_ns = st.st_mtime_ns
            f.handle = None
        if f.handle is None or not room:
            handle.close()
        return f if f.handle is None or room else None

    async def _read(self, ctx: SourceContext, f: _File) -> bool:
        """Consume new bytes of ``f`` (open); True when more remain than one chunk held."""
        handle = f.handle
        assert handle is not None, "a closed file is reopened before it is read"
        data, size, head, tail = await asyncio.to_thread(_read_chunk, handle, f.read_pos, f.tail_at)
        prefix = min(len(head), len(f.head))
        if size < f.read_pos or head[:prefix] != f.head[:prefix] or tail != f.tail:
            # Copy-truncate: what was read is complete; the file restarts at offset 0.
            await self._finish(ctx, f)
            f.start_over(head)
            self._mark(f)
            data, size, head, _ = await asyncio.to_thread(_read_chunk, handle, 0, 0)
        if len(head) > len(f.head):
            f.head = head
        if not data:
            return False
        f.grew_at = asyncio.get_running_loop().time()
        self._consume(f, data, ctx.clock.now())
        await self._flush_due(ctx, f)
        return f.read_pos < size

    def _consume(self, f: _File, data: bytes, now: datetime) -> None:
        limit = self.config.max_line_bytes
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            piece = data[pos:] if newline < 0 else data[pos:newline]
            # Keep at most ``limit`` bytes of a line; the rest is dropped and flagged.
            room = limit - len(f.partial)
            f.overflowed = f.overflowed or len(piece) > room
            f.partial += piece[: max(room, 0)]
            if newline < 0:
                break
            end = f.read_pos + newline + 1
            self._add_line(f, bytes(f.partial), f.line_start, end, now, f.overflowed)
            f.partial.clear()
            f.overflowed = False
            f.line_start = end
            pos = newline + 1
        f.read_pos += len(data)

    def _add_line(
        self, f: _File, raw: bytes, start: int, end: int, now: datetime, truncated: bool
    ) -> None:
        text = raw.decode("utf-8", errors="replace").removesuffix("\r")
        if start == 0:
            # a byte order mark (files written on Windows): the first record began with
            # U+FEFF, and in JSON it was "BOM is not supported"
            text = text.removeprefix("\ufeff")
        record = f.record
        multiline = self.config.multiline
        if (
            record is not None
            and multiline is not None
            and self._continuation is not None
            and self._continuation.match(text)
            and len(record.lines) < multiline.max_lines
        ):
            record.lines.append(text)
            record.truncated = record.truncated or truncated
            record.end = end
            record.last_at = now
            return
        self._close_record(f)
        new = _Record(start=start, end=end, lines=[text], truncated=truncated, last_at=now)
        if multiline is None:
            self._to_batch(f, new)
        else:
            f.record = new

    def _close_record(self, f: _File) -> None:
        if f.record is not None:
            self._to_batch(f, f.record)
            f.record = None

    def _to_batch(self, f: _File, record: _Record) -> None:
        if not f.batch:
            f.batch_started = record.last_at
        f.batch.append(record)

    async def _flush_due(self, ctx: SourceContext, f: _File) -> None:
        """Publish whatever is complete: full batches, and records or batches past their wait."""
        now = ctx.clock.now()
        multiline = self.config.multiline
        if (
            multiline is not None
            and f.record is not None
            and (now - f.record.last_at).total_seconds() >= multiline.flush_after
        ):
            self._close_record(f)
        batch = self.config.batch
        if batch is None:
            while f.batch:
                await self._publish(ctx, f, 1)
            return
        while len(f.batch) >= batch.max_lines:
            await self._publish(ctx, f, batch.max_lines)
        started = f.batch_started
        if f.batch and started is not None and (now - started).total_seconds() >= batch.max_wait:
            await self._publish(ctx, f, len(f.batch))

    async def _finish(self, ctx: SourceContext, f: _File) -> None:
        """Publish everything read from ``f``, including a last line without a newline."""
        if f.read_pos > f.line_start:
            now = ctx.clock.now()
            self._add_line(f, bytes(f.partial), f.line_start, f.read_pos, now, f.overflowed)
            f.partial.clear()
            f.overflowed = False
            f.line_start = f.read_pos
        self._close_record(f)
        step = self.config.batch.max_lines if self.config.batch is not None else 1
        while f.batch:
            await self._publish(ctx, f, min(step, len(f.batch)))

    async def _publish(self, ctx: SourceContext, f: _File, count: int) -> None:
        records = f.batch[:count]
        await self._emit(ctx, f, records, ctx.clock.now())
        del f.batch[:count]
        f.batch_started = f.batch[0].last_at if f.batch else None
        f.committed = records[-1].end
        self._mark(f)

    async def _emit(
        self, ctx: SourceContext, f: _File, records: list[_Record], now: datetime
    ) -> None:
        try:
            await ctx.emit(self._event(f, records, now, ctx.max_event_size))
        except (CloudEventError, EventTooLargeForBus) as exc:
            # Too big as one event (escaped control characters, long lines), JSON nested
            # too deep: it raised out of the source, which restarted on it for ever.
            if len(records) == 1:
                reason = exc.detail if isinstance(exc, CloudEventError) else str(exc)
                await self._set_aside(ctx, f, records[0], now, reason)
            else:
                for record in records:  # alone, each may fit
                    await self._emit(ctx, f, [record], now)

    async def _set_aside(
        self, ctx: SourceContext, f: _File, record: _Record, now: datetime, reason: str
    ) -> None:
        """Dead-letter a record no event can carry (its text, cut to the event size limit),
        unless in ``json`` format it was the JSON: then its text goes as ``message`` with
        ``json_error``, as for a line that is not JSON."""
        if self.config.format == "json":
            try:
                await ctx.emit(self._event(f, [record], now, ctx.max_event_size, json_error=reason))
            except (CloudEventError, EventTooLargeForBus):
                pass
            else:
                return
        # whole: dead_letter keeps its first MAX_SET_ASIDE bytes, and says in meta how long it
        # was (cut here, it read as a record of exactly that size)
        text = "\n".join(record.lines).encode()
        meta = {"path": f.path, "offset": record.start, "lines": len(record.lines)}
        await ctx.dead_letter(text, f"a log record no event can carry: {reason}", meta)

    def _mark(self, f: _File) -> None:
        self._dirty[f.key] = {
            "offset": f.committed,
            "path": f.path,
            "head": f.head.hex(),
            "gen": f.generation,
        }

    def _tails(self) -> None:
        """The bytes before each marked file's new offset, read in a worker thread (a read per
        record on the event loop, as the checkpoint's ``tail``); a file closed meanwhile keeps
        its checkpoint without one, as older checkpoints are."""
        for key, entry in self._dirty.items():
            f = self._files.get(key)
            if f is not None and f.handle is not None and f.committed == entry["offset"]:
                f.tail, f.tail_at = _tail_at(f.handle.fileno(), f.committed), f.committed
                entry["tail"] = f.tail.hex()
            elif f is not None and f.tail_at == entry["offset"]:
                entry["tail"] = f.tail.hex()

    async def _save(self, ctx: SourceContext) -> None:
        if self._dirty:
            await asyncio.to_thread(self._tails)
            await ctx.checkpoints.put_many(self._dirty)
            self._saved.update(self._dirty)
            self._dirty = {}

    def _record_data(self, record: _Record, json_error: str | None = None) -> dict[str, Any]:
        message = "\n".join(record.lines)
        data: dict[str, Any] = {"offset": record.start}
        if json_error is not None:  # JSON, but no event can carry it as such
            data["message"] = message
            data["json_error"] = json_error
        elif self.config.format == "json":
            try:
                data["json"] = load_json(message.encode())
            except (orjson.JSONDecodeError, CloudEventError) as exc:
                data["message"] = message
                data["json_error"] = str(exc)
        else:
            data["message"] = message
        if len(record.lines) > 1:
            data["lines"] = len(record.lines)
        if record.truncated:
            data["truncated"] = True
        return data

    def _event(
        self,
        f: _File,
        records: list[_Record],
        now: datetime,
        max_size: int,
        json_error: str | None = None,
    ) -> dict[str, Any]:
        texts = "\n".join(line for r in records for line in r.lines)
        # Identity, generation, position and content: a re-read after a crash gets the same id,
        # a new file reusing the inode (or a truncated one) does not.
        generation = f"g{f.generation}|" if f.generation else ""
        event_id = uuid.uuid5(
            _NAMESPACE, f"{self.name}|{f.key}|{generation}{records[0].start}|{texts}"
        )
        if self.config.batch is None:
            data = {"path": f.path, **self._record_data(records[0], json_error)}
            kind = "eventbus.log.line"
        else:
            data = {"path": f.path, "records": [self._record_data(r, json_error) for r in records]}
            kind = "eventbus.log.batch"
        return new_event(
            type=kind,
            source=f"urn:eventbus:source:{self.name}",
            # a control character in a file name is none in an attribute (data has the path)
            subject=attribute_text(f.path),
            id=str(event_id),
            time=now,
            data=data,
            max_size=max_size,
        )
