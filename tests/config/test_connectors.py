"""Connector files: every file of the directory is read, and every problem is reported with
file, line and connector, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventbus._errors import ConfigError
from eventbus.config import HttpTargetSpec, KafkaTargetSpec, load_connectors


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


def test_a_target_url_comes_from_the_environment_or_its_default(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        "    url: {env: FN_URL, default: 'http://127.0.0.1:9000/fn'}\n"
        "  - name: bus\n"
        "    type: nats\n"
        "    subject: s\n"
        "    url: {env: BUS_URL}\n"
    )

    def urls(env: dict[str, str]) -> tuple[str, str]:
        targets = load_connectors(tmp_path, env=env).targets
        return targets["fn"].url, targets["bus"].url  # type: ignore[union-attr]

    assert urls({"BUS_URL": "nats://n:4222"}) == ("http://127.0.0.1:9000/fn", "nats://n:4222")
    assert urls({"BUS_URL": "nats://n:4222", "FN_URL": "https://fn.example/x"}) == (
        "https://fn.example/x",
        "nats://n:4222",
    )
    # set but empty counts as unset, as the shell's ${FN_URL:-default}
    assert urls({"BUS_URL": "nats://n:4222", "FN_URL": ""})[0] == "http://127.0.0.1:9000/fn"
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={"FN_URL": "ftp://nope"})
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "a.yaml:4: targets.0.url: String should match pattern '^https?://' (target 'fn')",
        "a.yaml:8: targets.1.url: environment variable BUS_URL is not set and no default "
        "is given (target 'bus')",
    ]


def test_a_malformed_url_from_the_environment_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "targets:\n"
        "  - {name: a, type: http, url: {env: A, fallback: 'http://x/'}}\n"
        "  - {name: b, type: http, url: {env: 'not a name'}}\n"
        "  - {name: c, type: http, url: {env: C, default: 9000}}\n"
        "  - {name: d, type: http, url: {file: /run/url}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={})
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "a.yaml:2: targets.0.url: unknown key 'fallback'; write a string or "
        "{env: NAME, default: VALUE} (target 'a')",
        "a.yaml:3: targets.1.url: 'not a name' is not an environment variable name (target 'b')",
        "a.yaml:4: targets.2.url: the default of C must be a string (target 'c')",
        "a.yaml:5: targets.3.url: unknown key 'file'; write a string or "
        "{env: NAME, default: VALUE} (target 'd')",
    ]
