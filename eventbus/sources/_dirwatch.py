"""The ``directory`` source: new or changed files in a local directory become events.

    stat every file matching ``pattern`` (every ``interval`` s) ─> compare with checkpoints
      ─> ctx.emit ─> checkpoint ``f:<relative path>`` = {size, mtime_ns}

Polling ``stat`` needs no extra dependency and works on every filesystem (including network
mounts where inotify does not). A file's size and mtime are checkpointed after its event is on
the bus: a restart emits nothing twice and misses nothing; a crash in between re-emits that
one file (at-least-once, same event ``id``). Removed files are not reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic

from eventbus._errors import BusError, ConfigError, StoreError
from eventbus.sources._base import Backoff, SourceContext, register_source

__all__ = ["DirectoryConfig", "DirectorySource"]

_NAMESPACE = uuid.UUID("8d0f3c62-7b1a-4e59-a2c4-3f6e9d1b0a77")


class DirectoryConfig(pydantic.BaseModel):
    """Settings of a ``type: directory`` source."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    path: str = pydantic.Field(min_length=1)
    pattern: str = "*"
    interval: float = pydantic.Field(default=2.0, gt=0)
    # Files up to this many bytes that decode as UTF-8 carry their text in data.content;
    # 0 (the default) never reads file contents.
    content_max_bytes: int = pydantic.Field(default=0, ge=0, le=1024 * 1024)


@register_source("directory", DirectoryConfig)
class DirectorySource:
    """Watches one directory by polling; see the module docstring for the guarantees."""

    def __init__(self, name: str, config: DirectoryConfig) -> None:
        self.name = name
        self.type = "directory"
        self.config = config
        self.root = Path(config.path).expanduser().resolve()

    async def run(self, ctx: SourceContext) -> None:
        """Poll until cancelled. A missing directory raises ConfigError; bus or database
        failures are reported in ``ctx.status`` and retried with backoff."""
        seen: dict[str, Any] | None = None
        backoff = Backoff(ctx.clock, maximum=max(self.config.interval, 30.0))
        while True:
            try:
                if seen is None:
                    seen = await ctx.checkpoints.items("f:")
                await self._poll(ctx, seen)
            except (BusError, StoreError, OSError) as exc:
                ctx.report_error(exc)
                seen = None
                await backoff.wait()
                continue
            backoff.reset()
            ctx.status.state = "running"
            await ctx.clock.sleep(self.config.interval)

    async def _poll(self, ctx: SourceContext, seen: dict[str, Any]) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"source {self.name!r}: directory {str(self.root)!r} does not exist")
        changed = await asyncio.to_thread(self._scan, seen)
        ctx.status.lag = len(changed)
        for rel, marker, stat in changed:
            event = await asyncio.to_thread(self._event, rel, marker, stat, "f:" + rel in seen)
            await ctx.emit(event)
            await ctx.checkpoints.put("f:" + rel, marker)
            seen["f:" + rel] = marker
        ctx.status.lag = 0

    def _scan(self, seen: dict[str, Any]) -> list[tuple[str, dict[str, int], os.stat_result]]:
        """Files whose size or mtime differ from their checkpoint, oldest first."""
        changed = []
        for path in self.root.glob(self.config.pattern):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed between listing and stat
            if not path.is_file():
                continue
            rel = path.relative_to(self.root).as_posix()
            marker = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if seen.get("f:" + rel) != marker:
                changed.append((rel, marker, stat))
        changed.sort(key=lambda item: (item[1]["mtime_ns"], item[0]))
        return changed

    def _event(
        self, rel: str, marker: dict[str, int], stat: os.stat_result, known: bool
    ) -> dict[str, Any]:
        path = self.root / rel
        modified = datetime.fromtimestamp(stat.st_mtime_ns / 1e9, UTC)
        data: dict[str, Any] = {
            "path": str(path),
            "relative_path": rel,
            "size": stat.st_size,
            "mtime": modified.isoformat(),
        }
        if 0 < stat.st_size <= self.config.content_max_bytes:
            # Binary or vanished: the event still reports the file, without content.
            with contextlib.suppress(OSError, UnicodeDecodeError):
                data["content"] = path.read_bytes()[: self.config.content_max_bytes].decode()
        return {
            "specversion": "1.0",
            # The file version names the event, so a re-emitted one has the same id.
            "id": str(uuid.uuid5(_NAMESPACE, f"{path}#{marker['size']}@{marker['mtime_ns']}")),
            "source": f"urn:eventbus:source:{self.name}",
            "type": "eventbus.file.modified" if known else "eventbus.file.created",
            "subject": rel,
            "time": modified.isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": data,
        }
