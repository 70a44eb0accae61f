"""The fuzz suite's property for one HTTP request to a running service."""

from __future__ import annotations

from typing import Any

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
