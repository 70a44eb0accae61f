"""Error texts as statuses and health answers show them (no servers)."""

from __future__ import annotations

from eventbus._errors import FailureRun


def test_a_failure_without_text_still_says_something() -> None:
    # A bare TimeoutError (an asyncio timeout) read "TimeoutError: " in the audit's health
    # answer and in a source's last_error, naming nothing.
    run = FailureRun()
    run.failed(TimeoutError())
    assert run.last == "TimeoutError: no answer in time"
    run.failed(KeyError())
    assert run.last == "KeyError"
    run.failed(ConnectionRefusedError(111, "Connection refused"))
    assert run.last == "ConnectionRefusedError: [Errno 111] Connection refused"
