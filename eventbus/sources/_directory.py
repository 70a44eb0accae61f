"""The ``directory`` source: new or changed files in a local directory become events.

    stat every file matching ``pattern`` (every ``interval`` s) ─> compare with checkpoints
      ─> ctx.emit ─> checkpoint ``f:<relative path>`` = {size, mtime_ns}

Polling ``stat`` needs no extra dependency and works on every filesystem (including network
mounts where inotify does not). A file's size and mtime are checkpointed after its event is on
the bus: a restart emits nothing twice and misses nothing; a crash in between re-emits that
one file (at-least-once, same event ``id``). Removed files are not reported (their
checkpoints are deleted).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pydantic

from eventbus._errors import BusError, CloudEventError, EventTooLargeForBus, StoreError
from eventbus.cloudevents import attribute_text, validate
from eventbus.config import SourceSpec
from eventbus.sources._base import SourceContext, UnreadablePaths
from eventbus.sources._changes import poll_changes

__all__ = ["DirectorySource", "DirectorySourceSpec"]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("8d0f3c62-7b1a-4e59-a2c4-3f6e9d1b0a77")


class DirectorySourceSpec(SourceSpec):
    """Settings of a ``type: directory`` source."""

    path: str = pydantic.Field(min_length=1)
    pattern: str = "*"
    interval: float = pydantic.Field(default=2.0, gt=0)
    # Files up to this many bytes that decode as UTF-8 carry their text in data.content;
    # 0 (the default) never reads file contents.
    content_max_bytes: int = pydantic.Field(default=0, ge=0, le=1024 * 1024)

    @pydantic.field_validator("pattern")
    @classmethod
    def _within_path(cls, pattern: str) -> str:
        # Refused here, with the file and line: each failed every scan (a source crashing
        # and restarted for ever), or reported files outside the directory.
        if not pattern:
            raise ValueError("the pattern is empty ('*' matches every file of path)")
        if PurePosixPath(pattern).is_absolute():
            raise ValueError("a pattern is relative to path (put the directory in path)")
        if ".." in PurePosixPath(pattern).parts:
            raise ValueError("a pattern may not leave path ('..')")
        return pattern


class DirectorySource:
    """Watches one directory by polling; see the module docstring for the guarantees."""

    one_instance = True  # under a lease: see SourceRunner

    def __init__(self, config: DirectorySourceSpec) -> None:
        self.name = config.name
        self.type = config.type
        self.config = config
        # not resolved: a drop folder that is a symlink re-pointed (a deploy) is followed to its
        # new target at the next scan, not watched where it pointed at the start (abspath
        # takes out "..", as resolving did, without following links)
        self.root = Path(os.path.abspath(Path(config.path).expanduser()))
        self._unreadable = UnreadablePaths(log, f"directory {self.name}")

    async def run(self, ctx: SourceContext) -> None:
        """Poll until cancelled. A missing directory and bus or database failures are reported
        in ``ctx.status`` and retried with backoff."""
        await poll_changes(
            ctx,
            prefix="f:",
            interval=self.config.interval,
            transient=(BusError, StoreError, OSError),
            scan=self._scan,
            order=lambda file: (file[1].st_mtime_ns, file[0]),
            event=lambda file, known: asyncio.to_thread(
                self._event, *file, known, ctx.max_event_size
            ),
            emit=functools.partial(_emit_file, ctx),
        )

    async def _scan(self) -> list[tuple[str, dict[str, int], tuple[str, os.stat_result]]]:
        if not self.root.is_dir():
            # Retried (backoff up to 30 s), not failed for good: a drop folder moved aside and
            # made again, a mount not up yet.
            raise FileNotFoundError(f"directory {str(self.root)!r} does not exist")
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[tuple[str, dict[str, int], tuple[str, os.stat_result]]]:
        """Every file matching the pattern with its marker (size, mtime). Runs in a thread."""
        files = []
        for path in self.root.glob(self.config.pattern):
            if not self._unreadable.named(str(path)):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed between listing and stat
            except OSError as exc:
                # A symlink loop, no permission: that file, not the whole scan (retried for
                # ever, every other file waiting).
                self._unreadable.skip(str(path), exc)
                continue
            if not path.is_file():
                continue
            rel = path.relative_to(self.root).as_posix()
            files.append((rel, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, (rel, stat)))
        return files

    def _event(self, rel: str, stat: os.stat_result, known: bool, max_size: int) -> dict[str, Any]:
        path = self.root / rel
        modified = datetime.fromtimestamp(stat.st_mtime_ns / 1e9, UTC)
        data: dict[str, Any] = {
            "path": str(path),
            "relative_path": rel,
            "size": stat.st_size,
            "mtime": modified.isoformat(),
        }
        if 0 < stat.st_size <= self.config.content_max_bytes:
            # Binary, vanished or changed: the event still reports the file, without content,
            # and why.
            try:
                data["content"] = _content(path, stat).decode()
            except UnicodeDecodeError:
                data["content_omitted"] = "the file is not UTF-8 text"
            except OSError as exc:
                data["content_omitted"] = f"the file could not be read: {exc.strerror or exc}"
        elif stat.st_size > self.config.content_max_bytes > 0:
            limit = self.config.content_max_bytes
            data["content_omitted"] = f"the file is larger than content_max_bytes ({limit})"
        elif self.config.content_max_bytes:
            data["content"] = ""
        event = {
            "specversion": "1.0",
            # The file version names the event, so a re-emitted one has the same id; its
            # change time tells a file that came back (moved out and in again, copied with
            # its mtime) from the one reported before: by size and mtime alone it had that
            # event's id, and the bus dropped it as a copy.
            "id": str(
                uuid.uuid5(
                    _NAMESPACE,
                    f"{path}#{stat.st_size}@{stat.st_mtime_ns}^{stat.st_ctime_ns}",
                )
            ),
            "source": f"urn:eventbus:source:{self.name}",
            "type": "eventbus.file.modified" if known else "eventbus.file.created",
            # a control character in a name is none in an attribute (data has the name)
            "subject": attribute_text(rel),
            "time": modified.isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": data,
        }
        try:
            return validate(event, max_size=max_size)
        except CloudEventError as exc:
            if "content" not in data:
                raise
            # Over the event size limit with its content (escaped, text grows up to six
            # times): the file is reported without it (the bus refused it for good, and the
            # files after it waited behind it).
            del data["content"]
            data["content_omitted"] = exc.detail
            return validate(event, max_size=max_size)


def _content(path: Path, stat: os.stat_result) -> bytes:
    """The bytes of the file ``path`` as ``stat`` saw it; OSError when it has changed since
    (read after it grew, the content did not match the size and id of its event, which a
    later event has: its size and mtime moved, the next scan sees them)."""
    with path.open("rb") as handle:
        content = handle.read(stat.st_size + 1)
        now = os.fstat(handle.fileno())
    if len(content) != stat.st_size or (now.st_size, now.st_mtime_ns) != (
        stat.st_size,
        stat.st_mtime_ns,
    ):
        raise OSError(0, "it changed while it was read (the next event has it)")
    return content


async def _emit_file(ctx: SourceContext, made: dict[str, Any]) -> None:
    """Publish a file's event; one too large for the bus with the file's ``content`` goes
    without it, as one over ``max_event_size`` does: the file is still reported (it was
    dead-lettered with its name only)."""
    try:
        await ctx.emit(made)
    except EventTooLargeForBus as exc:
        data = made["data"]
        if "content" not in data:
            raise
        data = {k: v for k, v in data.items() if k != "content"}
        data["content_omitted"] = str(exc)
        await ctx.emit({**made, "data": data})
