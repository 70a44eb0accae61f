"""Two real ``eventbus serve`` instances sharing one bus and one database, each with the same
directory source: one runs it, the other stands by; the one running it is killed (SIGKILL) in
the middle of a stream of files, and the other takes over within the lease. Ledger: every file
written reaches the function, none is lost; the only duplicates allowed are files the killed
instance had announced and not yet checkpointed."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import ServeProcess
from tests.fixtures.wait import eventually

FILES = 30
LEASE = 2.0  # seconds: source_lease of both instances


async def _state(proc: ServeProcess, source: str) -> str | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(proc.url + "/sources") as resp,
        ):
            body: Any = await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return None
    rows = body if isinstance(body, list) else body.get("sources", [])
    return next((row["state"] for row in rows if row["name"] == source), None)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_standby_takes_a_directory_over_from_a_killed_instance(
    serve_process: Callable[..., ServeProcess], receiver: Receiver, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    source = {"name": "drop", "type": "directory", "path": str(folder), "interval": 0.1}
    target = {"name": "fn", "type": "http", "url": receiver.url("/fn")}
    settings = {"source_lease": LEASE}
    rules = "- name: files\n  targets: [fn]\n"
    first = serve_process(rules=rules, targets=[target], sources=[source], settings=settings)
    await first.start()
    await eventually(lambda: _is(first, "running"), within=20, what="the first running it")
    second = serve_process(rules=rules, targets=[target], sources=[source], settings=settings)
    await second.start()
    await eventually(lambda: _is(second, "standby"), within=20, what="the second standing by")
    for i in range(FILES):
        (folder / f"f{i:02}.txt").write_text(str(i))
        if i == FILES // 2:
            await first.kill()
        await asyncio.sleep(0.1)

    def delivered() -> Counter[str]:
        return Counter(
            str(r.headers.get("ce-subject")) for r in receiver.requests if r.path == "/fn"
        )

    await eventually(
        lambda: len(delivered()) == FILES,
        within=60,
        what=f"all {FILES} files delivered",
    )
    assert await _state(second, "drop") == "running"
    counts = delivered()
    assert set(counts) == {f"f{i:02}.txt" for i in range(FILES)}, counts
    # duplicates: only what the killed instance announced without checkpointing it (its last
    # scan before the kill), never the files written after it
    repeated = sorted(name for name, n in counts.items() if n > 1)
    assert all(name <= f"f{FILES // 2:02}.txt" for name in repeated), repeated


async def _is(proc: ServeProcess, state: str) -> bool:
    return await _state(proc, "drop") == state
