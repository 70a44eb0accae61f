"""``eventbus display``: a small function endpoint that prints every CloudEvent it receives
(the counterpart of Knative's event-display), for demos and for checking a rule by eye.

It prints each event as a block of its own: a ``--- METHOD /path`` line, then the event as
indented JSON (a batch as one block per event, ``(2 of 3)``); a body that is no CloudEvent is
printed as it came. It answers 200 to every POST; with ``--fail-rate`` it answers 503 to that
fraction of requests, to watch retries and dead letters at work. It verifies Standard Webhooks
signatures when given ``--secret``.
"""

from __future__ import annotations

import random
import sys

import orjson
from aiohttp import web

from eventbus._errors import CloudEventError, ConfigError
from eventbus.cloudevents import from_http
from eventbus.targets import verify_webhook

__all__ = ["run_display"]


def _app(fail_rate: float, secret: str | None, seed: int | None) -> web.Application:
    rng = random.Random(seed)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if fail_rate and rng.random() < fail_rate:
            sys.stdout.write(f"--- {request.path}: answered 503 (--fail-rate)\n")
            return web.Response(status=503, headers={"Retry-After": "1"})
        shown: list[object]
        try:
            shown = list(from_http(dict(request.headers), body))
        except CloudEventError:
            try:
                shown = [orjson.loads(body)]
            except orjson.JSONDecodeError:
                shown = [body.decode(errors="replace")]
        signed = ""
        if secret is not None:
            try:
                verify_webhook(secret, dict(request.headers), body)
                signed = " signature ok"
            except CloudEventError as exc:
                signed = f" SIGNATURE INVALID: {exc.detail}"
        for n, item in enumerate(shown, 1):
            of = f" ({n} of {len(shown)})" if len(shown) > 1 else ""
            sys.stdout.write(
                f"--- {request.method} {request.path}{of}{signed}\n"
                + orjson.dumps(item, option=orjson.OPT_INDENT_2).decode()
                + "\n"
            )
        sys.stdout.flush()
        return web.Response(status=200)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("POST", "/{tail:.*}", receive)
    return app


def _listening(host: str, port: int) -> None:
    """Said once listening (it printed nothing: was it up?); on stderr, the events' stream
    being stdout."""
    sys.stderr.write(f"eventbus display: listening on http://{host}:{port}/ (Ctrl-C stops it)\n")


def run_display(
    host: str,
    port: int,
    *,
    fail_rate: float = 0.0,
    secret: str | None = None,
    seed: int | None = None,
) -> None:
    """Serve until interrupted. Raises ConfigError when the address cannot be listened on."""
    try:
        web.run_app(
            _app(fail_rate, secret, seed),
            host=host,
            port=port,
            print=lambda _: _listening(host, port),
        )
    except OSError as exc:  # taken, not this machine's
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
