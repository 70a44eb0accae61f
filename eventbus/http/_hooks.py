"""HTTP triggers: ``/hooks/<name>`` served as bare ASGI, in front of the rest of the edge.

    request ─> the webhook source named <name>? (404) ─> one of its methods? (405)
            ─> client address allowed (deny/allow CIDRs, X-Forwarded-For from trusted
               proxies only)? (403) ─> an API key, when the trigger asks for one? (401)
            ─> body within max_body? (413) ─> WebhookSource.event_for: signature (401), body
               (400), on the durable bus (503 when it is not) ─> 202 {id, source} or the
               trigger's own response

Where it sits: beside ``_ingest`` (the same bare-ASGI shape, for the same reason: a provider's
webhook is as hot a path as ``POST /events``). The trigger's settings are its
``WebhookSourceSpec``; what the request means is the source's business (``eventbus.sources``),
who may send it is the edge's. Every 401/403 is recorded in the ``refusals`` table at the
bounded rate of :class:`RefusalLog`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from eventbus import metrics
from eventbus._errors import CloudEventError
from eventbus.http._access import Access, RefusalLog
from eventbus.http._addresses import Networks, allowed, client_address, forwarded_for
from eventbus.http._problem import PROBLEM, Problem, count_refused, problem_answer
from eventbus.http._types import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    read_body,
    request_headers,
    send_answer,
)
from eventbus.sources import HookRequest, WebhookSource, body_limit

if TYPE_CHECKING:
    from eventbus.app import Service
    from eventbus.sources._webhook import WebhookSourceSpec

__all__ = ["HOOK_OPERATIONS", "HookApp"]

_PREFIX = "/hooks/"
_TELL_EVERY = 10.0
_log = logging.getLogger(__name__)


def _problem(status: int, description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ProblemDetails"}
    return {str(status): {"description": description, "content": {PROBLEM: {"schema": schema}}}}


_DUPLICATE = {
    "description": "`true` when the bus already held the event's source+id (a redelivered "
    "webhook within the duplicate window), so it is not delivered again; absent otherwise",
    "schema": {"type": "string", "enum": ["true"]},
}

HOOK_OPERATIONS: dict[str, dict[str, Any]] = {
    "/hooks/{name}": {
        "post": {
            "summary": "An HTTP trigger: any request becomes a CloudEvent on the durable bus",
            "description": (
                "The webhook source <name> (connectors/, type: webhook) verifies the request "
                "(GitHub, GitLab, Stripe, Slack, Standard Webhooks or a generic HMAC), checks "
                "its IP lists and API keys, and publishes the body as the event's data. The "
                "methods are the trigger's (POST unless it lists others). 202 once the event "
                "is on the bus, or the trigger's own response."
            ),
            "operationId": "webhook",
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "The webhook source's name",
                }
            ],
            "requestBody": {"content": {"*/*": {"schema": {"description": "any body"}}}},
            "responses": {
                "202": {
                    "description": "On the durable bus (or already there: a redelivery)",
                    "headers": {"Eventbus-Duplicate": _DUPLICATE},
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}
                    },
                },
                "200": {
                    "description": "On the durable bus: the trigger's own response (any 2xx)",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_problem(400, "A body the trigger cannot read, or no value for the type"),
                **_problem(401, "Not verified: signature, token or API key missing or wrong"),
                **_problem(403, "The client's address is not allowed"),
                **_problem(404, "No webhook source of this name"),
                **_problem(405, "A method the trigger does not accept"),
                **_problem(408, "The body did not arrive in time"),
                **_problem(413, "The body or the event is too large"),
                **_problem(415, "A Content-Encoding other than identity"),
                **_problem(503, "The event bus is unavailable: retry later"),
            },
        }
    }
}
"""The hook route in the OpenAPI document (``GET /openapi.json``)."""


_REASONS = {401: "unauthorized", 403: "forbidden"}


def _given_key(headers: Mapping[str, str]) -> str:
    header = headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    return given or headers.get("x-api-key", "")


def _trusted(spec: WebhookSourceSpec, service_proxies: Networks) -> Networks:
    """The proxies whose ``X-Forwarded-For`` names a caller of ``spec``'s trigger: its own
    and the service's (a proxy in front of the whole service relays to every trigger; a
    trigger's deny list judged the proxy's address and let a denied client through)."""
    if not service_proxies:
        return spec.trusted_proxies
    return spec.trusted_proxies + service_proxies


def proxies_for(service: Service) -> Callable[[str], Networks]:
    """The proxies whose ``X-Forwarded-For`` names the client of a request, by its path: a
    trigger's own and the service's for ``/hooks/<name>``, the service's elsewhere. The
    service-wide address lists judge that client: judging a trigger's proxy instead let a
    client the service denies through it, and refused one the service allows."""
    service_proxies = service.settings.client_addresses.trusted_proxies

    def proxies(path: str) -> Networks:
        if path.startswith(_PREFIX):
            source = service.source(path[len(_PREFIX) :])
            if isinstance(source, WebhookSource):
                return _trusted(source.spec, service_proxies)
        return service_proxies

    return proxies


class HookApp:
    """ASGI: serves ``/hooks/<name>`` and hands every other request to ``fallback``."""

    def __init__(
        self, service: Service, access: Access, refusals: RefusalLog, fallback: ASGIApp
    ) -> None:
        self._service = service
        self._access = access
        self._fallback = fallback
        self._refusals = refusals
        self._max_event = service.settings.max_event_size
        self._max_body = body_limit(self._max_event)
        self._service_proxies = service.settings.client_addresses.trusted_proxies
        self._told_at = -_TELL_EVERY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(_PREFIX):
            await self._fallback(scope, receive, send)
            return
        try:
            status, media, body, extra = await self._hook(scope, receive, path[len(_PREFIX) :])
        except Exception as exc:
            # The sender is a stranger: not told the servers behind (the operator is, in the
            # log, at most every 10 s)
            answer = problem_answer(exc, path, reveal=False)
            if answer is None:
                raise
            status, extra, body = answer
            media = PROBLEM
            if status >= 500 or status == 422:
                self._tell_operator(path, status, exc)
        await send_answer(send, status, media, body, extra)

    def _tell_operator(self, path: str, status: int, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._told_at >= _TELL_EVERY:
            self._told_at = now
            _log.warning("%s answered %d: %s", path, status, exc)

    async def _hook(
        self, scope: Scope, receive: Receive, name: str
    ) -> tuple[int, str, bytes, dict[str, str]]:
        """The answer: status, content type, body and extra headers."""
        source = self._service.source(name)
        if not isinstance(source, WebhookSource):
            raise Problem(404, f"no webhook source {name!r}")
        spec = source.spec
        headers = request_headers(scope["headers"])
        peer = scope.get("client")
        remote = peer[0] if peer else None
        trusted = self._trusted(spec)
        address = client_address(trusted, remote, forwarded_for(scope["headers"]))
        path = scope["path"]
        if not allowed(spec, address):
            who = f"address {address}" if address is not None else "a client of unknown address"
            reason = f"{who} is not allowed to call hook {name!r}"
            self._refuse(remote, path, reason)
            metrics.EVENTS_REJECTED.labels("hook", "forbidden").inc()
            raise Problem(403, reason)
        if spec.verify is None and not spec.keys:
            # A trigger that neither verifies nor has keys of its own is as closed as POST
            # /events: with no keys anywhere, only this machine's programs reach it (any web
            # page a developer opened posted events to it, by a cross-site form or by DNS
            # rebinding). Providers that sign or send a key call from their own names.
            remedy = f" (for senders elsewhere, give hook {spec.name!r} verify or keys)"
            self._access.from_this_machine(headers, path, remote, remedy, trusted)
        if spec.keys or spec.takes_service_keys:
            await self._check_key(spec, headers, path, remote)
        if scope["method"] not in spec.methods:
            # after the address and the key: a client refused those is not told the methods
            allow = ", ".join(spec.methods)
            raise Problem(405, f"hook {name!r} accepts {allow}", headers={"Allow": allow})
        query = scope.get("query_string", b"").decode("latin-1")
        limit = min(spec.max_body, self._max_body)
        try:
            raw = None
            if source.unsigned_form(headers):
                raw = await read_body(receive, headers, limit)
                if source.ssl_check(HookRequest(scope["method"], headers, query, raw)):
                    return 200, "text/plain", b"", {}
            # a request without its signature, or too old, is refused before its body is read
            source.precheck(HookRequest(scope["method"], headers, query, b""))
            if raw is None:
                raw = await read_body(receive, headers, limit)
            request = HookRequest(scope["method"], headers, query, raw)
            if source.ssl_check(request):  # signed: verified there
                return 200, "text/plain", b"", {}
            event = source.event_for(request, max_size=self._max_event)
        except Problem as exc:  # the body refused whole (413, 408, 415, Content-Length)
            count_refused("hook", exc)
            raise
        except CloudEventError as exc:
            if exc.status in (401, 403):
                self._refuse(remote, path, exc.detail)
            # counted as the trigger's key and address refusals are (a signature refused
            # was counted under via="http", reason="401")
            reason = _REASONS.get(exc.status, str(exc.status))
            metrics.EVENTS_REJECTED.labels("hook", reason).inc()
            raise Problem(exc.status, exc.detail, title=exc.title) from None
        # counted in eventbus_events_received_total{via="source:<name>"} by the service
        duplicate, event_id = await source.publish(event, source.signature_of(request))
        if event_id != event["id"]:  # a replay: answered with the id of the event it repeats
            event = {**event, "id": event_id}
        status, media, body = source.answer(request, event, duplicate)
        return status, media, body, {"Eventbus-Duplicate": "true"} if duplicate else {}

    async def _check_key(
        self, spec: WebhookSourceSpec, headers: Mapping[str, str], path: str, remote: str | None
    ) -> None:
        """Raise Problem 401 (403: a service key without scope publish) unless the request
        carries one of the trigger's keys or, when it takes them, one of the service's. With
        no key configured anywhere the trigger is open, as the rest of the API is."""
        given = _given_key(headers).encode()
        # compare against every key, so timing does not tell which one matched
        matched = [hmac.compare_digest(given, k.reveal().encode()) for k in spec.keys]
        if given and any(matched):
            return
        if spec.takes_service_keys and (self._service.settings.api_keys or not spec.keys):
            await self._access.check(headers, path, remote, "publish", from_anywhere=True)
            return
        reason = "missing API key" if not given else "invalid API key"
        self._refuse(remote, path, reason)
        metrics.EVENTS_REJECTED.labels("hook", "unauthorized").inc()
        raise Problem(401, reason, headers={"WWW-Authenticate": "Bearer"})

    def _trusted(self, spec: WebhookSourceSpec) -> Networks:
        return _trusted(spec, self._service_proxies)

    def _refuse(self, remote: str | None, path: str, reason: str) -> None:
        self._refusals.record(remote=remote, path=path, reason=reason)
