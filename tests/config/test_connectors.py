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
