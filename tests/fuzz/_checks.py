"""The fuzz suite's properties: one HTTP request to a running service; one CLI command run in
process."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

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


class Recorder(BaseHTTPRequestHandler):
    """A stand-in for the service that the CLI talks to: records each request's path and
    answers every GET and POST with ``status``, ``content_type`` and ``body`` (class
    attributes a test's subclass sets, and may change between examples)."""

    paths: ClassVar[list[str]]
    status: ClassVar[int] = 200
    content_type: ClassVar[str] = "application/json"
    body: ClassVar[bytes] = b""

    def _answer(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[Recorder]) -> Iterator[str]:
    """``handler`` on a loopback port of its own, in a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
