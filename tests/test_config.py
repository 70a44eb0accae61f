"""Settings and connector files: defaults, environment overrides, and bad input reported with
file, line and field, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventbus._errors import ConfigError
from eventbus.config import load_settings
from eventbus.connectors import HttpTargetSpec, KafkaTargetSpec, load_connectors


def test_defaults_are_the_embedded_default() -> None:
    s = load_settings(None, env={})
    assert s.embedded_bus and s.embedded_database
    assert s.listen.host == "127.0.0.1" and s.listen.port == 8080
    assert s.max_event_size == 256 * 1024 and s.api_keys == ()


def test_file_and_environment_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text("listen: {port: 9000}\nbus: {nats: {url: nats://a:4222}}\n")
    env = {
        "EVENTBUS_LISTEN__PORT": "9100",
        "EVENTBUS_DATABASE__URL": "postgresql://x/y",
        "EVENTBUS_BUS__NATS__STREAM": "S2",
        "PATH": "/bin",
    }
    s = load_settings(cfg, env=env)
    assert s.listen.port == 9100
    assert s.database.url == "postgresql://x/y" and not s.embedded_database
    assert s.bus.nats.url == "nats://a:4222" and s.bus.nats.stream == "S2"
    assert not s.embedded_bus
    assert load_settings(None, env={"EVENTBUS_CONFIG": str(cfg)}).listen.port == 9000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: [1\n", "eventbus.yaml:2: invalid YAML"),
        ("listen: {port: 1}\nlisten: {port: 2}\n", "eventbus.yaml:2: duplicate key 'listen'"),
        ("- 1\n", "eventbus.yaml:1: settings must be a mapping"),
        ("listen:\n  port: 99999\n", "eventbus.yaml:2: listen.port: Input should be less than"),
        ("bus:\n  backend: rabbit\n", "eventbus.yaml:2: bus.backend: Input should be 'nats'"),
        ("bus:\n  nats:\n    stream: S\n    typo: 1\n", "eventbus.yaml:4: bus.nats.typo: Extra"),
        ("api_keys:\n  - {name: a, key: short}\n", "eventbus.yaml:2: api_keys.0.key"),
    ],
)
def test_bad_settings_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "eventbus.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert expected in str(info.value).replace(str(tmp_path) + "/", "")


def test_missing_settings_file() -> None:
    with pytest.raises(ConfigError, match="cannot read settings"):
        load_settings("/nonexistent/eventbus.yaml", env={})


def test_bad_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"listen\.port"):
        load_settings(None, env={"EVENTBUS_LISTEN__PORT": "many"})


def test_connectors_load_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:1/', timeout: 2s}\n"
    )
    (tmp_path / "b.yml").write_text(
        "targets:\n  - {name: k, type: kafka, bootstrap_servers: 'h:9092', topic: t}\n"
        "sources:\n  - {name: tick, type: timer, schedule: 'rate(1 minute)'}\n"
    )
    (tmp_path / "notes.txt").write_text("ignored")
    c = load_connectors(tmp_path)
    assert isinstance(c.targets["fn"], HttpTargetSpec) and c.targets["fn"].timeout == 2.0
    assert isinstance(c.targets["k"], KafkaTargetSpec)
    assert c.sources["tick"]["schedule"] == "rate(1 minute)"
    assert load_connectors(tmp_path / "missing").targets == {}


def test_bad_connectors_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        "    url: ftp://nope\n"
        "  - name: fn\n"
        "    type: nats\n"
        "    url: nats://x\n"
        "    subject: s\n"
        "  - name: q\n"
        "    type: carrier-pigeon\n"
    )
    (tmp_path / "b.yaml").write_text("targets: [\n")
    (tmp_path / "c.yaml").write_text("sources:\n  - {type: timer}\nextra: 1\n")
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path)
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert any(line.startswith("a.yaml:4: targets.0.url") for line in lines), lines
    assert any("a.yaml:10" in line and "carrier-pigeon" in line for line in lines), lines
    assert "b.yaml:2: invalid YAML" in "\n".join(lines) or any("b.yaml" in x for x in lines)
    assert any(line.startswith("c.yaml:3: extra: Extra inputs") for line in lines), lines
    # the duplicate 'fn' is only detected among valid targets: here the first one was invalid
    assert not any("duplicate" in line for line in lines)
