"""Error answers of the HTTP edge: RFC 9457 problem+json bodies with a specific ``detail``.

Where it sits: every route of the edge (the bare-ASGI ingest, the admin API, the connection
limits in front of both) answers an error through :class:`Problem`; :func:`problem_for` is the
one table of which eventbus errors become which answer.
"""

from __future__ import annotations

import orjson

from eventbus import metrics
from eventbus._errors import (
    BusError,
    BusUnavailable,
    CloudEventError,
    EventTooLargeForBus,
    SelectionChanged,
    StoreDataError,
    StoreError,
)

__all__ = ["PROBLEM", "Problem", "count_refused", "problem_answer", "problem_for"]

PROBLEM = "application/problem+json"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Problem(Exception):
    """An error answer: status, a specific detail, optional headers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}

    def body(self, instance: str | None) -> bytes:
        """The problem+json body; ``instance`` (the request path) is left out when unknown."""
        return orjson.dumps(
            {
                "type": "about:blank",
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                **({} if instance is None else {"instance": instance}),
            }
        )


def count_refused(via: str, exc: BaseException) -> None:
    """Count a request refused for the event it carries, in
    ``eventbus_events_rejected_total{via, reason}`` (the status answered): an invalid event, a
    body too large, unreadable or compressed. A 401 or 403 is counted where the key or the
    address is refused (``unauthorized``, ``forbidden``); a 405 carries no event."""
    status = exc.status if isinstance(exc, (CloudEventError, Problem)) else None
    if status is not None and 400 <= status < 500 and status not in (401, 403, 405):
        metrics.EVENTS_REJECTED.labels(via, str(status)).inc()


def problem_answer(
    exc: Exception, path: str, *, reveal: bool = True
) -> tuple[int, dict[str, str], bytes] | None:
    """The status, extra headers and problem+json body answering ``exc`` on ``path``, or None
    when it is no error an operation raises on purpose (see :func:`problem_for`).

    For the bare-ASGI handlers, which answer from their own ``except``: the answer is made
    here, so no local of theirs keeps the problem (its traceback holds their frame, the frame
    held it: a cycle keeping the request's body until a full collection, hundreds of MB after
    a few hundred refused large bodies)."""
    problem = problem_for(exc, reveal=reveal)
    if problem is None:
        return None
    return problem.status, problem.headers, problem.body(path)


def problem_for(exc: Exception, *, reveal: bool = True) -> Problem | None:
    """The answer for an error an API operation may raise on purpose; None for the others.
    Without ``reveal`` (an answer to a stranger: a webhook's sender), a failure of the bus or
    the database is answered without its error, which names the servers behind."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, CloudEventError):
        return Problem(exc.status, exc.detail, title=exc.title)
    if isinstance(exc, SelectionChanged):
        return Problem(409, str(exc), title="The selection changed")
    why = f": {exc}" if reveal else ""
    if isinstance(exc, BusUnavailable):
        return Problem(503, f"the event bus is unavailable{why}", headers={"Retry-After": "5"})
    if isinstance(exc, StoreDataError):
        return Problem(400, f"the database cannot take a value of this request{why}")
    if isinstance(exc, StoreError):
        return Problem(503, f"the database is unavailable{why}", headers={"Retry-After": "5"})
    if isinstance(exc, EventTooLargeForBus):
        return Problem(413, f"the event is too large for the event bus{why}")
    if isinstance(exc, BusError):
        # the broker refused this event: retrying will not help
        return Problem(422, f"the event bus refused the event{why}")
    return None
