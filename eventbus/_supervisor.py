"""Supervision of the embedded servers: the real ``nats-server`` and PostgreSQL that
``eventbus serve`` runs under its data directory when no external URLs are configured.

    Supervisor ─ every ``check_every`` s ─> server.alive()? ─ no ─> server.restart()
        restart fails ─> back off (0.5 s doubling to ``backoff_max``), try again
        ``give_up_after`` failures in a row ─> ``failed`` set: liveness (GET /healthz) fails,
        so whatever runs eventbus (systemd, Kubernetes, the ``--workers`` parent) restarts it
    alive, but its ``stuck`` probe (:meth:`Supervisor.restart_when_stuck`) gives a reason
        ─> restarted the same way; again only after twice as long (30 s, doubling to 10 min)
        while it stays stuck

Clients need no help: the bus reconnects to the same URL (the server keeps its port and its
JetStream store) and the database pool opens new connections. What a dead server costs is
the time until it is back: publishes answer 503 meanwhile, routing waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from eventbus import metrics
from eventbus._tasks import cancel_and_wait

__all__ = ["Supervised", "Supervisor"]

log = logging.getLogger("eventbus.supervisor")

STUCK_RETRY_FIRST = 30.0
"""Seconds after restarting a stuck server before it may be restarted for that again."""
STUCK_RETRY_MAX = 600.0

Probe = Callable[[], Awaitable[str | None]]
"""Why a running server is stuck, or None."""


class Supervised(Protocol):
    """A child server the supervisor can check and bring back."""

    @property
    def name(self) -> str:
        """Short name for logs, metrics and the health answer."""

    def alive(self) -> bool:
        """Whether the server process is still running (a frozen one is alive)."""

    async def restart(self) -> None:
        """Start the server again on the same address and data; raises when it cannot."""


class Supervisor:
    """Watches ``servers``, each from a task of its own; see the module docstring. One task
    for all: a server being brought back (its restarts failing, on a full or read-only disk)
    held the others' checks, and the database dying meanwhile went unseen."""

    def __init__(
        self,
        servers: Sequence[Supervised],
        *,
        check_every: float = 0.5,
        backoff_first: float = 0.5,
        backoff_max: float = 10.0,
        give_up_after: int = 5,
    ) -> None:
        self._servers = list(servers)
        self._check_every = check_every
        self._backoff = (backoff_first, backoff_max)
        self._give_up_after = give_up_after
        self._failed: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # server name -> its stuck probe, and when it may next be restarted for it (and the
        # wait after that)
        self._stuck: dict[str, Probe] = {}
        self._stuck_next: dict[str, tuple[float, float]] = {}

    @property
    def failed(self) -> str | None:
        """Why liveness fails: the servers that could not be brought back, or the watching
        itself ended, or None."""
        reasons = [f"{name}: {why}" for name, why in self._failed.items()]
        for name, task in self._tasks.items():
            if task.done() and not task.cancelled():
                reasons.append(f"the supervision of {name} stopped: {task.exception()!r}")
        return "; ".join(reasons) or None

    def restart_when_stuck(self, name: str, probe: Probe) -> None:
        """Restart the server ``name`` also while it runs but ``probe`` says why it is stuck
        (a reason, else None): a nats-server whose store hit a full disk answers everything
        but stores nothing, and stays so after the space is freed until it is restarted.
        Restarted at once the first time, then after ``STUCK_RETRY_FIRST`` s doubling to
        ``STUCK_RETRY_MAX`` while it stays stuck (a restart cannot free the disk)."""
        self._stuck[name] = probe

    def start(self) -> None:
        if not self._tasks:
            self._tasks = {
                server.name: asyncio.create_task(
                    self._watch(server), name=f"eventbus-supervisor:{server.name}"
                )
                for server in self._servers
            }

    async def stop(self) -> None:
        """Stop watching (before the servers are stopped on purpose). Idempotent."""
        tasks, self._tasks = self._tasks, {}
        for task in tasks.values():
            await cancel_and_wait(task)

    async def _watch(self, server: Supervised) -> None:
        failing = False  # its check raised: said once until it works
        while True:
            await asyncio.sleep(self._check_every)
            try:
                alive = server.alive()
            except Exception as exc:
                # Out of file descriptors, a check of /proc raised OSError: it ended the
                # watching, and no server was restarted again (nothing said so, liveness green).
                if not failing:
                    failing = True
                    log.error("cannot check embedded %s: %r; trying again", server.name, exc)
                continue
            failing = False
            if not alive:
                await self._bring_back(server)
            elif server.name in self._stuck:
                await self._unstick(server, self._stuck[server.name])

    async def _unstick(self, server: Supervised, probe: Probe) -> None:
        now = time.monotonic()
        allowed, wait = self._stuck_next.get(server.name, (now, STUCK_RETRY_FIRST))
        if now < allowed:
            return
        try:
            why = await probe()
        except Exception as exc:  # a probe's own failure says nothing of the server
            log.warning("cannot tell whether embedded %s is stuck: %r", server.name, exc)
            return
        if why is None:
            self._stuck_next.pop(server.name, None)
            return
        self._stuck_next[server.name] = (now + wait, min(wait * 2, STUCK_RETRY_MAX))
        await self._bring_back(server, f"runs but is stuck ({why})")

    async def _bring_back(self, server: Supervised, why: str = "is gone") -> None:
        log.error("embedded %s %s; restarting it", server.name, why)
        delay, most = self._backoff
        failures = 0
        while True:
            try:
                await server.restart()
            except Exception as exc:
                failures += 1
                if failures >= self._give_up_after:
                    self._failed[server.name] = f"not running, {failures} restarts failed: {exc}"
                log.error("restarting embedded %s failed (%d): %s", server.name, failures, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, most)
                continue
            metrics.EMBEDDED_RESTARTS.labels(server.name).inc()
            self._failed.pop(server.name, None)
            log.warning("embedded %s restarted", server.name)
            return
