"""Shared pieces of the end-to-end benchmarks (bench/pipeline_bench.py, bench/delivery_bench.py):
the function endpoint, the load generator, process management and the results file.

Each benchmark runs every component in its own process so they compete for the two cores the
way a deployment would: ``python bench/_harness.py receiver`` is the function endpoint (an aiohttp
server recording, per event, the arrival time minus the ``data.sent`` timestamp the load
generator put in the event), ``python bench/_harness.py load`` is the load generator (closed
loop for a duration or a count, or open loop at a fixed rate) printing one JSON line. Both run
on 127.0.0.1 only, and every loop in them is bounded in count and time.

:class:`Processes` starts children in their own process groups and stops every group it
started (SIGTERM, then SIGKILL) on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import web

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
STOP_GRACE = 40.0  # seconds a stopped process group gets before SIGKILL
READY_BOUND = 120.0  # seconds a started service gets to answer its readiness URL
NOTES = "### Notes\n"  # where the hand-written part of a results section starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- machine and results file ----------------------------------------------------------------


def machine() -> str:
    """One markdown line: cores, CPU model, memory, Python, and the hot-path libraries
    (:func:`environment`, which exits when the environment would make the figures wrong)."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kib / 1024 / 1024:.1f} GiB RAM, "
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}. "
        f"{environment()}"
    )


# Libraries on the hot path of a benchmark: their versions go in every results header, and one
# that is installed without eventbus requiring it would make a figure no `pip install .` gives.
HOT_PATH = (
    "aiohttp",
    "aiokafka",
    "asyncpg",
    "cel-python",
    "fastapi",
    "h11",
    "httptools",
    "jsonpath-ng",
    "nats-py",
    "orjson",
    "pydantic",
    "starlette",
    "uvicorn",
    "uvloop",
)


def _runtime_requirements(name: str) -> set[str]:
    """Every distribution ``name`` needs at run time, itself included (extras left out)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = _canonical(todo.pop())
        if current in seen:
            continue
        seen.add(current)
        try:
            requires = metadata.requires(current) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            requirement, _, marker = spec.partition(";")
            if "extra ==" in marker or "extra==" in marker:
                continue
            if marker.strip() and not _marker_holds(marker):
                continue
            todo.append(re.split(r"[\s\[<>=!~(]", requirement.strip(), maxsplit=1)[0])
    return seen


def _marker_holds(marker: str) -> bool:
    # Only the markers eventbus's tree uses: platform and Python version checks.
    env = {"sys_platform": sys.platform, "platform_system": platform.system()}
    for key, value in env.items():
        for op, want in re.findall(key + r"\s*(==|!=)\s*['\"]([^'\"]+)['\"]", marker):
            if (op == "==") != (value == want):
                return False
    return True


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment() -> str:
    """One markdown line with the versions of the hot-path libraries, after checking that the
    figures will be what a user's ``pip install .`` gets.

    Exits (SystemExit with the reason) when eventbus is not installed in this environment,
    when the installed copy differs from this source tree (reinstall it), or when a hot-path
    library eventbus requires is missing or one it does not require is installed (measure
    from a fresh virtual environment with only ``pip install .``)."""
    # Look where pip installs, not in the source tree (an editable install leaves its metadata
    # beside the sources, which the current directory would otherwise find first).
    installed = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    dist = next(iter(metadata.distributions(name="eventbus", path=installed)), None)
    if dist is None:
        raise SystemExit(
            "eventbus is not installed here: run benchmarks from a fresh virtual environment "
            "with `pip install .` (plus the benchmark's own needs)"
        )
    stale = [
        str(path)
        for path in dist.files or []
        if str(path).startswith("eventbus/")
        and str(path).endswith(".py")
        and not _same_file(ROOT / str(path), Path(str(dist.locate_file(path))))
    ]
    if stale:
        raise SystemExit(
            f"the installed eventbus differs from this source tree ({stale[0]} and "
            f"{len(stale) - 1} more): reinstall it with `pip install .`"
        )
    wanted = _runtime_requirements("eventbus")
    versions, extra, missing = [], [], []
    for name in HOT_PATH:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            if _canonical(name) in wanted:
                missing.append(name)
            continue
        versions.append(f"{name} {version}")
        if _canonical(name) not in wanted:
            extra.append(name)
    if missing:
        raise SystemExit(
            f"{', '.join(missing)} required by eventbus but not installed: `pip install .` again"
        )
    if extra:
        raise SystemExit(
            f"{', '.join(extra)} installed but not required by eventbus: the figures would not "
            "be what `pip install .` gives; measure from a fresh virtual environment"
        )
    return "Hot path: " + ", ".join(versions) + "."


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:  # gone from the tree (moved since the install), or from the install
        return False


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def write_section(title: str, body: str) -> None:
    """Replace the section ``## title`` of bench/RESULTS.md (up to the next ``## ``) with
    ``body``, or append it. A hand-written ``### Notes`` part at the end of the old section is
    kept after the new body; other sections are left byte for byte as they are."""
    lines = RESULTS.read_text(encoding="utf-8").splitlines(keepends=True)
    heading = f"## {title}\n"
    new = [heading, "\n", body.rstrip("\n") + "\n"]
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        if NOTES in lines[start:end]:
            notes = lines[lines.index(NOTES, start, end) : end]
            new += ["\n", *notes]
            while new[-1] == "\n":
                new.pop()
        lines[start:end] = new + (["\n"] if end < len(lines) else [])
    else:
        if lines and lines[-1].strip():
            lines.append("\n")
        lines += new
    RESULTS.write_text("".join(lines), encoding="utf-8")


# -- processes ---------------------------------------------------------------------------------


class Processes:
    """Children started in their own process groups; ``stop_all`` ends every group.

    Use as ``with Processes(log_dir) as procs: procs.start([...])``. SIGTERM to the benchmark
    becomes SystemExit so the ``with`` exit stops the children then too.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, *, capture: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own group, stderr (and stdout unless ``capture``) appended to
        ``log_dir/name.log``."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the child
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the child, wait up to STOP_GRACE seconds, then SIGKILL whatever is left of its
        process group."""
        if proc.poll() is None:
            # The leader alone: a supervisor stops its own children in order.
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_GRACE)
        # Whatever the group leader left behind (a worker, a server it started) goes too.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every child, newest first; all are asked to stop before any is waited for."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(list(self._procs)):
            self.stop(proc)

    def __enter__(self) -> Self:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)


def python_pids(groups: list[int]) -> list[int]:
    """The Python processes of these process groups."""
    return [pid for pid, _ in _python_stats(groups)]


def _python_stats(groups: list[int]) -> list[tuple[int, list[str]]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        comm_end = stat.rindex(")")
        comm = stat[stat.index("(") + 1 : comm_end]
        fields = stat[comm_end + 2 :].split()
        if comm.startswith("python") and int(fields[2]) in groups:  # fields[2]: process group
            found.append((int(entry.name), fields))
    return found


def python_cpu(groups: list[int]) -> float:
    """CPU seconds (user + system) used so far by the Python processes of these process
    groups: the service's own work, without the brokers and databases it talks to."""
    # fields[11:13] are user and system time in ticks
    total = sum(int(f[11]) + int(f[12]) for _, f in _python_stats(groups))
    return total / os.sysconf("SC_CLK_TCK")


async def _cpu_rates(groups: list[int], every: float) -> AsyncIterator[float]:
    """The cores the Python processes of ``groups`` used over each next ``every`` seconds."""
    before = python_cpu(groups)
    while True:
        await asyncio.sleep(every)
        now = python_cpu(groups)
        yield (now - before) / every
        before = now


async def idle_floor(groups: list[int], *, every: float = 0.5, windows: int = 3) -> float:
    """The CPU (in cores) the Python processes of ``groups`` use with nothing to do: the least
    of ``windows`` windows of ``every`` seconds. A Kafka consumer polling every 10 ms uses ~6 %
    of a core per process when idle on this machine (measured with py-spy: all of it aiokafka's
    fetch loop)."""
    rates: list[float] = []
    async for rate in _cpu_rates(groups, every):
        rates.append(rate)
        if len(rates) == windows:
            break
    return min(rates)


async def settle(
    groups: list[int], *, quiet: float = 0.1, every: float = 0.5, bound: float = 60.0
) -> float:
    """Wait until the Python processes of ``groups`` use less than ``quiet`` of a core over
    ``every`` seconds (the work a load left behind, such as audit rows still being written, is
    done), at most ``bound`` seconds; returns how long it took."""
    began = time.monotonic()
    async for rate in _cpu_rates(groups, every):
        if rate < quiet or time.monotonic() - began >= bound:
            break
    return time.monotonic() - began


def profile(pids: list[int], duration: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """Start py-spy sampling each of ``pids`` for ``duration`` seconds (collapsed stacks, one
    file per process in ``out``); wait for the returned processes, then :func:`summarize`."""
    out.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(duration))),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out / f"{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


def summarize(out: Path, top: int = 40) -> str:
    """Self and inclusive share of samples per function over every profile in ``out``."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    samples = 0
    for file in out.glob("*.txt"):
        for line in file.read_text(encoding="utf-8").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [
                f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
                for f in stack.split(";")
            ]
            samples += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{samples} samples", "| self % | total % | function |", "|---:|---:|---|"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(
            f"| {100 * count / samples:.1f} | {100 * inclusive[frame] / samples:.1f} | {frame} |"
        )
    return "\n".join(lines)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], bound: float = READY_BOUND) -> None:
    """Return once ``url`` answers 200. Raises RuntimeError if ``proc`` exits or ``bound``
    seconds pass first."""
    deadline = time.monotonic() + bound
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before ready")
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {bound:.0f} s")


# -- eventbus ------------------------------------------------------------------------------------


async def start_eventbus(
    procs: Processes,
    work: Path,
    *,
    workers: int,
    rules: str,
    targets: list[dict[str, Any]],
    bus: dict[str, Any] | None = None,
    database_url: str | None = None,
) -> tuple[str, subprocess.Popen[bytes]]:
    """Write a settings file, rules and targets under ``work`` and run ``python -m eventbus
    serve --workers N`` until every worker has logged that it is ready. Returns the
    ``/events`` URL and the supervisor process (stop it with ``procs.stop``). With no
    ``bus``/``database_url`` the service runs on its embedded default under ``work/data``.
    Raises RuntimeError if it does not become ready."""
    port = free_port()
    for sub in ("rules", "connectors"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / "rules" / "bench.yaml").write_text(rules, encoding="utf-8")
    # JSON is YAML: the files are written with orjson rather than a YAML emitter.
    (work / "connectors" / "targets.yaml").write_bytes(orjson.dumps({"targets": targets}))
    settings: dict[str, Any] = {
        "listen": {"host": HOST, "port": port},
        "data_dir": str(work / "data"),
        "rules": str(work / "rules"),
        "connectors": str(work / "connectors"),
        "log_level": "info",
        "bus": bus or {},
    }
    if database_url:
        settings["database"] = {"url": database_url}
    config = work / "eventbus.yaml"
    config.write_bytes(orjson.dumps(settings))
    cmd = [sys.executable, "-m", "eventbus", "serve", "--config", str(config)]
    name = f"eventbus-{work.name}"
    proc = procs.start(name, [*cmd, "--workers", str(workers)])
    await wait_ready(f"http://{HOST}:{port}/readyz", proc)
    # /readyz answers once one worker is up; the others may still be importing and compiling,
    # which would eat into the first measurement.
    log = procs.log_dir / f"{name}.log"
    deadline = time.monotonic() + READY_BOUND
    while log.read_bytes().count(b"eventbus ready") < workers:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"not all {workers} eventbus workers became ready; see {log}")
        await asyncio.sleep(0.2)
    return f"http://{HOST}:{port}/events", proc


# -- function endpoint ---------------------------------------------------------------------------


def start_receiver(procs: Processes) -> Receiver:
    port = free_port()
    proc = procs.start("receiver", [sys.executable, __file__, "receiver", "--port", str(port)])
    return Receiver(f"http://{HOST}:{port}", proc)


class Receiver:
    """Client side of the function endpoint process: its URL, stats and failure control."""

    def __init__(self, base: str, proc: subprocess.Popen[bytes]) -> None:
        self.base = base
        self.proc = proc

    def url(self, path: str) -> str:
        return self.base + path

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.request(method, self.base + path, json=body) as resp,
        ):
            resp.raise_for_status()
            return await resp.json()

    async def ready(self) -> None:
        await wait_ready(self.url("/stats?run=-"), self.proc)

    async def stats(self, run: str) -> dict[str, Any]:
        """``{delivered, answered_ok, answered_fail, first_at, last_at, p50_ms, p99_ms,
        max_ms}`` for events tagged ``run`` (delivered counts distinct ids answered 2xx)."""
        result: dict[str, Any] = await self._call("GET", f"/stats?run={run}")
        return result

    async def fail(self, rate: float, seed: int = 1) -> None:
        """From now on answer 503 to a seeded ``rate`` of requests."""
        await self._call("POST", "/control", {"fail_rate": rate, "seed": seed})

    async def slow_down(self, seconds: float) -> None:
        """From now on answer every request after ``seconds`` (a slow function)."""
        await self._call("POST", "/control", {"delay": seconds})

    async def wait_delivered(
        self, run: str, expected: int, *, bound: float = 120.0, stall: float = 15.0
    ) -> dict[str, Any]:
        """Stats of ``run`` once ``expected`` distinct events arrived, or once nothing new has
        arrived for ``stall`` seconds, or after ``bound`` seconds, whichever comes first."""
        deadline = time.monotonic() + bound
        last, last_change = -1, time.monotonic()
        while True:
            stats = await self.stats(run)
            now = time.monotonic()
            if stats["delivered"] != last:
                last, last_change = stats["delivered"], now
            if last >= expected or now > deadline or now - last_change > stall:
                return stats
            await asyncio.sleep(0.1)


class _Run:
    __slots__ = ("failed", "first_at", "ids", "last_at", "latencies", "ok")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.latencies: list[float] = []
        self.ok = 0
        self.failed = 0
        self.first_at = 0.0
        self.last_at = 0.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def receiver_app() -> web.Application:
    runs: dict[str, _Run] = {}
    control: dict[str, Any] = {"fail_rate": 0.0, "rng": random.Random(1), "delay": 0.0}

    async def deliver(request: web.Request) -> web.Response:
        now = time.time()
        body = orjson.loads(await request.read())
        # Binary mode: the body is the data and the id is a header; structured mode and
        # transformed payloads carry both in the body.
        data = body.get("data", body) if "specversion" in body else body
        event_id = request.headers.get("ce-id") or body["id"]
        run = runs.setdefault(str(data.get("run")), _Run())
        if control["delay"]:
            await asyncio.sleep(control["delay"])
        if control["fail_rate"] and control["rng"].random() < control["fail_rate"]:
            run.failed += 1
            return web.Response(status=503)
        run.ok += 1
        if event_id not in run.ids:
            run.ids.add(event_id)
            run.latencies.append((now - float(data["sent"])) * 1000)
            run.first_at = run.first_at or now
            run.last_at = now
        return web.Response(status=204)

    async def stats(request: web.Request) -> web.Response:
        run = runs.get(request.query["run"], _Run())
        lat = run.latencies
        return web.json_response(
            {
                "delivered": len(run.ids),
                "answered_ok": run.ok,
                "answered_fail": run.failed,
                "first_at": run.first_at,
                "last_at": run.last_at,
                "p50_ms": percentile(lat, 0.50),
                "p99_ms": percentile(lat, 0.99),
                "max_ms": max(lat) if lat else None,
            }
        )

    async def set_control(request: web.Request) -> web.Response:
        body = await request.json()
        control["fail_rate"] = float(body.get("fail_rate", control["fail_rate"]))
        control["rng"] = random.Random(int(body.get("seed", 1)))
        control["delay"] = float(body.get("delay", control["delay"]))
        return web.json_response({"fail_rate": control["fail_rate"], "delay": control["delay"]})

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/stats", stats)
    app.router.add_post("/control", set_control)
    app.router.add_post("/{target}", deliver)
    return app


# -- load generator ------------------------------------------------------------------------------

MAX_IN_FLIGHT = 2000  # open loop: requests outstanding at once before sends are skipped


def load_command(
    url: str,
    templates: list[dict[str, Any]],
    run: str,
    *,
    concurrency: int = 64,
    duration: float | None = None,
    count: int | None = None,
    rate: int | None = None,
) -> list[str]:
    """The command line of one load-generator run (see :func:`run_load`)."""
    # The templates travel in a file: big events would overflow the command line. The load
    # generator removes it once read.
    fd, path = tempfile.mkstemp(prefix="eventbus-load-", suffix=".json")
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(templates))
    cmd = [sys.executable, __file__, "load", "--url", url, "--run", run]
    cmd += ["--templates", "@" + path, "--concurrency", str(concurrency)]
    for flag, value in (("--duration", duration), ("--count", count), ("--rate", rate)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


async def run_load(procs: Processes, cmd: list[str], bound: float = 600.0) -> dict[str, Any]:
    """Run the load generator to completion and return its report: ``{sent, accepted,
    rejected, errors, skipped, started_at, ended_at, ack_p50_ms, ack_p99_ms}`` (the ack
    figures: send to 202 answer, accepted requests only). Raises RuntimeError if it fails."""
    proc = procs.start("load", cmd, capture=True)
    try:
        out, _ = await asyncio.to_thread(proc.communicate, None, bound)
    finally:
        procs.stop(proc)
    if proc.returncode != 0 or not out:
        raise RuntimeError(f"load generator failed ({proc.returncode}); see its log")
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


class _Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.run: str = args.run
        templates: str = args.templates
        if templates.startswith("@"):
            file = Path(templates[1:])
            templates = file.read_text(encoding="utf-8")
            file.unlink()
        self.templates: list[dict[str, Any]] = orjson.loads(templates)
        self.seq = 0
        self.accepted = 0
        self.rejected = 0
        self.errors = 0
        self.skipped = 0
        self.ack_ms: list[float] = []

    def body(self) -> bytes:
        n = self.seq
        self.seq += 1
        event = dict(self.templates[n % len(self.templates)])
        event["id"] = f"{self.run}-{n}"
        event["data"] = {**event["data"], "run": self.run, "sent": time.time()}
        return orjson.dumps(event)

    async def post(self, http: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        try:
            async with http.post(
                self.url,
                data=self.body(),
                headers={"content-type": "application/cloudevents+json"},
            ) as resp:
                await resp.read()
                if resp.status == 202:
                    self.accepted += 1
                    self.ack_ms.append((time.perf_counter() - started) * 1000)
                else:
                    self.rejected += 1
        except (aiohttp.ClientError, TimeoutError):
            self.errors += 1


async def _load_main(args: argparse.Namespace) -> None:
    load = _Load(args)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=max(args.concurrency, 100))
    started = time.time()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        if args.rate:
            # Open loop: event i is due at started + i / rate, whether or not earlier ones
            # have been answered; past MAX_IN_FLIGHT outstanding requests a due send is skipped.
            total = int(args.rate * args.duration)
            tasks: set[asyncio.Task[None]] = set()
            for i in range(total):
                delay = started + i / args.rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= MAX_IN_FLIGHT:
                    load.skipped += 1
                    continue
                task = asyncio.create_task(load.post(http))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=60)
        else:
            end = started + args.duration if args.duration else float("inf")
            budget = args.count if args.count is not None else 10_000_000

            async def worker() -> None:
                while time.time() < end and load.seq < budget:
                    await load.post(http)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    report = {
        "sent": load.seq,
        "accepted": load.accepted,
        "rejected": load.rejected,
        "errors": load.errors,
        "skipped": load.skipped,
        "ack_p50_ms": percentile(load.ack_ms, 0.50),
        "ack_p99_ms": percentile(load.ack_ms, 0.99),
        "started_at": started,
        "ended_at": time.time(),
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("receiver", help="the function endpoint")
    rec.add_argument("--port", type=int, required=True)
    gen = sub.add_parser("load", help="the load generator")
    gen.add_argument("--url", required=True)
    gen.add_argument("--run", required=True)
    gen.add_argument("--templates", required=True, help="JSON list of CloudEvents to cycle")
    gen.add_argument("--concurrency", type=int, default=64)
    gen.add_argument("--duration", type=float)
    gen.add_argument("--count", type=int)
    gen.add_argument("--rate", type=int)
    args = parser.parse_args()
    if args.cmd == "load" and (args.duration is None) == (args.count is None):
        parser.error("load needs exactly one of --duration and --count")
    if args.cmd == "load" and args.rate and args.duration is None:
        parser.error("--rate needs --duration")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.cmd == "receiver":
        web.run_app(receiver_app(), host=HOST, port=args.port, access_log=None, print=None)
    else:
        asyncio.run(_load_main(args))


if __name__ == "__main__":
    _main()
