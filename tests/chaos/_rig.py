"""The chaos rig: a real ``eventbus serve`` on its embedded default (its own nats-server and
PostgreSQL under a private data directory), a recording function endpoint in the test's loop, and
the processes a fault is injected into.

    rig.service                 the ServeProcess (start, kill = SIGKILL, terminate = SIGTERM)
    rig.workers()               its worker processes, with ``Rig(..., workers=N)`` (the bus on
                                Kafka with ``kafka=BOOTSTRAP``)
    rig.receiver                the function: records every request, can stop and start again
    rig.nats_server()           the embedded servers, found by their pid files in the data
    rig.postgres()                directory, as an operator would find them
    await rig.run(count=..., rate=..., after=..., inject=...)
                                publish a stream, inject the fault once ``after`` events were
                                accepted, settle, stop the service, reconcile the three ledgers

Timings are short so a run takes seconds: JetStream redelivers an un-acknowledged message after
3 s, a failed delivery is retried every 0.5 s, an open circuit is probed after 1 s.
:meth:`Rig.close` leaves no process behind, whatever state the test left them in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import psutil
import yaml

from eventbus.bus._nats_server import free_port
from eventbus.store import EmbeddedPostgres
from tests.chaos._ledger import (
    SOURCE,
    AuditLedger,
    Fault,
    Publisher,
    Report,
    reconcile,
    settle,
)
from tests.fixtures.receiver import Receiver
from tests.fixtures.service import ServeProcess, settings_for, write_config
from tests.fixtures.wait import eventually

__all__ = ["MAX_IN_FLIGHT", "Rig"]

MAX_IN_FLIGHT = 200
HOOK = ("chaos-hook", "whsec_" + base64.b64encode(b"chaos-webhook-key-of-32-bytes!!!").decode())
RULES = """
- name: everything
  targets: [fn]
"""
_SETTINGS = {
    "bus": {"max_in_flight": MAX_IN_FLIGHT, "nats": {"ack_wait": 3}},
    "router": {"shutdown_grace": 5},
}
_DELIVERY = {
    # retried until the function is back: the test is about losing nothing, not about giving up
    "retry": {"strategy": "fixed", "initial_delay": "500ms", "max_attempts": 500, "jitter": False},
    "circuit_breaker": {"failures": 5, "open_for": "1s"},
}
_KAFKA_COMMIT_INTERVAL = 1.0  # seconds: KafkaBusConfig.commit_interval
_DELIVER_WITHIN = 90.0  # seconds for every accepted event to be delivered after the stream
# seconds more for the last audit rows: a message still un-acknowledged is redelivered within the
# 3 s ack wait (a few times over, backing off after a nak), and brings its rows with it
_AUDIT_WITHIN = 15.0


def _process(pid_file: Path, name: str) -> psutil.Process | None:
    """The live process a pid file names, if it is still the server it should be."""
    try:
        proc = psutil.Process(int(pid_file.read_text().split("\n", 1)[0]))
        if name in proc.name() and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


class Rig:
    """See the module docstring; made by the ``rig`` fixture."""

    def __init__(
        self, root: Path, receiver: Receiver, *, kafka: str | None = None, workers: int = 1
    ) -> None:
        """``kafka``: run the bus on the Kafka broker at this bootstrap address (a topic and
        group of the rig's own) instead of the embedded nats-server; ``workers``: processes."""
        self.root = root
        self.kafka = kafka is not None
        self._processes = workers
        self.receiver = receiver
        self.data = root / "data"
        target = {
            "name": "fn",
            "type": "http",
            "url": receiver.url("/fn"),
            "concurrency": 8,
            "timeout": "5s",
            "delivery": _DELIVERY,
        }
        # a webhook trigger making events of the same source, for the runs sent as webhooks
        hook = {
            "name": HOOK[0],
            "type": "webhook",
            "verify": {"kind": "standard-webhooks", "secret": HOOK[1]},
            "event_type": "chaos.tick",
            "event_source": SOURCE,
        }
        write_config(root, rules=RULES, targets=[target], sources=[hook])
        port = free_port()
        settings = settings_for(
            root, database_url=None, kafka_bootstrap=kafka, port=port, extra=_SETTINGS
        )
        config = root / "settings.yaml"
        config.write_text(yaml.safe_dump(settings))
        self.service = ServeProcess(config, port, root / "serve.log", workers)

    def workers(self) -> list[psutil.Process]:
        """The worker processes of ``serve --workers N`` (children of the parent)."""
        assert self.service.proc is not None
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.service.proc.pid).children()
            return [p for p in children if "--reuse-port" in p.cmdline()]
        return []

    def _group_settled(self) -> bool:
        """Whether, since the last partitions revoked, as many workers as the rig runs were
        given partitions (the bus logs each assignment)."""
        assert self.service.log is not None
        assigned = 0
        for line in self.service.log.read_text(errors="replace").splitlines():
            if "Kafka rebalance: partitions" not in line:
                continue
            if " revoked" in line:
                assigned = 0
            elif "partitions [] of" not in line:
                assigned += 1
        return assigned >= self._processes

    def nats_server(self) -> psutil.Process | None:
        return _process(self.data / "nats" / "nats-server.pid", "nats-server")

    def postgres(self) -> list[psutil.Process]:
        """The postmaster and its children (empty when it is not running)."""
        postmaster = _process(self.data / "postgres" / "postmaster.pid", "postgres")
        if postmaster is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [postmaster, *postmaster.children(recursive=True)]
        return [postmaster]

    def dsn(self) -> str:
        """The running embedded PostgreSQL's DSN, from its ``postmaster.pid`` (line 4 the port,
        line 5 the socket directory) and the password file beside its data directory."""
        pg = EmbeddedPostgres(self.data / "postgres")
        lines = (pg.data_dir / "postmaster.pid").read_text().splitlines()
        password = quote(pg.password_file.read_text().strip(), safe="")
        return f"postgresql://postgres:{password}@/postgres?host={quote(lines[4])}&port={lines[3]}"

    async def run(
        self,
        *,
        count: int,
        rate: float,
        after: int,
        inject: Callable[[], Awaitable[Fault]],
        webhooks: bool = False,
    ) -> Report:
        """Start the service, publish ``count`` events at ``rate``/s (as signed webhooks to
        the rig's trigger with ``webhooks``), call ``inject`` once ``after`` of them were
        accepted, settle, stop the service with SIGTERM (which flushes its audit) and reconcile
        the ledgers."""
        await self.service.start()
        if self.kafka and self._processes > 1:
            # Ready is one worker ready: the other joining the group mid-stream moved
            # partitions, and what the first had not committed came again before any fault
            # (10 "unexplained" duplicates in a loaded run).
            await eventually(
                self._group_settled, within=60, every=0.2, what="every worker given partitions"
            )
        publisher = Publisher(self.service.url, count, rate=rate, hook=HOOK if webhooks else None)
        publishing = asyncio.create_task(publisher.run())
        try:
            await publisher.wait_accepted(after)
            fault = await inject()
            await publishing
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        await settle(
            publisher,
            self.receiver,
            self.dsn,
            deliver_within=_DELIVER_WITHIN,
            audit_within=_AUDIT_WITHIN,
        )
        code = await self.service.terminate()
        async with EmbeddedPostgres(self.data / "postgres") as pg:
            audit = await AuditLedger.read(pg.dsn)
        bound = MAX_IN_FLIGHT
        if self.kafka:
            # what a killed worker had acknowledged since its last commit is consumed again
            bound += int(rate * _KAFKA_COMMIT_INTERVAL)
        report = reconcile(
            publisher, self.receiver, audit, fault, max_in_flight=bound, republishes=self.kafka
        )
        if code != 0:
            report.problems.append(f"eventbus exited with {code} on SIGTERM: {self.log_tail()}")
        print(report.summary())  # shown with -rP: the numbers of a passing run
        return report

    def log_tail(self) -> str:
        return self.service.log.read_text(errors="replace")[-12000:]

    async def close(self) -> None:
        """Stop everything this rig started, in whatever state a test left it."""
        for proc in self.postgres():
            with contextlib.suppress(psutil.Error):
                proc.resume()
        if self.service.proc is not None:
            await self.service.terminate(timeout=30)
        nats = self.nats_server()
        if nats is not None:
            await asyncio.to_thread(_stop, [nats])
        if self.postgres():
            pg = EmbeddedPostgres(self.data / "postgres")
            try:
                await pg.start()  # takes a handle on the running server
                await pg.stop()
            finally:
                await asyncio.to_thread(_stop, self.postgres())
        # whatever still names this rig's directory was started by it and missed above
        leftovers = [
            proc
            for proc in psutil.process_iter(["cmdline"])
            if any(str(self.root) in part for part in proc.info["cmdline"] or ())
        ]
        await asyncio.to_thread(_stop, leftovers)
        shutil.rmtree(self.root, ignore_errors=True)
        assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"


def _stop(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
