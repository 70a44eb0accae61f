"""Shared fixtures: each real server (NATS, Kafka/Tansu, PostgreSQL, a function endpoint) lives
in its own plugin module under ``tests/fixtures`` and is started once per session, on a free
loopback port, and stopped at the end."""

pytest_plugins = [
    "tests.fixtures.nats",
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.postgres_tls",
    "tests.fixtures.receiver",
    "tests.fixtures.service",
    "tests.fixtures.browser",
]
