"""The worked example of docs/targets.md ("Writing a target") works as printed: its module,
registered under a type of the test's own, is loaded from YAML, built and delivers."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from eventbus.config import load_connectors
from eventbus.targets import build_target, register_target

DOC = Path(__file__).resolve().parents[2] / "docs" / "targets.md"


def _example_module() -> types.ModuleType:
    section = DOC.read_text(encoding="utf-8").split("## Writing a target", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S)
    assert source is not None, "no Python block in 'Writing a target'"
    module = types.ModuleType("tests_docs_jsonl_target")
    sys.modules[module.__name__] = module  # pydantic resolves the spec's annotations there
    exec(compile(source.group(1), str(DOC), "exec"), module.__dict__)
    return module


async def test_the_documented_target_delivers_what_it_is_given(tmp_path: Path) -> None:
    example = _example_module()
    register_target("docs-jsonl", example.JsonLinesTargetSpec, example.JsonLinesTarget)
    out = tmp_path / "deliveries.jsonl"
    (tmp_path / "c.yaml").write_text(
        f"targets:\n  - name: audit-file\n    type: docs-jsonl\n    path: {out}\n"
    )
    spec = load_connectors(tmp_path).targets["audit-file"]
    async with build_target(spec) as target:
        sent = await target.deliver({"id": "1"}, {"n": 1}, is_cloudevent=False, attempt=1)
        unsendable = await target.deliver({"id": "2"}, {1, 2}, is_cloudevent=False, attempt=1)
    assert sent.delivered
    assert not unsendable.delivered and not unsendable.retryable
    assert unsendable.error is not None and unsendable.error.startswith("TypeError")
    assert out.read_text() == '{"n":1}\n'
