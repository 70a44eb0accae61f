"""The HTTP server says which parser and event loop serve, the two choices that weigh most on
the CPU a request costs (the package installs httptools and uvloop for that reason), and its
shutdown grace in the whole seconds uvicorn takes."""

from __future__ import annotations

import pytest

from eventbus.config import Settings
from eventbus.http import http_server


async def _app(scope: object, receive: object, send: object) -> None:  # never called
    raise AssertionError("not served")


async def test_the_parser_and_loop_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="eventbus.http")
    http_server(_app, Settings())  # type: ignore[arg-type]
    http_server(_app, Settings(), http="h11")  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if r.name == "eventbus.http"]
    assert lines[0].startswith("HTTP server: parser httptools, event loop ")
    assert lines[1].startswith("HTTP server: parser h11, event loop ")


@pytest.mark.parametrize(("grace", "seconds"), [(0.5, 1), (1.0, 1), (20.0, 20), (2.2, 3)])
async def test_the_shutdown_grace_is_rounded_up_to_whole_seconds(
    grace: float, seconds: int
) -> None:
    # uvicorn takes whole seconds: truncated, a grace of 0.5 s cancelled every call at once
    settings = Settings.model_validate({"router": {"shutdown_grace": grace}})
    server = http_server(_app, settings)  # type: ignore[arg-type]
    assert server.config.timeout_graceful_shutdown == seconds
