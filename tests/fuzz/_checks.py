"""The fuzz suite's properties: one HTTP request to a running service; one CLI command run in
process."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from eventbus.cli import main
from tests.fixtures.service import RunningService


async def check_answer(
    svc: RunningService, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, Any]:
    """Send one request; fail on a 5xx, or a 4xx that is not problem+json with a detail.

    Returns the status and the parsed answer.
    """
    status, resp_headers, answer = await svc.request(method, path, body, headers)
    assert status < 500, (method, path, headers, body[:300] if body else body, answer)
    if status >= 400:
        assert resp_headers["Content-Type"].startswith("application/problem+json"), answer
        assert answer["status"] == status and answer["detail"], answer
    return status, answer


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Run ``eventbus ARGV`` in this process: its exit code (argparse's own errors included)
    and what it wrote to standard error."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return code, err.getvalue()
