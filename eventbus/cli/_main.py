"""The ``eventbus`` command line.

    eventbus serve [--config FILE] [--workers N]
    eventbus publish --type T --source S [--data JSON|@FILE|-] [--id --time --subject
                     --datacontenttype -e NAME=VALUE --mode binary|structured]
    eventbus invoke TARGET [--data JSON|@FILE|-] [--type --source --id --subject
                     --datacontenttype --async --reply]   (call one target, print its answer)
    eventbus rules validate [PATH] | test --event E.json [PATH] | test-pattern --pattern P --event E
    eventbus rules reload                               (the running service loads its rules again)
    eventbus events list [--source S] [--type T] [--since T] [--until T]
    eventbus events show SOURCE ID
    eventbus dlq list|show ID|replay [ID...]|purge [ID...]   (filters: --rule --target ...)
    eventbus retries list [--limit N] [--target T]
    eventbus targets [enable TARGET]                    (circuits, retries, 410-disabled targets)
    eventbus sources [--dead-letters [--source S] [--limit N]]
    eventbus display [--port 9000]                      (a function endpoint that prints events)

Commands that inspect a running service talk to its HTTP API (``--url``, default
``$EVENTBUS_URL``, else the ``eventbus serve`` running on the data directory here (``_datadir``),
else http://127.0.0.1:8080; ``--api-key``, default ``$EVENTBUS_API_KEY``) and
print tables for people, or the API's JSON answer with ``--json`` (``_output``). Errors are one
clear line on stderr, never a traceback; the exit code is 1 when the service refused or could
not be reached and 2 for unusable input on the command line (as argparse's own errors).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import Message
from typing import Any

import orjson

from eventbus._errors import EventBusError
from eventbus.cli import _datadir, _rules

__all__ = ["build_parser", "main"]

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
_TIMEOUT = 60.0
"""Seconds a request may take: a service that does not answer (frozen, say) is said so, not
waited on for a quarter of an hour."""
_INVOKE_TIMEOUT = 930.0
"""Seconds a synchronous invocation may take: it waits for its target, whose timeout may be up
to 900 s."""
_ANSWERED_BY = "X-Eventbus-Answered-By"
"""The header on a target's own answer to a synchronous invocation (eventbus.http's)."""
_NO_LIMIT = 1 << 40
"""The size bound of the events the CLI builds: the service's own (its max_event_size, 256
KiB unless set) is the one that counts, and may be larger than the default."""
_BULK_TIMEOUT = 600.0
"""Seconds a replay or a purge of many dead letters may take (a batch at a time)."""

REASONS = (
    "attempts-exhausted",
    "too-old",
    "non-retryable",
    "gone",
    "target-disabled",
    "unknown-target",
)
"""Why a delivery was dead-lettered: the values of the ``reason`` filter (the delivery layer's
``DeadLetterReason``, which this module does not import: it loads every driver)."""


class _Help(argparse.HelpFormatter):
    """Help that shows every option's default, unless it has none worth showing (None,
    False, an empty list) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or (not action.option_strings and action.nargs != "?")
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: ``add_subparsers`` makes its children of the same class,
    so the whole tree shows defaults in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        help="the running service's HTTP API (default: $EVENTBUS_URL, else the eventbus serve "
        "running on the data directory here, ./.eventbus or $EVENTBUS_DATA_DIR, or that of "
        "the settings file $EVENTBUS_CONFIG, else the address it would listen on)",
    )
    p.add_argument(
        "--api-key",
        help="an API key: scope publish for publish, admin for the other commands (default: "
        "$EVENTBUS_API_KEY; never shown here)",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON answer, for scripts")
    p.add_argument(
        "--timeout",
        type=_seconds,
        help=f"seconds to wait for the answer (default: {_TIMEOUT:g}; a replay or a purge "
        f"{_BULK_TIMEOUT:g}, a synchronous invoke {_INVOKE_TIMEOUT:g})",
    )


def _seconds(text: str) -> float:
    """``--timeout``'s value: a positive number of seconds (argparse's ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(
            f"must be seconds, more than 0 and at most 86400, got {text!r}"
        )
    return value


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", help="only this rule's dead letters")
    p.add_argument("--target", help="only this target's dead letters")
    p.add_argument("--status", type=int, help="last HTTP status")
    p.add_argument("--reason", choices=REASONS, help="why it was dead-lettered")
    p.add_argument("--since", help="ISO 8601 time, or a duration ago (30m, 6h, 7d)")
    p.add_argument("--until", help="ISO 8601 time, or a duration ago (30m, 6h, 7d)")
    p.add_argument("--source", help="event source")
    p.add_argument(
        "--through",
        type=_bounded(1, 2**63 - 1),
        metavar="ID",
        help="ids up to this one (a count's last id)",
    )


class _ApiError(Exception):
    """The service refused a request (``status``) or could not be reached (``status`` None)."""

    def __init__(
        self, message: str, *, status: int | None = None, detail: str = "", problem: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.problem = problem  # the service's problem+json answer, parsed (for --json)


class _BadInput(Exception):
    """An option's value cannot be used; raised before anything is sent."""


def _request(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = _TIMEOUT,
) -> Any:
    raw = _send(args, method, path, body, headers, timeout=timeout)[2]
    return _request_body(args, raw) if raw else None


def _request_body(args: argparse.Namespace, raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _not_eventbus(args, "not JSON") from None


def _not_eventbus(args: argparse.Namespace, what: str) -> _ApiError:
    return _ApiError(
        f"the answer from {args.url} is not eventbus's, or is an other version's ({what}): "
        "check --url, and that this CLI and the service are the same version"
    )


def _answered_by_target(headers: Message) -> bool:
    """Whether a synchronous invocation's answer is the target's own: named in
    ``X-Eventbus-Answered-By``; from a service older than that header, any answer with the
    duration it measured that is not eventbus's own problem+json."""
    if _ANSWERED_BY in headers:
        return True
    return "X-Eventbus-Duration-Ms" in headers and not (
        headers.get("Content-Type", "").startswith("application/problem+json")
    )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx comes back as the answer it is: the service passes a function's own redirect on
    (``invoke``), and urllib followed it, sending the API key to the host the function named."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _send(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = _TIMEOUT,
    answers: bool = False,
) -> tuple[int, Message, bytes]:
    """One request to the service: its 2xx status, headers and body; _ApiError otherwise.
    With ``answers``, a target's own error answer to a synchronous invocation (it names
    the target in ``X-Eventbus-Answered-By``) is returned as it came too."""
    from eventbus.config import redact_url

    shown = redact_url(args.url)
    try:
        parts = urllib.parse.urlsplit(args.url)
    except ValueError as exc:  # http://[::1:8080: a traceback
        raise _BadInput(f"invalid --url {shown!r} (or EVENTBUS_URL): {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        # "127.0.0.1:8080" read as the scheme "127.0.0.1": "cannot reach eventbus", exit 1
        raise _BadInput(
            f"invalid --url {shown!r} (or EVENTBUS_URL): give http://HOST:PORT (or https://)"
        )
    if "@" in parts.netloc or parts.query or parts.fragment:
        # urllib took user:password@ for part of the host name ("Name or service not known",
        # the password in the message and so in a CI job's log), and a query ended up
        # before the path (/?token=x/targets)
        raise _BadInput(
            "--url (or EVENTBUS_URL) takes no credentials, query or fragment: give "
            "http://HOST:PORT[/PATH], and the API key with --api-key or EVENTBUS_API_KEY"
        )
    try:
        req = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method)
    except ValueError as exc:
        raise _BadInput(f"invalid --url {shown!r}: {exc}") from None
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    api_key = args.api_key or os.environ.get("EVENTBUS_API_KEY")
    if api_key:
        if any(c in api_key for c in "\r\n\0"):
            raise _BadInput("the API key holds a line break: check --api-key or EVENTBUS_API_KEY")
        if not api_key.isascii():
            raise _BadInput(
                "the API key holds characters an HTTP header cannot carry (not ASCII): check "
                "--api-key or EVENTBUS_API_KEY"
            )
        req.add_header("Authorization", f"Bearer {api_key}")
    timeout = getattr(args, "timeout", None) or timeout
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except TimeoutError:
        raise _ApiError(f"eventbus at {args.url} did not answer within {timeout:g} s") from None
    except (UnicodeEncodeError, http.client.InvalidURL) as exc:
        # a key or header that HTTP cannot carry; a URL http.client refuses
        raise _BadInput(f"cannot send the request: {exc}") from None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        if answers and _answered_by_target(exc.headers):  # the target's own error answer
            return exc.code, exc.headers, raw
        if 300 <= exc.code < 400:
            # not followed (_NoRedirects): said where to, or "301 Moved Permanently:" alone
            to = redact_url(exc.headers.get("Location") or "nowhere it named")
            raise _ApiError(
                f"{shown} answered {exc.code}, sending the request to {to}: eventbus itself "
                "does not redirect (a proxy, http to https?); give --url (or EVENTBUS_URL) the "
                "address to use",
                status=exc.code,
            ) from None
        problem: Any = None
        try:
            problem = orjson.loads(raw)
            detail = str(problem.get("detail") or problem)
        except (orjson.JSONDecodeError, AttributeError):
            problem = None
            detail = raw.decode(errors="replace")[:500]
        message = f"{exc.code} {exc.reason}: {detail}"
        raise _ApiError(message, status=exc.code, detail=detail, problem=problem) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if body and isinstance(reason, (BrokenPipeError, ConnectionResetError)):
            # The service answered 413 before reading a body over its limit and closed the
            # connection while urllib was still sending it: "cannot reach" said it was down.
            raise _ApiError(
                f"eventbus at {shown} closed the connection while the request's {len(body)} "
                "bytes were being sent: a body over its max_event_size (1 MiB by default) is "
                "refused (413) before it is read"
            ) from None
        raise _ApiError(f"cannot reach eventbus at {args.url}: {reason}") from None


def _show(args: argparse.Namespace, kind: str, body: Any) -> int:
    from eventbus.cli._output import SHOW, print_json

    if args.json:
        print_json(body, sys.stdout)
        return 0
    try:
        SHOW[kind](body, sys.stdout)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise _not_eventbus(args, f"no {exc}" if isinstance(exc, KeyError) else str(exc)) from None
    return 0


def _query(args: argparse.Namespace, **extra: Any) -> str:
    q = {
        k: getattr(args, k)
        for k in ("rule", "target", "status", "reason", "since", "until", "source", "through")
        if getattr(args, k, None) is not None
    }
    q.update({k: v for k, v in extra.items() if v is not None})
    return "?" + urllib.parse.urlencode(q, doseq=True) if q else ""


def _cmd_serve(args: argparse.Namespace) -> int:
    from eventbus.cli._logging import configure_logging, held_until_configured, replay
    from eventbus.cli._serve import serve
    from eventbus.config import load_settings

    with held_until_configured() as held:
        settings = load_settings(args.config)
    if args.host or args.port is not None:
        listen = settings.listen.model_copy(
            update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        )
        settings = settings.model_copy(update={"listen": listen})
    configure_logging(settings.log_level, settings.log_format)
    replay(held)
    serve(settings, workers=args.workers, reuse_port=args.reuse_port, config_path=args.config)
    return 0


# Attributes with a meaning of their own in CloudEvents 1.0: never extensions.
_CORE_ATTRIBUTES = frozenset(
    (
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "data",
        "data_base64",
    )
)
_WITH_OPTION = frozenset(("id", "source", "type", "subject", "time", "datacontenttype", "data"))


def _extension(text: str) -> tuple[str, str]:
    """``-e NAME=VALUE``: a CloudEvents extension attribute (argparse's ``type``), checked by
    the rules every event meets on ingest."""
    from eventbus._errors import CloudEventError
    from eventbus.cloudevents import validate

    name, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    if name in _CORE_ATTRIBUTES:
        hint = f": use --{name}" if name in _WITH_OPTION else ""
        raise argparse.ArgumentTypeError(
            f"{name!r} is a CloudEvents attribute, not an extension{hint}"
        )
    try:
        validate({"specversion": "1.0", "id": "-", "source": "-", "type": "-", name: value})
    except CloudEventError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return name, value


def _data_bytes(spec: str) -> tuple[bytes, str]:
    """The bytes ``--data`` names, and how to name where they came from in an error."""
    if spec == "-":
        return sys.stdin.buffer.read(), "--data - (standard input)"
    if spec.startswith("@"):
        path = spec[1:]
        try:
            with open(path, "rb") as file:
                return file.read(), f"--data {spec}"
        except OSError as exc:
            raise _BadInput(f"--data {spec}: cannot read {path!r}: {exc.strerror or exc}") from None
    return spec.encode(), "--data"


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    """The data part of the event: JSON (parsed) unless ``--datacontenttype`` says otherwise,
    then text, or ``data_base64`` for bytes that are not UTF-8."""
    if args.data is None:
        return {}
    raw, where = _data_bytes(args.data)
    media = (args.datacontenttype or "application/json").partition(";")[0].strip().lower()
    if media.endswith(("/json", "+json")):  # the JSON event format's test for JSON data
        from eventbus._errors import CloudEventError
        from eventbus.cloudevents import load_json

        try:
            # as the service reads it: an integer beyond 64 bits refused, not sent rounded
            return {"data": load_json(raw)}
        except orjson.JSONDecodeError as exc:
            hint = "" if args.datacontenttype else " (for text, give --datacontenttype text/plain)"
            raise _BadInput(f"{where} is not valid JSON: {exc}{hint}") from None
        except CloudEventError as exc:
            raise _BadInput(f"{where}: {exc.detail}") from None
    try:
        return {"data": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"data": raw}  # new_event sends bytes as data_base64


def _cmd_publish(args: argparse.Namespace) -> int:
    from eventbus._errors import CloudEventError
    from eventbus.cloudevents import from_http, new_event, to_http

    extensions: dict[str, Any] = {}  # as new_event's **ext
    for name, value in args.extension:
        if name in extensions:
            raise _BadInput(f"extension {name!r} is given twice (-e {name}=...)")
        extensions[name] = value
    payload = _payload(args)
    optional = {"id": args.id, "time": args.time, "datacontenttype": args.datacontenttype}
    try:
        event = new_event(
            type=args.type,
            source=args.source,
            subject=args.subject,
            max_size=_NO_LIMIT,
            **payload,
            **{k: v for k, v in optional.items() if v is not None},
            **extensions,
        )
        headers, body = to_http(event, structured=args.mode == "structured")
        # Read back as the service reads it: bytes that are not UTF-8 under a text type went
        # out in binary mode as a text body, which the service refused (400)
        from_http(headers, body, max_size=_NO_LIMIT)
    except CloudEventError as exc:
        raise _BadInput(f"invalid event: {exc.detail}") from None
    return _show(args, "accepted", _request(args, "POST", "/events", body, headers))


def _cmd_invoke(args: argparse.Namespace) -> int:
    from eventbus._errors import CloudEventError
    from eventbus.cloudevents import STRUCTURED_CONTENT_TYPE, encode, new_event

    optional = {"id": args.id, "datacontenttype": args.datacontenttype}
    try:
        event = new_event(
            type=args.type,
            source=args.source,
            subject=args.subject,
            max_size=_NO_LIMIT,
            **_payload(args),
            **{k: v for k, v in optional.items() if v is not None},
        )
        body = encode(event)
    except CloudEventError as exc:
        raise _BadInput(f"invalid event: {exc.detail}") from None
    headers = {
        "Content-Type": STRUCTURED_CONTENT_TYPE,
        "X-Eventbus-Invocation-Type": "async" if args.asynchronous else "sync",
    }
    path = f"/targets/{urllib.parse.quote(args.target, safe='')}/invoke"
    if args.reply:
        path += "?reply=true"
    status, answer_headers, raw = _send(
        args, "POST", path, body, headers, timeout=_INVOKE_TIMEOUT, answers=True
    )
    answered = _answered_by_target(answer_headers)
    if args.asynchronous or (status == 202 and not answered):  # eventbus's own: a repeat
        queued = _request_body(args, raw)
        if args.json:
            return _show(args, "accepted", queued)
        try:
            what = "not invoked, a repeat of" if queued.get("duplicate") else "queued for"
            line = f"{what} {queued['target']}: {queued['source']} {queued['id']}\n"
        except (KeyError, TypeError, AttributeError) as exc:
            raise _not_eventbus(args, f"no {exc}") from None
        sys.stdout.write(line)
        return 0
    if not answered:
        raise _not_eventbus(args, f"no {_ANSWERED_BY} header")
    content_type = answer_headers.get("Content-Type")
    try:
        duration = float(answer_headers.get("X-Eventbus-Duration-Ms", ""))
    except ValueError:
        raise _not_eventbus(args, "no X-Eventbus-Duration-Ms header") from None
    if args.json:
        answer: dict[str, Any] = {
            "status": status,
            "content_type": content_type,
            "duration_ms": duration,
            "event": {"id": event["id"], "source": event["source"]},
        }
        try:
            answer["body"] = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            try:
                answer["body"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                answer["body_base64"] = base64.b64encode(raw).decode("ascii")
        from eventbus.cli._output import print_json

        print_json(answer, sys.stdout)
        return _failed_if_error(status)
    sys.stderr.write(f"{args.target} answered {status} in {duration:g} ms\n")
    sys.stdout.buffer.write(raw)
    if raw and not raw.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")  # the prompt on a line of its own; a pipe gets the bytes
    sys.stdout.flush()
    return _failed_if_error(status)


def _failed_if_error(status: int) -> int:
    """The exit code of a function's answer: 1 for an error status (4xx, 5xx), which is shown
    as it came (it was an eventbus error message before, without its body)."""
    return EXIT_FAILED if status >= 400 else 0


def _cmd_events_list(args: argparse.Namespace) -> int:
    query = _query(args, type=args.type, limit=args.limit, after=args.after)
    return _show(args, "events", _request(args, "GET", "/events" + query))


_TRAIL_WAIT = 3.0
"""Seconds ``events show`` asks again for an event not found yet."""


def _cmd_events_show(args: argparse.Namespace) -> int:
    q = urllib.parse.urlencode({"source": args.source_, "id": args.id})
    # The trail is written once the router takes the event from the bus, a moment after its
    # 202: the README's publish then show answered 404 once, on a cold first event.
    deadline = time.monotonic() + _TRAIL_WAIT
    while True:
        try:
            answer = _request(args, "GET", f"/events/trail?{q}")
            break
        except _ApiError as exc:
            if exc.status != 404 or time.monotonic() >= deadline:
                raise
        time.sleep(0.25)
    return _show(args, "event-trail", answer)


def _cmd_dlq(args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        query = _query(args, id=args.ids or None, limit=args.limit, after=args.after)
        return _show(args, "dead-letters", _request(args, "GET", "/dead-letters" + query))
    if action == "show":
        return _show(args, "dead-letter", _request(args, "GET", f"/dead-letters/{args.id}"))
    if action == "count":
        count = _request(args, "GET", "/dead-letters/count" + _query(args))
        return _show(args, "dead-letter-count", count)
    ids: list[int] = args.ids
    if ids and (args.all or _query(args)):
        # the filters were dropped: `purge 5 --target fnn` purged dead letter 5 of another
        raise _BadInput(f"dlq {action}: give dead letters' ids or filters (or --all), not both")
    if not ids and not args.all and not _query(args):
        raise _BadInput(f"dlq {action}: give dead letters' ids, filters, or --all for every one")
    # one id by its own route (404 when it does not exist), several as the filter ?id=&id=
    one = f"/dead-letters/{ids[0]}" if len(ids) == 1 else None
    many = "/dead-letters" + ("/replay" if action == "replay" else "")
    many += _query(args, id=ids or None, all="true" if args.all else None, expect=args.expect)
    if one is not None and args.expect is not None:
        one = None  # the filter ?id= checks the number; the route of one id does not take it
    # ids by the filter: those not there are said (the answer counts, it does not refuse)
    by_filter = bool(ids) and one is None
    if action == "replay":
        path = many if one is None else f"{one}/replay"
        answer = _request(args, "POST", path, timeout=_BULK_TIMEOUT)
        code = _show(args, "replayed", answer)
        if by_filter and isinstance(answer, dict) and not answer.get("truncated"):
            missing = answer.get("missing")
            if not isinstance(missing, list):  # a service from before it said
                done = {item.get("id") for item in answer.get("replayed") or ()}
                missing = sorted(set(ids) - done)
            code = _missing(missing, "replayed") or code
        return code
    answer = _request(args, "DELETE", one or many, timeout=_BULK_TIMEOUT)
    code = _show(args, "purged", answer)
    if by_filter and isinstance(answer, dict) and isinstance(answer.get("purged"), int):
        # the answer counts, not names: how many of the ids given were not there
        unknown = len(set(ids)) - answer["purged"]
        if unknown > 0:
            sys.stderr.write(
                f"eventbus: {unknown} of the {len(set(ids))} ids given had no dead letter\n"
            )
            code = EXIT_FAILED
    return code


def _missing(ids: list[int], done: str) -> int:
    """Say on stderr which of the dead letters asked for by id were not there (a script that
    gave several ids was told "replayed 0 dead letters", exit 0); EXIT_FAILED if any."""
    if not ids:
        return 0
    listed = ", ".join(map(str, ids))
    sys.stderr.write(f"eventbus: no dead letter with id {listed}: not {done}\n")
    return EXIT_FAILED


def _cmd_retries(args: argparse.Namespace) -> int:
    query = _query(args, limit=args.limit)
    return _show(args, "retries", _request(args, "GET", f"/retries{query}"))


def _cmd_rules_reload(args: argparse.Namespace) -> int:
    try:
        answer = _request(args, "POST", "/rules/reload")
    except _ApiError as exc:
        if exc.status != 400:
            raise
        from eventbus.cli._output import print_json, printable

        if args.json and isinstance(exc.problem, dict):  # the refusal as it came, as elsewhere
            with contextlib.suppress(BrokenPipeError):
                print_json(exc.problem, sys.stdout)
        # every problem, one a line, as `eventbus rules validate` prints them
        sys.stderr.write("eventbus: rules not reloaded, the running ones stay:\n")

        sys.stderr.write("".join(f"{printable(line)}\n" for line in exc.detail.splitlines()))
        return EXIT_FAILED
    return _show(args, "reloaded", answer)


def _cmd_display(args: argparse.Namespace) -> int:
    from eventbus.cli._display import run_display

    run_display(args.host, args.port, fail_rate=args.fail_rate, secret=args.secret, seed=args.seed)
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    if (args.action == "enable") != (args.name is not None):
        raise _BadInput("give `targets enable NAME` to enable a target, or no argument to list")
    if args.action == "enable":
        name = urllib.parse.quote(args.name, safe="")
        return _show(args, "enabled", _request(args, "POST", f"/targets/{name}/enable"))
    return _show(args, "targets", _request(args, "GET", "/targets"))


def _cmd_sources(args: argparse.Namespace) -> int:
    if args.dead_letters:
        # the table shows no payload: fetched whole only for --json (each may be megabytes)
        query: dict[str, Any] = {"limit": 100 if args.limit is None else args.limit}
        if args.source is not None:
            query["source"] = args.source
        if not args.json:
            query["payload_bytes"] = 1
        path = "/sources/dead-letters?" + urllib.parse.urlencode(query)
        return _show(args, "source-dead-letters", _request(args, "GET", path))
    if args.source is not None or args.limit is not None:
        raise _BadInput("--source and --limit go with --dead-letters")
    return _show(args, "sources", _request(args, "GET", "/sources"))


def _add_publish(sub: Any) -> None:
    p = sub.add_parser("publish", help="publish one CloudEvent to a running service")
    p.add_argument("--type", required=True, help="the event's type: com.example.order.placed")
    p.add_argument("--source", required=True, help="the event's source: shop/orders")
    p.add_argument("--id", help="the event's id (default: a new UUID)")
    p.add_argument("--time", help="RFC 3339 time: 2026-01-31T12:00:00Z (default: now)")
    p.add_argument("--subject", help="the event's subject, within its source")
    p.add_argument(
        "--data",
        metavar="JSON|@FILE|-",
        help="the payload: text, @FILE to read a file, - to read standard input",
    )
    p.add_argument(
        "--datacontenttype",
        metavar="MEDIA-TYPE",
        help="the payload's media type; JSON types parse --data as JSON, others send it as text "
        "(bytes that are not UTF-8 as data_base64) (default: application/json)",
    )
    p.add_argument(
        "-e",
        "--extension",
        action="append",
        default=[],
        type=_extension,
        metavar="NAME=VALUE",
        help="an extension attribute (string value), repeatable; NAME: lowercase a-z and 0-9",
    )
    p.add_argument(
        "--mode",
        choices=("structured", "binary"),
        default="structured",
        help="HTTP content mode: the event as JSON, or attributes as ce-* headers",
    )
    _client_args(p)
    p.set_defaults(func=_cmd_publish)


def _add_invoke(sub: Any) -> None:
    p = sub.add_parser(
        "invoke",
        help="call one target directly and print its answer (or queue the call: --async)",
        description=(
            "Sends one event to TARGET through the running service, without a rule. "
            "Synchronous by default: the target is called once and its answer (an HTTP "
            "function's body; a broker's acknowledgement) goes to standard output, the status "
            "and duration to standard error; a 4xx or 5xx answer exits 1. With --async the "
            "call is queued on the bus and retried by the target's policy."
        ),
    )
    p.add_argument("target", help="the target's name, as in connectors/")
    p.add_argument("--data", help="the event's data: JSON, @FILE or - (standard input)")
    p.add_argument("--type", default="eventbus.invoke", help="the event's type")
    p.add_argument("--source", default="eventbus/cli", help="the event's source")
    p.add_argument("--id", help="the event's id (default: a new UUID)")
    p.add_argument("--subject", help="the event's subject")
    p.add_argument(
        "--datacontenttype",
        help="the data's media type (default: application/json; text/plain sends text)",
    )
    p.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="queue the call (202) instead of waiting for the answer",
    )
    p.add_argument(
        "--reply",
        action="store_true",
        help="NATS targets: send a request and print the subscriber's reply",
    )
    _client_args(p)
    p.set_defaults(func=_cmd_invoke)


def _add_dlq(sub: Any) -> None:
    p = sub.add_parser("dlq", help="inspect, replay and purge dead letters")
    dl = p.add_subparsers(dest="action", required=True)
    helps = {
        "list": "dead letters, newest first, one page at a time",
        "show": "one dead letter and every attempt (--json: with its event and payload)",
        "count": "how many dead letters the filters select, and the options that replay or "
        "purge exactly those",
        "replay": "deliver dead letters again, with a fresh attempt budget",
        "purge": "delete dead letters",
    }
    for action, text in helps.items():
        a = dl.add_parser(action, help=text, description=text)
        if action == "show":
            a.add_argument("id", type=int, help="the dead letter's id")
        else:
            if action in ("replay", "purge"):
                a.add_argument(
                    "ids",
                    type=int,
                    nargs="*",
                    metavar="ID",
                    help="dead letters' ids (else: the filters)",
                )
                a.add_argument("--all", action="store_true", help="every dead letter")
                a.add_argument(
                    "--expect",
                    type=_bounded(0, 2**63 - 1),
                    metavar="N",
                    help="act only if exactly N dead letters match (as `dlq count` said), "
                    "else nothing is done",
                )
            _filter_args(a)
        if action == "list":
            a.add_argument(
                "--id",
                dest="ids",
                type=int,
                action="append",
                help="only the dead letter of this id (repeat it for several)",
            )
            a.add_argument(
                "--limit", type=_PAGE, default=100, help="dead letters per page (1-1000)"
            )
            a.add_argument("--after", type=int, help="page: the last id of the previous page")
        _client_args(a)
        a.set_defaults(func=_cmd_dlq)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eventbus", description="A self-hosted event bus and trigger router.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the service (embedded NATS + PostgreSQL by default)")
    p.add_argument(
        "--config",
        default=os.environ.get("EVENTBUS_CONFIG") or None,  # empty is as unset
        help="settings YAML ($EVENTBUS_CONFIG when set; else built-in defaults + EVENTBUS_* env)",
    )
    p.add_argument(
        "--workers",
        type=_bounded(1, 64),
        default=1,
        help="worker processes sharing the bus (1-64)",
    )
    p.add_argument("--host", help="listen on this address (default: listen.host of the settings)")
    p.add_argument(
        "--port",
        type=_bounded(1, 65535),
        help="listen on this port (default: listen.port of the settings)",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)

    _add_publish(sub)
    _add_invoke(sub)

    p = sub.add_parser("rules", help="validate and test routing rules; reload a running service's")
    rules = p.add_subparsers(dest="rules_command", required=True)
    _rules.register(rules)
    p = rules.add_parser(
        "reload", help="ask the running service to load its rule files again (admin API)"
    )
    _client_args(p)
    p.set_defaults(func=_cmd_rules_reload)

    p = sub.add_parser("events", help="inspect the audit trail")
    ev = p.add_subparsers(dest="events_command", required=True)
    listing = ev.add_parser(
        "list",
        help="accepted events, newest first, one page at a time",
        description="Accepted events, newest first, from the audit trail; "
        "`events show SOURCE ID` gives one whole.",
    )
    listing.add_argument("--source", help="only events from this source")
    listing.add_argument("--type", help="only events of this type")
    listing.add_argument(
        "--since",
        help="stored on the bus at or after (ISO 8601, UTC if no zone; or a duration ago: 6h)",
    )
    listing.add_argument(
        "--until",
        help="stored on the bus before (ISO 8601, UTC if no zone; or a duration ago: 6h)",
    )
    listing.add_argument("--limit", type=_PAGE, default=100, help="events per page (1-1000)")
    listing.add_argument("--after", help="page: the `more: --after` value of the previous page")
    _client_args(listing)
    listing.set_defaults(func=_cmd_events_list)
    show = ev.add_parser(
        "show",
        help="an event's trail: matches and delivery attempts (--json: with its reply links)",
    )
    show.add_argument("source_", metavar="SOURCE", help="the event's source")
    show.add_argument("id", help="the event's id")
    _client_args(show)
    show.set_defaults(func=_cmd_events_show)

    _add_dlq(sub)

    p = sub.add_parser("retries", help="deliveries waiting for their next attempt")
    rt = p.add_subparsers(dest="retries_command", required=True)
    a = rt.add_parser("list", help="pending retries, the next due first")
    a.add_argument("--limit", type=_PAGE, default=100, help="at most this many (1-1000)")
    a.add_argument("--target", help="only this target's retries")
    _client_args(a)
    a.set_defaults(func=_cmd_retries)

    p = sub.add_parser("display", help="a function endpoint that prints what it receives")
    p.add_argument("--host", default="127.0.0.1", help="listen on this address")
    p.add_argument("--port", type=_bounded(1, 65535), default=9000, help="listen on this port")
    p.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="answer 503 to this fraction (0 to 1)"
    )
    p.add_argument("--secret", help="verify Standard Webhooks signatures with this secret")
    p.add_argument("--seed", type=int, help="seed of --fail-rate's random choices")
    p.set_defaults(func=_cmd_display)

    p = sub.add_parser(
        "targets", help="show each target's circuit, retries waiting and whether it is disabled"
    )
    # Positionals, not a subcommand: a subcommand's defaults overwrote the options given
    # before it (`targets --url X enable fn` went to the default URL).
    p.add_argument(
        "action",
        nargs="?",
        choices=("enable",),
        help="enable: deliver again to a target disabled after it answered 410 Gone",
    )
    p.add_argument("name", nargs="?", help="the target to enable")
    _client_args(p)
    p.set_defaults(func=_cmd_targets)
    p = sub.add_parser("sources", help="show each source's state, last event, errors and lag")
    p.add_argument(
        "--dead-letters", action="store_true", help="input that became no event, newest first"
    )
    p.add_argument("--source", help="with --dead-letters: only this source's")
    p.add_argument(
        "--limit", type=_PAGE, help="with --dead-letters: at most this many (1-1000, default 100)"
    )
    _client_args(p)
    p.set_defaults(func=_cmd_sources)
    return parser


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


MAX_PAGE = 1000
"""The most items the admin API lists in one answer (its ``limit``)."""
_PAGE = _bounded(1, MAX_PAGE)


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


# Exit status of a command whose reader went away (``| head -1``), as if SIGPIPE had ended it.
EXIT_BROKEN_PIPE = 141


def _not_text(argv: list[str]) -> str:
    """Which argument is not text (bytes that are not UTF-8, as Python keeps them), as
    ``--target: `` (or ``argument 3: ``); empty when none is."""
    for i, arg in enumerate(argv):
        if any("\udc80" <= c <= "\udcff" for c in arg):
            before = argv[i - 1] if i else ""
            name = before if before.startswith("-") else f"argument {i + 1}"
            return f"{name}: not UTF-8 text: "
    return ""


def main(argv: list[str] | None = None) -> int:
    # Closed (>&-, <&-): written to nowhere and read as empty rather than a traceback.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    if sys.stdin is None:
        sys.stdin = open(os.devnull)  # noqa: SIM115
    # What the terminal cannot show is escaped rather than a UnicodeEncodeError's traceback.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "url", "") is None:
            args.url = _datadir.default_url()
        return int(args.func(args))
    except BrokenPipeError:
        # the reader left: nothing more to say to it (and no traceback on exit either)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except _BadInput as exc:
        sys.stderr.write(f"eventbus: {exc}\n")
        return EXIT_BAD_INPUT
    except UnicodeError as exc:
        # an argument the shell passed as bytes that are not text: named, as others are
        sys.stderr.write(f"eventbus: {_not_text(sys.argv[1:] if argv is None else argv)}{exc}\n")
        return EXIT_BAD_INPUT
    except (_ApiError, EventBusError) as exc:
        from eventbus.cli._output import print_json, printable

        problem = getattr(exc, "problem", None)
        if getattr(args, "json", False) and isinstance(problem, dict):
            with contextlib.suppress(BrokenPipeError):  # (| head: the reader left)
                print_json(problem, sys.stdout)  # a script reads the refusal as it reads answers
        from eventbus.config import WORKER_ENV

        if os.environ.get(WORKER_ENV) is not None and logging.getLogger().handlers:
            # a worker of serve --workers N: a line of the log, with its time, level and
            # number, as its others (a bare "eventbus: ..." among JSON lines named no worker)
            logging.getLogger("eventbus").error("%s", printable(str(exc)))
        else:
            sys.stderr.write(f"eventbus: {printable(str(exc))}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # standard output unusable (a full disk, closed): one line, not a traceback
        sys.stderr.write(f"eventbus: {exc.strerror or exc}\n")
        return EXIT_FAILED
