"""Secrets: one shape ({env: NAME}, {file: PATH}, a literal) in settings and connector files,
never shown by str, repr or serialization; literals are accepted with a warning naming file,
line and field; bad references are refused with file, line and field."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import eventbus.sources  # noqa: F401  (registers the source and target types)
from eventbus._errors import ConfigError
from eventbus.config import Secret, load_connectors, load_settings

VALUE = "s3cr3t-Value-0x42"


def test_a_secret_reveals_its_value_only_when_asked() -> None:
    s = Secret(VALUE, "env PW")
    assert s.reveal() == VALUE
    assert VALUE not in str(s) and VALUE not in repr(s) and VALUE not in f"{s!s} {s!r}"
    assert "env PW" in repr(s)
    assert s == Secret(VALUE) and s != Secret("other")
    assert hash(s) == hash(Secret(VALUE)), "equal secrets hash alike, whatever their origin"


def test_settings_read_secrets_from_env_and_file_and_mask_them(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(VALUE + "\n")
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(
        "bus:\n"
        "  nats: {url: 'nats://h:4222', user: eb, password: {env: NATS_PW}}\n"
        f"database: {{url: 'postgresql://h/db', password: {{file: {secret_file}}}}}\n"
    )
    s = load_settings(cfg, env={"NATS_PW": VALUE + "-nats"})
    assert s.bus.nats.password is not None and s.database.password is not None
    assert s.bus.nats.password.reveal() == VALUE + "-nats"
    assert s.database.password.reveal() == VALUE  # the trailing newline is stripped
    assert s.database.password.origin == f"file {secret_file}"
    for shown in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
        assert VALUE not in shown
    assert s.model_dump()["database"]["password"] == "***"


def test_a_literal_secret_is_accepted_with_a_warning_naming_file_line_and_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "t.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: nats\n"
        "    url: nats://127.0.0.1:4222\n"
        "    subject: s\n"
        f"    token: {VALUE}\n"
    )
    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        c = load_connectors(tmp_path, env={})
    assert c.targets["fn"].token.reveal() == VALUE  # type: ignore[attr-defined]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"{tmp_path}/t.yaml:6: targets.0.token: a secret given as a literal (target 'fn'); "
        "use {env: NAME} or {file: PATH}"
    ]
    assert all(VALUE not in w for w in warnings)


def test_bad_secret_references_name_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "targets:\n"
        "  - {name: a, type: nats, url: 'nats://h:1', subject: s, token: {env: UNSET_TOKEN}}\n"
        "  - {name: b, type: nats, url: 'nats://h:1', subject: s, token: {file: /nope/tok}}\n"
        "  - {name: c, type: nats, url: 'nats://h:1', subject: s, token: 12345}\n"
        "  - {name: d, type: nats, url: 'nats://h:1', subject: s, token: {vault: x}}\n"
        "  - {name: e, type: nats, url: 'nats://h:1', subject: s, token: ''}\n"
        f"  - {{name: f, type: nats, url: 'nats://h:1', subject: s, token: {{file: {tmp_path}}}}}\n"
        "  - {name: g, type: nats, url: 'nats://h:1', subject: s, token: {env: U, default: ''}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={})
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "t.yaml:2: targets.0.token: Value error, environment variable UNSET_TOKEN is not set "
        "and no default is given (target 'a')",
        "t.yaml:3: targets.1.token: Value error, cannot read /nope/tok: No such file or "
        "directory (target 'b')",
        "t.yaml:4: targets.2.token: Value error, write a string, {env: NAME}, "
        "{env: NAME, default: VALUE} or {file: /path} (target 'c')",
        "t.yaml:5: targets.3.token: Value error, unknown key 'vault'; write a string, "
        "{env: NAME}, {env: NAME, default: VALUE} or {file: /path} (target 'd')",
        "t.yaml:6: targets.4.token: Value error, a secret must not be empty (target 'e')",
        f"t.yaml:7: targets.5.token: Value error, {tmp_path} is not a regular file (target 'f')",
        "t.yaml:8: targets.6.token: Value error, environment variable U is not set and its "
        "default is empty (target 'g')",
    ]


def test_a_bad_secret_in_settings_names_file_line_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("bus:\n  kafka:\n    password: {env: KAFKA_PW}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert str(info.value) == (
        f"{cfg}:3: bus.kafka.password: Value error, environment variable KAFKA_PW is not set "
        "and no default is given"
    )


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(f"database: {{password: {{file: {tmp_path / 'empty'}}}}}\n")
    with pytest.raises(ConfigError, match=r"eventbus.yaml:1: database.password: .* is empty"):
        load_settings(cfg, env={})


def test_a_secret_file_larger_than_64_kib_is_refused(tmp_path: Path) -> None:
    # read whole, a log file given by mistake grew until memory ran out
    (tmp_path / "big").write_bytes(b"k" * (64 * 1024 + 1))
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(f"database: {{password: {{file: {tmp_path / 'big'}}}}}\n")
    with pytest.raises(ConfigError, match=r"database.password: .* is larger than a secret"):
        load_settings(cfg, env={})


def test_a_secret_that_is_a_directory_leaves_no_descriptor_open(tmp_path: Path) -> None:
    # each refused load of it (a reload asked again and again) kept one open
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(f"database: {{password: {{file: {tmp_path}}}}}\n")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ConfigError, match=r"database\.password: .* is not a regular file"):
            load_settings(cfg, env={})
    assert len(os.listdir("/proc/self/fd")) - before < 5


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_secret_that_is_not_a_file_is_refused_without_waiting(tmp_path: Path, kind: str) -> None:
    # A FIFO with no writer held the start for ever, silent (the settings are read before
    # anything listens or logs); /dev/zero was read until 64 KiB.
    path = tmp_path / "pipe" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(path)
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(f"database: {{password: {{file: {path}}}}}\n")
    with pytest.raises(ConfigError, match=r"database.password: .* is not a regular file"):
        load_settings(cfg, env={})


def test_a_secret_from_an_eventbus_variable_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(f"database:\n  url: postgresql://db/x\n  password: {VALUE}\n")
    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        env = {
            "EVENTBUS_BUS__NATS__TOKEN": VALUE + "-t",
            # a list of keys too, as docs/configuration.md advises (it was warned about, with
            # the settings file's first line, which holds no api_keys)
            "EVENTBUS_API_KEYS": f'[{{name: ops, key: "{VALUE}-k", scopes: [admin]}}]',
        }
        s = load_settings(cfg, env=env)
    assert s.bus.nats.token is not None and s.bus.nats.token.reveal() == VALUE + "-t"
    assert [k.key.reveal() for k in s.api_keys] == [VALUE + "-k"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{cfg}:3: database.password: a secret given as a literal; "
        "use {env: NAME} or {file: PATH}"
    ]


def test_webhook_and_s3_secrets_take_the_same_shape_and_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every source's secrets are Secrets: references resolved from the loader's environment,
    literals warned about with file, line and field."""
    (tmp_path / "s.yaml").write_text(
        "sources:\n"
        "  - name: hook\n"
        "    type: webhook\n"
        f"    verify: {{kind: github, secret: {VALUE}}}\n"
        "    keys: [{env: HOOK_KEY}]\n"
        "  - name: bucket\n"
        "    type: s3-poll\n"
        "    bucket: b\n"
        "    access_key_id: AKIA\n"
        "    secret_access_key: {env: S3_SECRET, default: fallback-secret}\n"
    )
    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        c = load_connectors(tmp_path, env={"HOOK_KEY": VALUE + "-key"})
    hook, bucket = c.sources["hook"], c.sources["bucket"]
    assert [k.reveal() for k in hook.keys] == [VALUE + "-key"]  # type: ignore[attr-defined]
    assert bucket.secret_access_key.reveal() == "fallback-secret"  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/s.yaml:4: sources.0.verify.secret: a secret given as a literal "
        "(source 'hook'); use {env: NAME} or {file: PATH}"
    ]


@pytest.mark.parametrize("key", ["é" * 16, "a key with spaces!", "tab\tseparated-0123456"])
def test_keys_compared_with_a_header_are_printable_ascii(tmp_path: Path, key: str) -> None:
    # headers are read as Latin-1 bytes: a key with other characters was accepted at load and
    # could never match; spaces are trimmed by proxies
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("api_keys:\n  - {name: a, key: {env: K}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"eventbus.yaml:2: api_keys.0.key: .*printable ASCII"):
        load_settings(cfg, env={"K": key})
    conn = tmp_path / "connectors"
    conn.mkdir()
    (conn / "c.yaml").write_text(
        "sources:\n"
        "  - {name: keyed, type: webhook, keys: [{env: K}]}\n"
        "  - {name: lab, type: webhook, verify: {kind: gitlab, secret: {env: K}}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(conn, env={"K": key})
    assert "c.yaml:2" in str(info.value) and "a trigger key must be printable ASCII" in str(
        info.value
    )
    assert "c.yaml:3" in str(info.value) and "a GitLab token must be printable ASCII" in str(
        info.value
    )
