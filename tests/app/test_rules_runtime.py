"""The setting router.cel: which CEL runtime the service's rules run on (no servers: rules
load before anything starts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from eventbus._errors import ConfigError
from eventbus.app import Service
from eventbus.config import load_connectors, load_settings

RULES = "- {name: big, when: 'event.data.total > 100.5', targets: [fn]}\n"
TARGETS = "targets:\n  - {name: fn, type: http, url: 'http://127.0.0.1:9/'}\n"


def _service(tmp_path: Path, cel: str) -> Service:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(RULES)
    (tmp_path / "connectors").mkdir()
    (tmp_path / "connectors" / "targets.yaml").write_text(TARGETS)
    env = {
        "EVENTBUS_RULES": str(tmp_path / "rules"),
        "EVENTBUS_CONNECTORS": str(tmp_path / "connectors"),
        "EVENTBUS_ROUTER__CEL": cel,
    }
    return Service(load_settings(None, env=env))


def _loaded(service: Service) -> bool:
    connectors = load_connectors(service.settings.connectors)
    return service._load_rules(connectors, {}).native_cel


def test_cel_python_by_default(tmp_path: Path) -> None:
    assert not _loaded(_service(tmp_path, "cel-python"))


def test_cel_expr_python_when_asked(tmp_path: Path) -> None:
    pytest.importorskip("cel_expr_python", reason="cel-expr-python (the fast-cel extra) is absent")
    assert _loaded(_service(tmp_path, "cel-expr-python"))


def test_asked_for_but_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "cel_expr_python" else real(name, *args),
    )
    with pytest.raises(ConfigError, match=r"eventbus\[fast-cel\]"):
        _loaded(_service(tmp_path, "cel-expr-python"))
