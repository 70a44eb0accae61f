"""The audit of refused requests, rate-limited: a flood of requests without a valid API key
must not cost a database row each.

Where it sits: ``eventbus._ingest.Access`` refuses a request (401/403) and hands it here; up to
``per_second`` refusals a second become rows of the ``refusals`` table through the audit
writer. The rest are counted in ``eventbus_refusals_unrecorded`` and, once their second is
over, summed up in one summary row and one log line. So the table grows by at most
``per_second + 1`` rows a second per process, whatever the request rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from eventbus import metrics

if TYPE_CHECKING:
    from eventbus.store import AuditWriter

__all__ = ["RefusalLog"]

log = logging.getLogger("eventbus.http")


class RefusalLog:
    """Records refusals through ``audit``, at most ``per_second`` one by one each second."""

    def __init__(self, audit: AuditWriter, per_second: int = 20) -> None:
        self._audit = audit
        self._per_second = per_second
        self._second = -1
        self._recorded = 0  # rows written in the current second
        self._unrecorded = 0  # refusals waiting for their summary row
        self._summary: asyncio.Task[None] | None = None

    def record(self, *, remote: str | None, path: str, reason: str) -> None:
        """Record one refusal, or count it for the summary. Never waits: with the audit
        buffer full it is counted for the summary too."""
        now = time.monotonic()
        second = int(now)
        if second != self._second:
            self._second, self._recorded = second, 0
        if self._recorded < self._per_second:
            self._recorded += 1
            if self._audit.refused(remote=remote, path=path, reason=reason):
                return
        self._unrecorded += 1
        metrics.REFUSALS_UNRECORDED.inc()
        if self._summary is None:
            self._summary = asyncio.create_task(self._summarize(second + 1 - now))

    async def _summarize(self, delay: float) -> None:
        await asyncio.sleep(delay)
        count, self._unrecorded = self._unrecorded, 0
        self._summary = None
        reason = (
            f"{count} more refused requests were not recorded one by one "
            f"(over {self._per_second} a second)"
        )
        log.warning("refused requests: %s", reason)
        if not self._audit.refused(remote=None, path="*", reason=reason):
            # the audit buffer is full or the service stopping: the log line and metric remain
            log.warning("refused requests: summary row not written")
