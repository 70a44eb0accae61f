"""The settings reach the connections: a whole service whose bus is a nats-server requiring a
token (read from a file), whose database takes only TLS with a password (read from a file,
verified against the test's CA) and whose ``kafka_ingest`` logs in with SCRAM to a broker that
refuses it. An event goes in and out; the ingest source backs off saying why."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.certs import Pki
from tests.fixtures.kafka import TansuBroker
from tests.fixtures.nats import configured_nats_server, unique_name
from tests.fixtures.postgres_tls import requires_system_postgres
from tests.fixtures.receiver import Receiver
from tests.fixtures.wait import eventually

pytestmark = requires_system_postgres

TOKEN = "bus-T0ken-from-a-file"
KAFKA_PASSWORD = "ingest-Passw0rd-scram"

RULES = """
- name: all
  match:
    type: [t]
  targets: [fn]
"""


@pytest.fixture
async def token_nats(tmp_path: Path) -> AsyncIterator[int]:
    config = f'jetstream {{ store_dir: "{{store}}" }}\nauthorization {{ token: "{TOKEN}" }}'
    async with configured_nats_server(tmp_path / "bus", config) as port:
        yield port


@pytest.fixture
def refusing_kafka(tansu_binary: str) -> Any:
    broker = TansuBroker(tansu_binary, extra_args=("--authentication",))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


async def test_bus_database_and_ingest_use_their_secrets(
    eventbus: Any,
    receiver: Receiver,
    token_nats: int,
    tls_postgres: tuple[str, str, Pki],
    refusing_kafka: str,
    tmp_path: Path,
) -> None:
    dsn, db_password, pki = tls_postgres
    (tmp_path / "bus-token").write_text(TOKEN + "\n")
    (tmp_path / "db-password").write_text(db_password + "\n")
    settings = {
        "bus": {
            "nats": {
                "url": f"nats://127.0.0.1:{token_nats}",
                "token": {"file": str(tmp_path / "bus-token")},
            }
        },
        "database": {
            "url": dsn,
            "password": {"file": str(tmp_path / "db-password")},
            "sslmode": "verify-full",
            "tls": {"ca": str(pki.ca)},
        },
        "kafka_ingest": {
            "bootstrap_servers": refusing_kafka,
            "topics": [unique_name("ingest")],
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "username": "eventbus",
            "password": KAFKA_PASSWORD,
        },
    }
    svc = await eventbus(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        settings=settings,
    )
    status, body = await svc.post_event(
        {"specversion": "1.0", "id": unique_name("e"), "source": "/s", "type": "t"}
    )
    assert status == 202, body
    await receiver.wait_for(1)

    async def ingest_refused() -> str | None:
        _, _, answer = await svc.request("GET", "/sources")
        (ingest,) = [s for s in answer["sources"] if s["name"] == "kafka-ingest"]
        error: str | None = ingest.get("last_error")
        return error

    error = await eventually(ingest_refused)
    assert error == "PermissionError: the broker refused the SASL credentials"
    _, _, answer = await svc.request("GET", "/sources")
    assert KAFKA_PASSWORD not in str(answer)
