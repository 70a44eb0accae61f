"""The ``eventbus`` command line.

    eventbus serve [--config FILE] [--workers N]
    eventbus publish --type T --source S [--data JSON] [--subject S]
    eventbus rules validate [PATH] | test --event E.json [PATH] | test-pattern --pattern P --event E
    eventbus events show SOURCE ID
    eventbus dlq list|show ID|replay [ID]|purge [ID]   (filters: --rule --target --status ...)
    eventbus sources [--dead-letters]
    eventbus display [--port 9000]                      (a function endpoint that prints events)

Commands that inspect a running service talk to its HTTP API (``--url``, default
``$EVENTBUS_URL``, else the ``eventbus serve`` running on the data directory here, else
http://127.0.0.1:8080; ``--api-key`` or ``$EVENTBUS_API_KEY``). Errors are
one clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from eventbus._errors import EventBusError
from eventbus.cli import _datadir, _rules

__all__ = ["main"]


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="default: $EVENTBUS_URL, else the service running here")
    p.add_argument("--api-key", default=os.environ.get("EVENTBUS_API_KEY"))


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule")
    p.add_argument("--target")
    p.add_argument("--status", type=int, help="last HTTP status")
    p.add_argument("--reason", help="attempts-exhausted, too-old, non-retryable, gone, ...")
    p.add_argument("--since", help="ISO 8601 time")
    p.add_argument("--until", help="ISO 8601 time")
    p.add_argument("--source", help="event source")


class _ApiError(Exception):
    pass


def _request(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    req = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            problem = orjson.loads(raw)
            detail = problem.get("detail") or problem
        except orjson.JSONDecodeError:
            detail = raw.decode(errors="replace")[:500]
        raise _ApiError(f"{exc.code} {exc.reason}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _ApiError(f"cannot reach eventbus at {args.url}: {reason}") from None
    return orjson.loads(raw) if raw else None


def _print(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _query(args: argparse.Namespace, **extra: Any) -> str:
    q = {
        k: getattr(args, k)
        for k in ("rule", "target", "status", "reason", "since", "until", "source")
        if getattr(args, k, None) is not None
    }
    q.update({k: v for k, v in extra.items() if v is not None})
    return "?" + urllib.parse.urlencode(q, doseq=True) if q else ""


def _cmd_serve(args: argparse.Namespace) -> int:
    from eventbus.cli._logging import configure_logging
    from eventbus.cli._serve import serve
    from eventbus.config import load_settings

    settings = load_settings(args.config)
    if args.host or args.port is not None:
        listen = settings.listen.model_copy(
            update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        )
        settings = settings.model_copy(update={"listen": listen})
    configure_logging(settings.log_level, settings.log_format)
    serve(settings, workers=args.workers, reuse_port=args.reuse_port, config_path=args.config)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from eventbus.cloudevents import new_event

    try:
        data = orjson.loads(args.data) if args.data is not None else None
    except orjson.JSONDecodeError as exc:
        raise _ApiError(f"--data is not valid JSON: {exc}") from None
    event = new_event(type=args.type, source=args.source, subject=args.subject, data=data)
    _print(
        _request(
            args,
            "POST",
            "/events",
            orjson.dumps(event),
            {"Content-Type": "application/cloudevents+json"},
        )
    )
    return 0


def _cmd_events_show(args: argparse.Namespace) -> int:
    q = urllib.parse.urlencode({"source": args.source_, "id": args.id})
    _print(_request(args, "GET", f"/events/trail?{q}"))
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        _print(
            _request(
                args, "GET", "/dead-letters" + _query(args, limit=args.limit, after=args.after)
            )
        )
    elif action == "show":
        _print(_request(args, "GET", f"/dead-letters/{args.id}"))
    elif action == "replay":
        if args.id is not None:
            _print(_request(args, "POST", f"/dead-letters/{args.id}/replay"))
        else:
            _print(
                _request(
                    args,
                    "POST",
                    "/dead-letters/replay" + _query(args, all="true" if args.all else None),
                )
            )
    elif action == "purge":
        if args.id is not None:
            _print(_request(args, "DELETE", f"/dead-letters/{args.id}"))
        else:
            _print(
                _request(
                    args, "DELETE", "/dead-letters" + _query(args, all="true" if args.all else None)
                )
            )
    return 0


def _cmd_display(args: argparse.Namespace) -> int:
    from eventbus.cli._display import run_display

    run_display(args.host, args.port, fail_rate=args.fail_rate, secret=args.secret, seed=args.seed)
    return 0


def _cmd_sources(args: argparse.Namespace) -> int:
    path = "/sources/dead-letters" if args.dead_letters else "/sources"
    _print(_request(args, "GET", path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbus", description="A self-hosted event bus and trigger router."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the service (embedded NATS + PostgreSQL by default)")
    p.add_argument(
        "--config",
        default=os.environ.get("EVENTBUS_CONFIG"),
        help="settings YAML (default: built-in defaults + EVENTBUS_* env)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the bus")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("publish", help="publish one CloudEvent to a running service")
    p.add_argument("--type", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--subject")
    p.add_argument("--data", help="JSON payload")
    _client_args(p)
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("rules", help="validate and test routing rules offline")
    _rules.register(p.add_subparsers(dest="rules_command", required=True))

    p = sub.add_parser("events", help="inspect the audit trail")
    ev = p.add_subparsers(dest="events_command", required=True)
    show = ev.add_parser("show", help="an event's whole trail: matches and delivery attempts")
    show.add_argument("source_", metavar="SOURCE")
    show.add_argument("id")
    _client_args(show)
    show.set_defaults(func=_cmd_events_show)

    p = sub.add_parser("dlq", help="inspect, replay and purge dead letters")
    dl = p.add_subparsers(dest="action", required=True)
    for action in ("list", "show", "replay", "purge"):
        a = dl.add_parser(action)
        if action == "show":
            a.add_argument("id", type=int)
        else:
            if action != "list":
                a.add_argument("id", type=int, nargs="?")
                a.add_argument("--all", action="store_true", help="every dead letter")
            _filter_args(a)
        if action == "list":
            a.add_argument("--limit", type=int, default=100)
            a.add_argument("--after", type=int, help="page: the last id of the previous page")
        _client_args(a)
        a.set_defaults(func=_cmd_dlq)

    p = sub.add_parser("display", help="a function endpoint that prints what it receives")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--fail-rate", type=float, default=0.0, help="answer 503 to this fraction")
    p.add_argument("--secret", help="verify Standard Webhooks signatures with this secret")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_display)

    p = sub.add_parser("sources", help="show each source's state, last event, errors and lag")
    p.add_argument("--dead-letters", action="store_true", help="input that became no event")
    _client_args(p)
    p.set_defaults(func=_cmd_sources)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "url", "") is None:
        args.url = _datadir.default_url()
    try:
        return int(args.func(args))
    except (_ApiError, EventBusError) as exc:
        sys.stderr.write(f"eventbus: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
