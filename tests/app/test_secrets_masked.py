"""Secrets never leave eventbus: a whole service whose connections fail on wrong secrets (a NATS
target and source refused by a nats-server with a token, an HTTP target whose OAuth client is
refused by a real token endpoint, one with a credential among its static headers, a Kafka
target with a SASL password, a reload refused for a file whose bad target holds secrets), then the
logs, ``GET /targets``, ``GET /sources``, the dead letters, problem+json answers and ``eventbus
rules validate``'s output are searched for every secret value: none is there."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.fixtures.nats import configured_nats_server, unique_name
from tests.fixtures.wait import eventually

SERVER_TOKEN = "the-Right-t0ken-for-nats"
WRONG_TOKEN = "wr0ng-Token-of-target-77"
SOURCE_TOKEN = "wr0ng-Token-of-source-88"
CLIENT_SECRET = "oauth-Cl1ent-secret-99"
BASIC_PASSWORD = "bas1c-Passw0rd-55"
SIGNING = "whsec_c2lnbmluZy1zZWNyZXQtdmFsdWU="
HEADER_TOKEN = "head3r-T0ken-44"
KAFKA_PASSWORD = "k4fka-Passw0rd-66"
URL_PASSWORD = "url-Passw0rd-33"
SECRETS = (
    KAFKA_PASSWORD,
    URL_PASSWORD,
    SERVER_TOKEN,
    WRONG_TOKEN,
    SOURCE_TOKEN,
    CLIENT_SECRET,
    BASIC_PASSWORD,
    SIGNING,
    HEADER_TOKEN,
)

RULES = """
- name: all
  match:
    type: [t]
  targets: [out, fn]
"""


@pytest.fixture
async def nats_port(tmp_path: Path) -> AsyncIterator[int]:
    config = f'authorization {{ token: "{SERVER_TOKEN}" }}'
    async with configured_nats_server(tmp_path / "nats-token", config) as port:
        yield port


@pytest.fixture
async def token_url() -> AsyncIterator[str]:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "invalid_client"}, status=401)

    app = web.Application()
    app.router.add_post("/token", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/token"
    await runner.cleanup()


def _connectors(nats_port: int, token_url: str) -> dict[str, list[dict[str, Any]]]:
    url = f"nats://127.0.0.1:{nats_port}"
    return {
        "targets": [
            {"name": "out", "type": "nats", "url": url, "subject": "out.x", "token": WRONG_TOKEN},
            {
                "name": "fn",
                "type": "http",
                "url": "http://127.0.0.1:9/fn",
                "secret": SIGNING,
                "auth": {
                    "oauth2": {
                        "token_url": token_url,
                        "client_id": "eventbus",
                        "client_secret": CLIENT_SECRET,
                    }
                },
            },
            {
                "name": "basic",
                "type": "http",
                "url": "http://127.0.0.1:9/b",
                "auth": {"basic": {"username": "u", "password": BASIC_PASSWORD}},
                "headers": {"X-Api-Token": HEADER_TOKEN},
            },
            {
                "name": "stream",
                "type": "kafka",
                "bootstrap_servers": "127.0.0.1:9",
                "topic": "t",
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512",
                "username": "eventbus",
                "password": KAFKA_PASSWORD,
            },
        ],
        "sources": [
            {"name": "in", "type": "nats", "url": url, "subjects": ["in.>"], "token": SOURCE_TOKEN}
        ],
    }


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def test_no_secret_in_logs_api_answers_or_cli_output(
    eventbus: Any,
    nats_port: int,
    token_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    connectors = _connectors(nats_port, token_url)
    svc = await eventbus(rules=RULES, targets=connectors["targets"], sources=connectors["sources"])
    event = {"specversion": "1.0", "id": unique_name("e"), "source": "/s", "type": "t"}
    status, body = await svc.post_event(event)
    assert status == 202, body

    answers: dict[str, Any] = {}

    async def both_dead_lettered() -> bool:
        code, _, answers["dead"] = await svc.request("GET", "/dead-letters")
        text = orjson.dumps(answers["dead"]).decode()
        return code == 200 and "refused client" in text and "authorization" in text.lower()

    await eventually(both_dead_lettered)

    async def source_failed() -> bool:
        _, _, answers["sources"] = await svc.request("GET", "/sources")
        (source,) = answers["sources"]["sources"]
        return bool(source.get("last_error"))

    await eventually(source_failed)
    _, _, answers["targets"] = await svc.request("GET", "/targets")
    code, _, answers["problem"] = await svc.request(
        "POST", "/events", b"{not json", {"Content-Type": "application/cloudevents+json"}
    )
    assert code == 400
    code, _, answers["missing"] = await svc.request("GET", "/dead-letters/999999999")
    assert code == 404
    # A reload refused for a connector file whose bad entry holds secrets.
    (tmp_path / "connectors" / "bad.yaml").write_text(
        "targets:\n"
        f"  - {{name: bad, type: nats, url: 'nats://u:{URL_PASSWORD}@h:1', subject: s,"
        f" token: {URL_PASSWORD}, timeout: -1}}\n"
    )
    code, _, answers["reload"] = await svc.request("POST", "/rules/reload")
    (tmp_path / "connectors" / "bad.yaml").unlink()
    assert code == 400 and "bad.yaml:2" in answers["reload"]["detail"], answers["reload"]

    shown = orjson.dumps(answers).decode()
    assert "authorization violation" in shown.lower()  # the reasons are there ...
    assert _leaks(shown) == []  # ... the secrets are not
    assert _leaks(caplog.text) == [], "a secret reached the logs"

    # The CLI reads the same connector files (with the literal secrets: warned about, not shown).
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventbus",
        "rules",
        "validate",
        str(tmp_path / "rules"),
        "--connectors",
        str(tmp_path / "connectors"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    raw, _ = await asyncio.wait_for(cli.communicate(), 60)
    output = raw.decode()
    assert cli.returncode == 0, output
    assert "a secret given as a literal" in output
    assert _leaks(output) == []
