"""The ``eventbus`` command line against a running service: publish, events show, dlq
list/show/replay/purge, sources; and clear one-line errors instead of tracebacks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fixtures.receiver import Receiver
from tests.fixtures.service import StartService, free_port
from tests.fixtures.wait import eventually

RULES = """
- name: all
  targets: [fn]
"""


async def _cli(*args: str) -> tuple[int, Any, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventbus",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    try:
        parsed = orjson.loads(text) if text.strip() else None
    except orjson.JSONDecodeError:
        parsed = text
    return int(proc.returncode or 0), parsed, err.decode()


@pytest.mark.slow
async def test_cli_round_trip(eventbus: StartService, receiver: Receiver) -> None:
    receiver.respond(503)
    policy = {
        "retry": {"strategy": "fixed", "initial_delay": "50ms", "max_attempts": 2},
        "circuit_breaker": False,
    }
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn"), "delivery": policy}],
    )
    url = ("--url", svc.url)

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

    code, out, _ = await _cli("dlq", "show", str(dl_id), *url)
    assert code == 0 and out["event"]["id"] == event_id and len(out["history"]) == 2

    await svc.service.store.audit.flush()
    code, out, _ = await _cli("events", "show", "cli", event_id, *url)
    assert code == 0 and out["event"]["data"] == {"n": 1}
    assert [a["outcome"] for a in out["attempts"]] == ["retry-scheduled", "dead-lettered"]

    receiver.respond(204)
    code, out, _ = await _cli("dlq", "replay", str(dl_id), *url)
    assert code == 0 and len(out["replayed"]) == 1
    await receiver.wait_for(3)
    assert receiver.requests[-1].status == 204

    code, out, err = await _cli("dlq", "replay", "424242", *url)
    assert code == 1 and err.startswith("eventbus: 404") and "Traceback" not in err
    code, out, err = await _cli("dlq", "purge", *url)
    assert code == 1 and "filter" in err
    code, out, _ = await _cli("dlq", "purge", "--all", *url)
    assert code == 0 and out == {"purged": 0}
    code, out, _ = await _cli("sources", *url)
    assert code == 0 and out == {"sources": []}


async def test_cli_errors_are_one_line() -> None:
    code, _, err = await _cli("dlq", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert (
        code == 1 and err.startswith("eventbus: cannot reach eventbus") and "Traceback" not in err
    )
    code, _, err = await _cli(
        "publish", "--type", "t", "--source", "s", "--data", "{bad", "--url", "http://127.0.0.1:1"
    )
    assert code == 2 and "--data is not valid JSON" in err
    code, _, err = await _cli("serve", "--config", "/nonexistent.yaml")
    assert code == 1 and "cannot read settings" in err and "Traceback" not in err


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
    code, _, err = await _cli("serve", "--config", str(cfg))
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
    )
    code, out, err = await _cli(
        "rules", "validate", str(tmp_path / "rules"), "--connectors", str(tmp_path / "connectors")
    )
    text = str(out) + err
    assert code == 1, text
    assert "r.yaml:4 rule 'over': targets.0.delivery: retry.max_attempts" in text
    assert "r.yaml:8 rule 'extra': targets.0.delivery: bogus" in text
