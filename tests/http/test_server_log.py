"""The HTTP server says which parser and event loop serve, the two choices that weigh most on
the CPU a request costs (the package installs httptools and uvloop for that reason)."""

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
