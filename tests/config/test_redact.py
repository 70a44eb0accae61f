"""URLs are reported with their passwords masked (bus, database, broker URLs in logs)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from eventbus._errors import ConfigError
from eventbus.config import TargetSpec, connector_spec, redact_url
from eventbus.targets import build_target


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
        # a password with an unencoded "@" is masked whole, up to the host
        ("nats://u:p@ss@h:4222,nats://v:w@@h2", "nats://u:***@h:4222,nats://v:***@h2"),
        ("http://h/a@b", "http://h/a@b"),
        # libpq's query parameters (asyncpg takes them too)
        (
            "postgresql://u@h/db?password=s3cret&sslmode=require&sslpassword=k3y",
            "postgresql://u@h/db?password=***&sslmode=require&sslpassword=***",
        ),
        ("postgresql://u@h/db?PASSWORD=s3cret", "postgresql://u@h/db?PASSWORD=***"),
        # unencoded "/", "?", "," or a space in a password (it went into an error whole)
        (
            "postgresql://postgres:hunter@2:TopSecret/x@127.0.0.1:15433/postgres",
            "postgresql://postgres:***@127.0.0.1:15433/postgres",
        ),
        ("nats://alice:pa/ss@h", "nats://alice:***@h"),
        ("nats://alice:pa?ss@h", "nats://alice:***@h"),
        ("amqp://guest:gu,est@h/", "amqp://guest:***@h/"),
        ("nats://alice:a b@h", "nats://alice:***@h"),
        ("http://h:8080/a@b", "http://h:8080/a@b"),
        ("nats://h1:4222,h2:4222", "nats://h1:4222,h2:4222"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("spec", "password"),
    [
        ({"type": "nats", "url": "nats://alice:hunter2pw@h:99999", "subject": "s"}, "hunter2pw"),
        ({"type": "nats", "url": "ftp://alice:hunter2pw@h:1", "subject": "s"}, "hunter2pw"),
        ({"type": "http", "url": "http://bob:hunter3pw@h:99999/x"}, "hunter3pw"),
    ],
)
def test_a_target_url_refused_is_shown_without_its_password(
    spec: dict[str, Any], password: str
) -> None:
    spec = dict(spec)
    kind = spec.pop("type")
    validated = connector_spec("target", kind).model_validate({"name": "t", **spec})
    with pytest.raises(ConfigError, match=r"url") as info:
        build_target(cast(TargetSpec, validated))
    assert password not in str(info.value)
    assert ":***@" in str(info.value)
