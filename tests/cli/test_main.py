"""The ``eventbus`` command line against a running service: publish (every option), events
show, dlq list/show/replay/purge, retries list, sources, rules reload, as tables and as
``--json``; help on every option; display; and clear one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest

from eventbus.cli._main import build_parser
from eventbus.http import _schemas as schemas
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import RunningService, StartService, free_port
from tests.fixtures.wait import eventually

T = TypeVar("T")

RULES = """
- name: all
  targets: [fn]
"""


async def _cli(*args: str, stdin: bytes | None = None) -> tuple[int, Any, str]:
    """Run ``python -m eventbus ARGS``: the exit code, stdout (parsed when it is JSON, else
    the text) and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventbus",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    text = out.decode()
    try:
        parsed = orjson.loads(text) if text.strip() else None
    except orjson.JSONDecodeError:
        parsed = text
    return int(proc.returncode or 0), parsed, err.decode()


async def _dead_lettering(
    eventbus: StartService, receiver: Receiver, attempts: int
) -> RunningService:
    """A service whose one rule sends every event to target ``fn`` at ``receiver``, which
    answers 503: each event is a dead letter after ``attempts`` attempts 50 ms apart."""
    receiver.respond(503)
    policy = {
        "retry": {"strategy": "fixed", "initial_delay": "50ms", "max_attempts": attempts},
        "circuit_breaker": False,
    }
    return await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn"), "delivery": policy}],
    )


async def _side_by_side(*runs: Awaitable[T]) -> list[T]:
    """Await independent ``_cli`` runs two at a time, in order: each is mostly an interpreter
    starting, so two keep both cores busy where one at a time leaves one idle."""
    slots = asyncio.Semaphore(2)

    async def one(run: Awaitable[T]) -> T:
        async with slots:
            return await run

    return await asyncio.gather(*(one(run) for run in runs))


@pytest.mark.slow
async def test_dlq_count_then_a_replay_and_a_purge_of_exactly_those(
    eventbus: StartService, receiver: Receiver
) -> None:
    # The command line had no way to act on what a count found: a purge by filter took
    # those dead-lettered after the count too (the console's confirmation could; scripts not)
    svc = await _dead_lettering(eventbus, receiver, attempts=1)
    url, plain = ("--url", svc.url, "--json"), ("--url", svc.url)

    async def dead_letters(n: int) -> bool:
        code, out, _ = await _cli("dlq", "count", "--target", "fn", *url)
        return code == 0 and out["count"] == n

    for i in range(2):
        await _cli("publish", "--type", "t", "--source", "cli", "--id", f"c-{i}", *url)
    await eventually(lambda: dead_letters(2), every=0.2, what="two dead letters")
    (code, counted, err), (_, text, _) = await _side_by_side(
        _cli("dlq", "count", "--target", "fn", "--since", "1h", *url),
        _cli("dlq", "count", "--target", "fn", *plain),
    )
    assert code == 0 and counted["count"] == 2 and counted["since"], (counted, err)
    last = str(counted["last_id"])
    assert text.splitlines() == [
        f"2 dead letters, the newest written {counted['newest']}",
        f"to replay or purge exactly these, give the same filters and --through {last} --expect 2",
    ], text
    # one more, after the count: not among those confirmed
    await _cli("publish", "--type", "t", "--source", "cli", "--id", "c-late", *url)
    await eventually(lambda: dead_letters(3), every=0.2, what="the third dead letter")
    selected = ("--target", "fn", "--since", counted["since"], "--through", last)
    (code, _, refused), (listed_code, listed, _) = await _side_by_side(
        _cli("dlq", "purge", *selected, "--expect", "3", *plain),
        _cli("dlq", "list", "--through", last, *url),
    )
    assert code == 1 and "2 dead letters match now, not the 3 confirmed" in refused, refused
    assert listed_code == 0 and len(listed["items"]) == 2, listed
    code, out, err = await _cli("dlq", "purge", *selected, "--expect", "2", *url)
    assert (code, out) == (0, {"purged": 2}), err
    code, out, err = await _cli("dlq", "count", "--target", "fn", *url)
    assert out["count"] == 1 and out["last_id"] > int(last), (out, err)  # the late one
    # one id with --expect goes by the filter, which checks the number
    late = str(out["last_id"])
    receiver.respond(204)
    code, _, refused = await _cli("dlq", "replay", late, "--expect", "2", *plain)
    assert code == 1 and "1 dead letter matches now, not the 2" in refused, refused
    # an id not there, by the filter: said, and the exit status says so (it was 0)
    code, text, err = await _cli("dlq", "purge", "424242", "--expect", "0", *plain)
    assert (code, text) == (1, "purged 0 dead letters\n"), err
    assert err == "eventbus: 1 of the 1 ids given had no dead letter\n", err
    code, out, err = await _cli("dlq", "replay", late, "--expect", "1", *url)
    assert code == 0 and [r["id"] for r in out["replayed"]] == [int(late)], (out, err)
    code, text, _ = await _cli("dlq", "count", "--target", "fn", *plain)
    assert (code, text) == (0, "no dead letters match\n")


@pytest.mark.slow
async def test_cli_round_trip(eventbus: StartService, receiver: Receiver) -> None:
    svc = await _dead_lettering(eventbus, receiver, attempts=2)
    url = ("--url", svc.url, "--json")

    code, out, err = await _cli(
        "publish", "--type", "t", "--source", "cli", "--data", '{"n": 1}', *url
    )
    assert code == 0, err
    event_id = out["id"]

    async def listed() -> tuple[int, Any, str] | None:
        code, out, err = await _cli("dlq", "list", "--target", "fn", *url)
        return (code, out, err) if out and out["items"] else None

    code, out, err = await eventually(listed, every=0.2, what="the dead letter in `dlq list`")
    assert code == 0 and len(out["items"]) == 1, (out, err)
    dl_id = out["items"][0]["id"]

    await svc.service.store.audit.flush()
    shown, trail = await _side_by_side(
        _cli("dlq", "show", str(dl_id), *url), _cli("events", "show", "cli", event_id, *url)
    )
    code, out, _ = shown
    assert code == 0 and out["event"]["id"] == event_id and len(out["history"]) == 2
    code, out, _ = trail
    assert code == 0 and out["event"]["data"] == {"n": 1}
    assert [a["outcome"] for a in out["attempts"]] == ["retry-scheduled", "dead-lettered"]

    receiver.respond(204)
    code, out, _ = await _cli("dlq", "replay", str(dl_id), *url)
    assert code == 0 and len(out["replayed"]) == 1
    await receiver.wait_for(3)
    assert receiver.requests[-1].status == 204

    # no dead letter is left (replayed above): none of these changes what another sees
    unknown, several, unfiltered, purged, sources, replayed = await _side_by_side(
        _cli("dlq", "replay", "424242", *url),
        _cli("dlq", "replay", str(dl_id), "424242", *url),  # several ids: by the filter
        _cli("dlq", "purge", *url),
        _cli("dlq", "purge", "--all", *url),
        _cli("sources", *url),
        _cli("dlq", "replay", "--all", *url),
    )
    code, out, err = unknown
    assert code == 1 and err.startswith("eventbus: 404") and "Traceback" not in err
    code, out, err = several  # "replayed 0 dead letters", exit 0, for ids not there
    assert code == 1 and out["count"] == 0, (out, err)
    assert err == f"eventbus: no dead letter with id {dl_id}, 424242: not replayed\n", err
    code, out, err = unfiltered
    assert code == 2 and "filters, or --all for every one" in err, err
    code, out, _ = purged
    assert code == 0 and out == {"purged": 0}
    code, out, _ = sources
    assert code == 0 and out == {"sources": []}
    code, out, _ = replayed
    assert code == 0 and out == {"replayed": [], "count": 0, "truncated": False, "notes": []}

    # the same answers as tables, for people
    receiver.respond(503)
    await _cli("publish", "--type", "t", "--source", "cli", "--id", "e-2", *url)
    code, out, err = await eventually(listed, every=0.2, what="the second dead letter")
    plain = ("--url", svc.url)
    await svc.service.store.audit.flush()
    second = str(out["items"][0]["id"])
    listing, shown, trail, events, page, typed = await _side_by_side(  # reads only
        _cli("dlq", "list", "--id", second, "--id", "424242", *plain),  # ids, as documented
        _cli("dlq", "show", second, *plain),
        _cli("events", "show", "cli", "e-2", *plain),
        _cli("events", "list", "--source", "cli", *plain),
        _cli("events", "list", "--source", "cli", "--limit", "1", *url),
        _cli("events", "list", "--type", "nope", *plain),
    )
    code, text, err = events  # newest first
    assert code == 0, err
    header, *rows = text.splitlines()
    assert header.split() == ["RECEIVED", "SOURCE", "ID", "TYPE", "SUBJECT", "VIA", "BYTES"]
    assert [row.split()[1:4] for row in rows] == [["cli", "e-2", "t"], ["cli", event_id, "t"]]
    code, out, err = page
    assert code == 0 and [e["id"] for e in out["items"]] == ["e-2"], (out, err)
    code, out, err = await _cli("events", "list", "--after", out["next_after"], *url)
    assert code == 0 and [e["id"] for e in out["items"]] == [event_id] and not out["next_after"]
    assert typed[:2] == (0, "no events\n"), typed
    code, _, err = await _cli("events", "list", "--since", "yesterday", *plain)
    assert code == 1 and "since" in err and "Traceback" not in err, err
    recent, older = await _side_by_side(  # a duration: that long ago
        _cli("dlq", "list", "--since", "1h", *url), _cli("dlq", "list", "--until", "1h", *url)
    )
    assert recent[0] == 0 and [str(d["id"]) for d in recent[1]["items"]] == [second], recent
    assert older[0] == 0 and older[1]["items"] == [], older
    # shown as soon as it is recorded, a moment after its 202 (a show right after the
    # publish answered 404 once, on a cold first event)
    showing = asyncio.create_task(_cli("events", "show", "cli", "late-1", *url))
    await asyncio.sleep(0.5)
    code, _, err = await _cli("publish", "--type", "t", "--source", "cli", "--id", "late-1", *url)
    assert code == 0, err
    code, out, err = await showing
    assert code == 0 and out["event"]["id"] == "late-1", (out, err)
    code, text, _ = listing
    header, row = text.splitlines()
    assert header.split() == [
        *("ID", "CREATED", "RULE", "TARGET", "ATTEMPTS", "STATUS", "REASON", "EVENT", "ERROR")
    ]
    assert row.split()[2:7] == ["all", "fn", "2", "503", "attempts-exhausted"]
    assert "cli e-2" in row
    code, text, _ = shown
    assert code == 0 and "reason" in text and "attempts-exhausted" in text
    assert text.count(" 503 ") >= 2, text  # a row per attempt
    code, text, _ = trail
    assert code == 0 and "matched 1 route" in text and "2 attempts" in text
    assert "retry-scheduled" in text and "dead-lettered" in text
    purged, sources, set_aside, one_source, misplaced = await _side_by_side(
        _cli("dlq", "purge", second, "424242", *plain),  # several ids: those that exist
        _cli("sources", *plain),
        _cli("sources", "--dead-letters", *plain),
        _cli("sources", "--dead-letters", "--source", "tick", "--limit", "5", *url),
        _cli("sources", "--source", "tick", *plain),
    )
    code, out, err = one_source
    assert (code, out) == (0, {"items": []}), err
    code, _, err = misplaced
    assert (code, err) == (2, "eventbus: --source and --limit go with --dead-letters\n"), err
    code, text, err = purged
    assert (code, text) == (1, "purged 1 dead letter\n"), err
    assert err == "eventbus: 1 of the 2 ids given had no dead letter\n", err
    code, text, _ = sources
    assert (code, text) == (0, "no sources running\n")
    code, text, _ = set_aside
    assert (code, text) == (0, "no source dead letters\n")


async def test_the_settings_files_warnings_are_logged_in_its_log_format(tmp_path: Path) -> None:
    # Logged while the settings were read, before logging was set up by them: Python's
    # last-resort handler wrote the literal secret's warning as plain text, the first line of
    # a stream that log_format: json promises to be JSON lines.
    (tmp_path / "a-file").write_text("x")
    settings = tmp_path / "s.yaml"
    settings.write_text(
        f"data_dir: {tmp_path / 'a-file'}\nlog_format: json\nlisten: {{port: {free_port()}}}\n"
        "api_keys:\n  - {name: a, key: abcdefghijklmnop1234}\n"
    )
    code, _, err = await _cli("serve", "--config", str(settings))
    assert code == 1, err
    first, *_ = err.splitlines()
    line = orjson.loads(first)
    assert line["level"] == "warning", line
    assert line["message"].endswith(
        "s.yaml:5: api_keys.0.key: a secret given as a literal; use {env: NAME} or {file: PATH}"
    ), line


async def test_cli_errors_are_one_line() -> None:
    unreachable, bad_data, no_config = await _side_by_side(
        _cli("dlq", "list", "--url", f"http://127.0.0.1:{free_port()}"),
        _cli(
            *("publish", "--type", "t", "--source", "s", "--data", "{bad"),
            *("--url", "http://127.0.0.1:1"),
        ),
        _cli("serve", "--config", "/nonexistent.yaml"),
    )
    code, _, err = unreachable
    assert (
        code == 1 and err.startswith("eventbus: cannot reach eventbus") and "Traceback" not in err
    )
    code, _, err = bad_data
    assert code == 2 and "--data is not valid JSON" in err
    code, _, err = no_config
    assert code == 1 and "cannot read settings" in err and "Traceback" not in err


async def test_bad_values_files_and_pipes_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"log_format: caf\xe9\n")
    connectors_dir = tmp_path / "connectors"
    connectors_dir.mkdir()
    (connectors_dir / "c.yaml").write_bytes(b"targets: [\xff]\n")
    (connectors_dir / "gone.yaml").symlink_to(tmp_path / "nowhere")
    (tmp_path / "rules").mkdir()
    (tmp_path / "a-file").write_text("x")
    settings = tmp_path / "s.yaml"
    settings.write_text(f"data_dir: {tmp_path / 'a-file'}\nlisten: {{port: {free_port()}}}\n")
    url, schemeless, hostless, port, latin1, connectors, data_dir, rate = await _side_by_side(
        _cli("sources", "--url", "foo"),
        _cli("sources", "--url", "127.0.0.1:1"),
        _cli("sources", "--url", "http:127.0.0.1:1"),
        _cli("serve", "--port", "70000"),
        _cli("serve", "--config", str(tmp_path / "latin1.yaml")),
        _cli("rules", "validate", str(tmp_path / "rules"), "--connectors", str(connectors_dir)),
        _cli("serve", "--config", str(settings)),
        _cli("display", "--fail-rate", "1.5"),
    )
    assert rate[0] == 2 and "--fail-rate: must be from 0 to 1, got 1.5" in rate[2], rate
    assert url[0] == 2 and "invalid --url 'foo'" in url[2], url
    # read as the scheme "127.0.0.1": "cannot reach eventbus ... unknown url type", exit 1
    assert schemeless[0] == 2 and "give http://HOST:PORT" in schemeless[2], schemeless
    assert hostless[0] == 2 and "give http://HOST:PORT" in hostless[2], hostless
    assert port[0] == 2 and "must be from 1 to 65535, got 70000" in port[2], port
    assert latin1[0] == 1 and "cannot read settings: not UTF-8 text" in latin1[2], latin1
    assert connectors[0] == 1, connectors
    assert "c.yaml: cannot read connectors: not UTF-8 text" in connectors[2], connectors
    assert "gone.yaml: cannot read connectors: No such file or directory" in connectors[2]
    assert data_dir[0] == 1 and "cannot be used: File exists" in data_dir[2], data_dir
    for _, out, err in (url, port, latin1, connectors, data_dir, rate):
        assert "Traceback" not in f"{out}{err}"
    # credentials in the URL: printed in a "Name or service not known" error (a CI job's log)
    for given in (
        "http://u:SEKRET-pw@127.0.0.1:1",
        "http://127.0.0.1:1/?token=SEKRET",
        "s://u:SEKRET@h",
    ):
        code, _, err = await _cli("targets", "--url", given)
        assert code == 2 and "SEKRET" not in err and "Traceback" not in err, (given, err)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        held = str(taken.getsockname()[1])
        code, _, err = await _cli("display", "--port", held)
    assert code == 1 and f"cannot listen on 127.0.0.1:{held}" in err and "Traceback" not in err
    # a reader that is gone: no traceback, the status of a process SIGPIPE ended
    read, write = os.pipe()
    os.close(read)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "eventbus", "rules", "validate", str(tmp_path / "rules")),
        stdout=write,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 141 and b"Traceback" not in err, err


async def test_serve_refuses_a_rules_or_connectors_path_it_was_given_that_does_not_exist(
    tmp_path: Path,
) -> None:
    # a typo in EVENTBUS_RULES (or the settings' rules:) started a service routing nothing,
    # with one warning line; `rules validate` refused the same path. One in connectors: ran
    # with no target and no source, without a word.
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(
        f"rules: {tmp_path / 'rulez'}\nconnectors: {tmp_path / 'connectorz'}\n"
        f"data_dir: {tmp_path / 'data'}\n"
    )
    code, _, err = await _cli("serve", "--config", str(cfg), "--port", str(free_port()))
    assert code == 1 and "Traceback" not in err
    assert f"eventbus: connectors: no such file or directory: {tmp_path / 'connectorz'}" in err
    assert f"rules: no such file or directory: {tmp_path / 'rulez'}" in err, err
    assert not (tmp_path / "data").exists()  # nothing was started


async def test_serve_names_the_connectors_and_the_rules_problems_at_once(tmp_path: Path) -> None:
    # a typo in a connector, then one in a delivery block, then one in a rule: three runs
    (tmp_path / "rules").mkdir()
    (tmp_path / "connectors").mkdir()
    (tmp_path / "connectors" / "t.yaml").write_text(
        "targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:1/', timout: 3}\n"
    )
    (tmp_path / "rules" / "r.yaml").write_text("- name: r\n  mtach: {}\n  targets: [fn]\n")
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(
        f"rules: {tmp_path / 'rules'}\nconnectors: {tmp_path / 'connectors'}\n"
        f"data_dir: {tmp_path / 'data'}\n"
    )
    code, _, err = await _cli("serve", "--config", str(cfg), "--port", str(free_port()))
    assert code == 1 and "Traceback" not in err, err
    assert "t.yaml:2: targets.0.timout" in err and "r.yaml:2 rule 'r': mtach" in err, err
    assert not (tmp_path / "data").exists()  # nothing was started


async def test_serve_refuses_bad_rules_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "connectors").mkdir()
    (tmp_path / "connectors" / "t.yaml").write_text(
        "targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:1/'}\n"
    )
    (tmp_path / "rules" / "r.yaml").write_text(
        "- name: ok\n  targets: [fn]\n"
        "- name: bad-cel\n  when: 'event.data.x >'\n  targets: [fn]\n"
        "- name: bad-target\n  targets: [nope]\n"
    )
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(
        f"rules: {tmp_path / 'rules'}\nconnectors: {tmp_path / 'connectors'}\n"
        f"data_dir: {tmp_path / 'data'}\n"
    )
    code, _, err = await _cli("serve", "--config", str(cfg), "--port", str(free_port()))
    assert code == 1 and "Traceback" not in err
    assert "r.yaml:4" in err and "bad-cel" in err
    assert "r.yaml:7" in err and "nope" in err
    assert not (tmp_path / "data").exists()  # nothing was started


async def test_bad_delivery_override_in_a_rule_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "connectors").mkdir()
    (tmp_path / "connectors" / "t.yaml").write_text(
        "targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:1/'}\n"
    )
    (tmp_path / "rules" / "r.yaml").write_text(
        "- name: over\n"
        "  targets:\n"
        "    - name: fn\n"
        "      delivery: {retry: {max_attempts: 0}}\n"
        "- name: extra\n"
        "  targets:\n"
        "    - name: fn\n"
        "      delivery: {bogus: 1}\n"
        "- name: guard\n"  # parsed, then ignored: the target's guard stood
        "  targets:\n"
        "    - name: fn\n"
        "      delivery: {rate_limit: 1, retry: none}\n"
    )
    code, out, err = await _cli(
        "rules", "validate", str(tmp_path / "rules"), "--connectors", str(tmp_path / "connectors")
    )
    text = str(out) + err
    assert code == 1, text
    assert "r.yaml:4 rule 'over': targets.0.delivery: retry.max_attempts" in text
    assert "r.yaml:8 rule 'extra': targets.0.delivery: bogus" in text
    assert "rule 'guard'" not in text  # ignored, with a warning: it had been documented


def _every_parser(
    parser: argparse.ArgumentParser, name: str = "eventbus"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _every_parser(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_has_help_with_its_default() -> None:
    parsers = _every_parser(build_parser())
    assert {"eventbus retries list", "eventbus rules reload", "eventbus publish"} <= {
        name for name, _ in parsers
    }
    for name, parser in parsers:
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                assert action.dest == "reuse_port", (name, action.dest)  # internal to --workers
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, []):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action)
    publish = dict(parsers)["eventbus publish"].format_help()
    assert "(default: structured)" in publish and "(default: a new UUID)" in publish


async def test_publish_refuses_bad_input_with_a_clear_message(tmp_path: Path) -> None:
    nowhere = ("--url", f"http://127.0.0.1:{free_port()}")  # refused before anything is sent
    base = ("publish", "--type", "t", "--source", "s", *nowhere)
    (tmp_path / "bad.json").write_text('{"a": ')
    cases = [
        (["-e", "Tenant=a"], "extension attribute name 'Tenant' is invalid"),
        (["-e", "ten-ant=a"], "lowercase letters a-z and digits 0-9"),
        (["-e", "tenant"], "'tenant' is not NAME=VALUE"),
        (["-e", "tenant=a\tb"], "attribute 'tenant'"),
        (["-e", "id=x"], "'id' is a CloudEvents attribute, not an extension: use --id"),
        (["-e", "dataschema=x"], "'dataschema' is a CloudEvents attribute"),
        (["-e", "a=1", "-e", "a=2"], "extension 'a' is given twice"),
        (["--time", "yesterday"], "attribute 'time' must be an RFC 3339 timestamp"),
        (["--datacontenttype", "json"], "datacontenttype"),
        (["--mode", "batch"], "argument --mode: invalid choice: 'batch'"),
        (["--data", "@" + str(tmp_path / "bad.json")], f"--data @{tmp_path}/bad.json is not valid"),
        (["--data", "@" + str(tmp_path / "none.json")], "cannot read"),
        (["--data", "{bad"], "--data is not valid JSON"),
        # read as JSON by the service: sent rounded (1.2345678901234568e+29) and accepted
        (["--data", '{"n": 123456789012345678901234567890}'], "--data: the integer"),
        (["--api-key", "ключ-0123456789abcdef"], "an HTTP header cannot carry (not ASCII)"),
    ]
    answers = await _side_by_side(
        *(_cli(*base, *extra) for extra, _ in cases),
        _cli(*base, "--data", "-", stdin=b"[1,"),
    )
    for (extra, message), (code, _, err) in zip(cases, answers, strict=False):
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    code, _, err = answers[-1]
    assert code == 2 and "--data - (standard input) is not valid JSON" in err, err


async def test_publish_sets_every_attribute_in_either_mode(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    svc = await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    payload = tmp_path / "order.json"
    payload.write_text('{"order": "o-1", "total": 12.5}')
    common = ("--type", "com.example.t", "--source", "shop/cli", "--url", svc.url)
    # a body far over max_event_size: the service answers 413 and closes while it is sent
    (tmp_path / "big.json").write_text('{"x": "%s"}' % ("a" * 8_000_000))
    code, _, err = await _cli("publish", *common, "--data", f"@{tmp_path / 'big.json'}")
    assert code == 1 and ("413" in err or "max_event_size" in err), err
    assert "cannot reach" not in err, err
    code, out, err = await _cli(
        "publish",
        *common,
        "--id",
        "p-1",
        "--time",
        "2026-01-31T12:00:00Z",
        "--subject",
        "orders/o-1",
        "-e",
        "tenant=acme",
        "-e",
        "partitionkey=o1",
        "--mode",
        "binary",
        "--data",
        f"@{payload}",
    )
    assert (code, out) == (0, "accepted shop/cli p-1\n"), err
    code, out, err = await _cli(
        "publish",
        *common,
        "--id",
        "p-2",
        "--datacontenttype",
        "text/plain",
        "--data",
        "-",
        "--json",
        stdin="grüße\n".encode(),
    )
    assert (code, out) == (0, {"id": "p-2", "source": "shop/cli", "duplicate": False}), err
    # the bus holds shop/cli p-1 already (JetStream's duplicate window): said so, exit 0
    code, out, err = await _cli("publish", *common, "--id", "p-1")
    assert (code, out) == (
        0,
        "duplicate shop/cli p-1: already on the bus, not delivered again\n",
    ), err
    first, second = sorted(
        (r.cloudevent or {} for r in await receiver.wait_for(2)), key=lambda e: e["id"]
    )
    assert {k: first[k] for k in ("id", "time", "subject", "tenant", "partitionkey")} == {
        "id": "p-1",
        "time": "2026-01-31T12:00:00Z",
        "subject": "orders/o-1",
        "tenant": "acme",
        "partitionkey": "o1",
    }
    assert first["data"] == {"order": "o-1", "total": 12.5}
    assert first["datacontenttype"] == "application/json"
    assert second["datacontenttype"] == "text/plain" and second["data"] == "grüße\n"
    assert "time" in second  # now, by default
    await svc.service.store.audit.flush()
    trail = await svc.trail("shop/cli", "p-1")
    assert trail["via"] == "http"


async def test_retries_list_shows_pending_retries(
    eventbus: StartService, receiver: Receiver
) -> None:
    receiver.respond(503)
    policy = {"retry": {"strategy": "fixed", "initial_delay": "1h", "max_attempts": 5}}
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn"), "delivery": policy}],
    )
    url = ("--url", svc.url)
    code, out, _ = await _cli("retries", "list", *url)
    assert (code, out) == (0, "no pending retries\n")
    for n in (1, 2):
        status, _ = await svc.post_event(
            {"specversion": "1.0", "id": f"r-{n}", "source": "tests/cli", "type": "t"}
        )
        assert status == 202
    await receiver.wait_for(2)
    await svc.drained()  # both retries are durably scheduled

    code, body, err = await _cli("retries", "list", "--json", *url)
    assert code == 0, err
    schemas.Retries.model_validate(body)  # the documented shape, nothing more
    assert body["total"] == 2
    assert sorted(i["event_id"] for i in body["items"]) == ["r-1", "r-2"]
    item = body["items"][0]
    assert (item["rule"], item["target"], item["attempts"], item["waiting_for"]) == (
        "all",
        "fn",
        1,
        "retry",
    )
    assert item["last_status"] == 503 and "503" in item["last_error"]
    assert item["due_at"] > item["first_attempt_at"]

    code, text, _ = await _cli("retries", "list", "--limit", "1", *url)
    header, row, more = text.splitlines()
    assert header.split() == [
        *("ID", "RULE", "TARGET", "ATTEMPT", "NEXT", "WAITING", "STATUS", "LAST", "ERROR")
    ]
    assert row.split()[1:4] == ["all", "fn", "1"] and "503" in row
    assert more == "1 of 2 pending retries shown (--limit)"
    code, text, _ = await _cli("retries", "list", "--target", "nope", *url)
    assert (code, text) == (0, "no pending retries\n")  # one target's only
    status, _, document = await svc.request("GET", "/openapi.json")
    assert document["paths"]["/retries"]["get"]["parameters"][0]["name"] == "limit"


async def test_rules_reload_prints_the_count_or_every_problem(
    eventbus: StartService, receiver: Receiver, tmp_path: Path
) -> None:
    svc = await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    rules = tmp_path / "rules" / "rules.yaml"
    rules.write_text(RULES + "- name: two\n  targets: [fn]\n")
    code, out, err = await _cli("rules", "reload", "--url", svc.url)
    fingerprint = (await svc.request("GET", "/rules"))[2]["fingerprint"]
    assert (code, out) == (0, f"2 rules loaded (fingerprint {fingerprint})\n"), err
    code, out, _ = await _cli("rules", "reload", "--url", svc.url, "--json")
    assert (code, out) == (0, {"rules": 2, "fingerprint": fingerprint, "notes": []})

    rules.write_text(RULES + "- name: bad\n  targets: [nope]\n- name: cel\n  when: 'x >'\n")
    code, out, err = await _cli("rules", "reload", "--url", svc.url)
    assert code == 1 and out is None and "Traceback" not in err
    assert err.startswith("eventbus: rules not reloaded, the running ones stay:\n")
    assert "rules.yaml:5 rule 'bad'" in err and "nope" in err, err
    assert "rules.yaml:7 rule 'cel': when: CEL syntax error" in err, err
    assert len(svc.service.current_rules()) == 2  # the previous set routes on
    # --json: the refusal's problem JSON on stdout, as every other command prints it (it
    # printed nothing there)
    code, out, err = await _cli("rules", "reload", "--url", svc.url, "--json")
    assert code == 1 and out["status"] == 400, (out, err)
    assert "rules.yaml:5 rule 'bad'" in out["detail"] and "nope" in out["detail"], out


async def test_display_prints_one_event_per_block() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventbus",
        "display",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    events = [
        {"specversion": "1.0", "id": f"d-{n}", "source": "s", "type": "t", "data": {"n": n}}
        for n in (1, 2, 3)
    ]
    try:
        async with aiohttp.ClientSession() as session:

            async def post(body: Any, content_type: str) -> bool:
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/fn",
                        data=orjson.dumps(body),
                        headers={"Content-Type": content_type},
                    ) as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(
                lambda: post(events[0], "application/cloudevents+json"),
                what="eventbus display answering",
            )
            assert proc.stderr is not None  # it says where it listens (it said nothing)
            said = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
            assert f"listening on http://127.0.0.1:{port}/" in said, said
            assert await post(events[1:], "application/cloudevents-batch+json")
        assert proc.stdout is not None
        lines: list[str] = []
        while sum(line.startswith("---") for line in lines) < 3 or lines[-1] != "}":
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 10)).decode().rstrip())
    finally:
        proc.terminate()
        await proc.wait()
    blocks = "\n".join(lines).split("--- ")[1:]
    heads = [block.split("\n", 1)[0] for block in blocks]
    assert heads == ["POST /fn", "POST /fn (1 of 2)", "POST /fn (2 of 2)"]
    shown = [orjson.loads(block.split("\n", 1)[1]) for block in blocks]
    assert shown == events  # each event on its own, not wrapped in a list


async def test_invoke_prints_the_answer_or_queues_the_call(
    eventbus: StartService, receiver: Receiver
) -> None:
    svc = await eventbus(
        rules="[]", targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    url = ("--url", svc.url)
    receiver.script(
        Response(200, headers={"Content-Type": "text/plain"}, body=b"resized"),
        Response(201, headers={"Content-Type": "application/json"}, body=b'{"n": 2}'),
        Response(422, headers={"Content-Type": "text/plain"}, body=b"width must be > 0"),
        Response(503, headers={"Content-Type": "application/json"}, body=b'{"busy": true}'),
        # a function's own 202 and problem+json are its answers too, not eventbus's
        Response(202, headers={"Content-Type": "application/json"}, body=b'{"job": 7}'),
        Response(
            409,
            headers={"Content-Type": "application/problem+json"},
            body=b'{"title": "out of stock"}',
        ),
        Response(302, headers={"Location": receiver.url("/elsewhere")}, body=b"moved"),
    )
    code, out, err = await _cli("invoke", "fn", "--data", '{"w": 10}', "--id", "i-1", *url)
    assert (code, out) == (0, "resized"), err
    assert err.startswith("fn answered 200 in ") and err.endswith(" ms\n"), err
    code, out, err = await _cli("invoke", "fn", "--json", *url)
    assert code == 0, err
    assert (out["status"], out["body"], out["content_type"]) == (201, {"n": 2}, "application/json")
    assert out["duration_ms"] > 0 and out["event"]["source"] == "eventbus/cli"
    # the function's own error answer as it came, status on stderr (it was an error line
    # without the body, and --json printed nothing)
    code, out, err = await _cli("invoke", "fn", "--data", '{"w": 0}', *url)
    assert (code, out) == (1, "width must be > 0"), err
    assert err.startswith("fn answered 422 in "), err
    code, out, err = await _cli("invoke", "fn", "--json", *url)
    assert code == 1 and (out["status"], out["body"]) == (503, {"busy": True}), (out, err)
    code, out, err = await _cli("invoke", "fn", *url)
    assert (code, out) == (0, {"job": 7}) and err.startswith("fn answered 202 in "), err
    code, out, err = await _cli("invoke", "fn", "--json", *url)
    assert code == 1 and out["body"] == {"title": "out of stock"}, (out, err)
    # a function's redirect is its answer: urllib followed it, with the API key
    code, out, err = await _cli("invoke", "fn", "--api-key", "k-secret", *url)
    assert (code, out) == (0, "moved") and err.startswith("fn answered 302 in "), (out, err)
    assert [r.path for r in receiver.requests].count("/elsewhere") == 0
    first, second, third, *_ = (r.cloudevent or {} for r in receiver.requests)
    assert (first["id"], first["type"], first["data"]) == ("i-1", "eventbus.invoke", {"w": 10})
    assert "data" not in second and third["data"] == {"w": 0}

    unknown, bad_data = await _side_by_side(  # neither reaches the function
        _cli("invoke", "nope", *url), _cli("invoke", "fn", "--data", "{bad", *url)
    )
    code, out, err = unknown
    assert code == 1 and "404" in err and "no target 'nope'" in err, err
    code, out, err = bad_data
    assert code == 2 and "--data is not valid JSON" in err, err

    code, out, err = await _cli(
        "invoke", "fn", "--async", "--id", "q-1", "--type", "com.example.q", *url
    )
    assert (code, out) == (0, "queued for fn: eventbus/cli q-1\n"), err
    (*_, queued) = await receiver.wait_for(8)
    assert queued.cloudevent is not None and queued.cloudevent["type"] == "com.example.q"
    trail = await svc.trail("eventbus/cli", "q-1", attempts=1)
    assert trail["via"] == "invoke:async:fn:remote=127.0.0.1"
    assert len(receiver.requests) == 8


async def test_a_service_that_does_not_answer_is_said_so_within_the_timeout() -> None:
    # every command waited up to 930 s (a synchronous invocation's bound) on a frozen service
    with socket.create_server(("127.0.0.1", 0)) as frozen:  # connects, never answers
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        code, _, err = await _cli("dlq", "list", "--url", url, "--timeout", "1")
    assert code == 1 and err == f"eventbus: eventbus at {url} did not answer within 1 s\n", err
    code, _, err = await _cli("dlq", "list", "--timeout", "0")
    assert code == 2 and "--timeout: must be seconds, more than 0 and at most 86400" in err, err


async def test_an_answer_that_is_not_eventbuss_is_said_so_not_a_traceback(
    receiver: Receiver,
) -> None:
    # --url at another server: orjson's and KeyError's tracebacks, or "fn answered 200 in nan ms"
    url = receiver.url("")
    for body, what in ((b"hello", "not JSON"), (b"{}", "no 'items'")):
        receiver.respond(Response(200, {"Content-Type": "application/json"}, body))
        code, _, err = await _cli("dlq", "list", "--url", url)
        assert code == 1 and "Traceback" not in err, err
        assert err == (
            f"eventbus: the answer from {url} is not eventbus's, or is an other version's "
            f"({what}): check --url, and that this CLI and the service are the same version\n"
        )
    code, out, err = await _cli("invoke", "fn", "--type", "t", "--source", "s", "--url", url)
    assert code == 1 and out is None and "Traceback" not in err, err
    assert "(no X-Eventbus-Answered-By header)" in err, err
    # a redirect (a proxy's, http to https) is not followed, and says where it went ("301
    # Moved Permanently:" alone, once the CLI stopped following them with the API key)
    receiver.respond(Response(301, {"Location": "https://u:pw@eventbus.test/"}, b""))
    code, _, err = await _cli("dlq", "list", "--url", url)
    assert (code, err) == (
        1,
        f"eventbus: {url} answered 301, sending the request to https://u:***@eventbus.test/: "
        "eventbus itself does not redirect (a proxy, http to https?); give --url (or "
        "EVENTBUS_URL) the address to use\n",
    )
    assert all(r.headers.get("Authorization") is None for r in receiver.requests)


async def test_answers_of_a_service_older_than_this_cli_are_read(receiver: Receiver) -> None:
    # After an upgrade, before the service restarts: a synchronous call answered without
    # X-Eventbus-Answered-By (older services did not send it) and a replay without "count"
    # were reported as "not eventbus's, check --url", exit 1, though the function had been
    # called and the dead letters replayed: run again, they ran twice.
    url = receiver.url("")
    old_answer = {"Content-Type": "application/json", "X-Eventbus-Duration-Ms": "4.2"}
    receiver.respond(Response(200, old_answer, b'{"done": true}'))
    code, out, err = await _cli("invoke", "fn", "--type", "t", "--source", "s", "--url", url)
    assert (code, out) == (0, {"done": True}), err
    replayed = {
        "replayed": [
            {"id": 3, "rule": "r", "target": "fn", "event_source": "s", "event_id": "e-3"}
        ],
        "truncated": False,
    }
    receiver.respond(Response(200, {"Content-Type": "application/json"}, orjson.dumps(replayed)))
    code, out, err = await _cli("dlq", "replay", "--target", "fn", "--url", url)
    assert code == 0 and out.startswith("replayed 1 dead letter\n"), (out, err)
    # eventbus's own problem (no duration measured) is still an error of eventbus's
    problem = {"Content-Type": "application/problem+json", "X-Eventbus-Duration-Ms": "1.0"}
    receiver.respond(Response(503, problem, b'{"title": "Service Unavailable", "detail": "down"}'))
    code, _, err = await _cli("invoke", "fn", "--type", "t", "--source", "s", "--url", url)
    assert code == 1 and err == "eventbus: 503 Service Unavailable: down\n", err


async def test_dead_letter_filters_are_checked_before_anything_is_sent() -> None:
    # a misspelt reason matched nothing and a purge by it said "purged 0"; an id with filters
    # dropped the filters (`purge 5 --target fnn` purged dead letter 5 of another target)
    nowhere = ("--url", f"http://127.0.0.1:{free_port()}")
    answers = await _side_by_side(
        _cli("dlq", "purge", "--reason", "unknwon", *nowhere),
        _cli("dlq", "purge", "5", "--target", "fnn", *nowhere),
        _cli("dlq", "replay", "5", "--all", *nowhere),
        _cli("dlq", "replay", *nowhere),
    )
    messages = [
        "argument --reason: invalid choice: 'unknwon'",
        "dlq purge: give dead letters' ids or filters (or --all), not both",
        "dlq replay: give dead letters' ids or filters (or --all), not both",
        "dlq replay: give dead letters' ids, filters, or --all for every one",
    ]
    for (code, _, err), message in zip(answers, messages, strict=True):
        assert code == 2 and message in err and "Traceback" not in err, err


async def test_publish_leaves_the_size_bound_to_the_service(tmp_path: Path) -> None:
    # the CLI refused 300 KB events by the default bound (256 KiB) that a service set to 1 MiB
    # took
    (tmp_path / "big.json").write_bytes(orjson.dumps({"blob": "x" * 300_000}))
    url = f"http://127.0.0.1:{free_port()}"
    for command in ("publish", "invoke"):
        target = ["fn"] if command == "invoke" else []
        code, _, err = await _cli(
            command, *target, "--type", "t", "--source", "s", "--data", f"@{tmp_path / 'big.json'}",
            "--url", url,
        )  # fmt: skip
        assert code == 1 and err.startswith(f"eventbus: cannot reach eventbus at {url}"), err


def test_the_reasons_the_cli_takes_are_the_delivery_layers() -> None:
    from eventbus.cli._main import REASONS
    from eventbus.delivery import DeadLetterReason

    assert tuple(reason.value for reason in DeadLetterReason) == REASONS


def test_the_header_the_cli_reads_is_the_one_the_edge_sends() -> None:
    # written twice: the CLI does not import the HTTP edge (FastAPI) to start
    from eventbus.cli._main import _ANSWERED_BY
    from eventbus.http._invoke import ANSWERED_BY_HEADER

    assert ANSWERED_BY_HEADER == _ANSWERED_BY


async def test_targets_lists_them_and_enables_one_a_410_switched_off(
    eventbus: StartService, receiver: Receiver
) -> None:
    # a disabled target was to be enabled with a raw POST /targets/NAME/enable
    svc = await eventbus(
        rules="- name: all\n  targets: [fn]\n",
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
    )
    url = ("--url", svc.url)
    receiver.script(410)
    status, _ = await svc.post_event({"specversion": "1.0", "id": "g1", "source": "s", "type": "t"})
    assert status == 202
    await svc.drained()
    code, out, err = await _cli("targets", *url)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["NAME", "TYPE", "CIRCUIT", "RETRIES", "DISABLED", "SINCE"]
    assert row.startswith("fn ") and "410 Gone" in row, row
    # the options before the action count too (a subcommand's defaults dropped them)
    code, out, err = await _cli("targets", *url, "enable", "fn")
    assert (code, out) == (0, "fn enabled: deliveries to it go out again\n"), err
    code, out, err = await _cli("targets", "--json", *url)
    assert code == 0 and out["targets"][0]["disabled"] is None, out
    # enabled again: nothing to do, and no failure (it was a 404 for a target that exists)
    code, out, err = await _cli("targets", "enable", "fn", *url)
    assert (code, out) == (0, "fn was not disabled: nothing changed\n"), err
    code, out, err = await _cli("targets", "enable", *url)
    assert code == 2 and "give `targets enable NAME`" in err, err
    # with --json a refusal is the service's problem JSON on stdout (it printed nothing); a
    # name no target has says so
    code, out, err = await _cli("targets", "enable", "nope", "--json", *url)
    assert code == 1 and out["status"] == 404, (out, err)
    assert out["detail"] == "no target named 'nope'", out
    code, out, err = await _cli("targets", "enable", "nope", *url)
    assert code == 1 and "no target named 'nope'" in err, err


def test_an_empty_eventbus_config_is_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # EVENTBUS_CONFIG= (a compose or systemd env file) was the path '.': "Is a directory"
    monkeypatch.setenv("EVENTBUS_CONFIG", "")
    assert build_parser().parse_args(["serve"]).config is None
    monkeypatch.setenv("EVENTBUS_CONFIG", "/etc/eventbus.yaml")
    assert build_parser().parse_args(["serve"]).config == "/etc/eventbus.yaml"


def test_a_url_that_cannot_be_split_is_a_usage_error_not_a_traceback() -> None:
    from tests.fuzz._checks import run_cli

    code, err = run_cli(["dlq", "list", "--url", "http://[::1:37080"])
    assert code == 2 and "invalid --url" in err and "Traceback" not in err, (code, err)


def test_the_commands_page_bound_is_the_apis() -> None:
    from eventbus.cli._main import MAX_PAGE
    from eventbus.http._params import _MAX_LIMIT

    assert MAX_PAGE == _MAX_LIMIT


def test_an_unusable_standard_stream_or_an_argument_not_text_is_one_line(tmp_path: Path) -> None:
    # A full disk or a closed stdout ended in a traceback; an argument of bytes that are not
    # UTF-8 gave a codec's error naming no option.
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text("- {name: r, targets: [t]}\n")
    eventbus = f"'{sys.executable}' -m eventbus"
    publish = "publish --type t --source s --data - --url http://127.0.0.1:9"

    def shell(line: str) -> tuple[int, str]:
        done = subprocess.run(["bash", "-c", line], capture_output=True, timeout=60, check=False)
        return done.returncode, done.stderr.decode()

    rules = tmp_path / "rules"
    assert shell(f"{eventbus} rules validate {rules} > /dev/full") == (
        1,
        "eventbus: No space left on device\n",
    )
    code, err = shell(f"{eventbus} rules validate {tmp_path / 'nothing'} >&-")
    assert code == 1 and "Traceback" not in err, err
    code, err = shell(f"{eventbus} {publish} <&-")
    assert code == 2 and "--data - (standard input) is not valid JSON" in err, err
    done = subprocess.run(
        [sys.executable, "-m", "eventbus", "dlq", "list", "--target", os.fsdecode(b"\xff")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.decode().startswith("eventbus: --target: not UTF-8 text"), done
