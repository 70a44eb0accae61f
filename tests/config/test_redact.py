"""URLs are reported with their passwords masked (bus, database, broker URLs in logs)."""

from __future__ import annotations

import pytest

from eventbus.config import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://eventbus:s3cret@127.0.0.1:4222", "nats://eventbus:***@127.0.0.1:4222"),
        (
            "postgresql://postgres:p%40ss@/db?host=/tmp/x&port=5432",
            "postgresql://postgres:***@/db?host=/tmp/x&port=5432",
        ),
        ("nats://a:1@h1:4222,nats://b:2@h2:4222", "nats://a:***@h1:4222,nats://b:***@h2:4222"),
        ("amqp://guest:guest@localhost/", "amqp://guest:***@localhost/"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://s3cret-token@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        ("postgresql://postgres@/db?host=/tmp", "postgresql://postgres@/db?host=/tmp"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
