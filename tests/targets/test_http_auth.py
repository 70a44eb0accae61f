"""HTTP targets authenticated: Basic, API key, bearer and OAuth 2.0 client credentials, over
mutual TLS, against a real https function (the receiver with a trustme certificate) and a real
token endpoint of the test's own that counts its requests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web

import eventbus.sources  # noqa: F401  (registers every connector type)
from eventbus import _oauth as oauth_module
from eventbus._errors import MAX_ERROR_CHARS, ConfigError
from eventbus._oauth import OAuth2Client
from eventbus.config import OAuth2Spec, load_connectors
from eventbus.targets import HttpTarget, HttpTargetSpec, Outcome
from eventbus.targets import _http as http_module
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.wait import eventually

CLIENT_SECRET = "cl!ent/secret:42"  # characters that must be form-encoded in Basic credentials
PASSWORD = "pa55-w0rd-Basic"
API_KEY = "k3y-0f-the-api-xyz"
BEARER = "bearer-t0ken-abc"
SECRETS = (CLIENT_SECRET, PASSWORD, API_KEY, BEARER)
LONG_TOKEN = "L0ng-" + "t0ken-" * 12  # long enough to cross an error's cut


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_context(pki: Pki, *, client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
async def function(pki: Pki) -> AsyncIterator[Receiver]:
    """An https function that requires a client certificate (mutual TLS)."""
    async with Receiver(ssl=_server_context(pki, client_cert=True)) as receiver:
        yield receiver


class TokenEndpoint:
    """An OAuth 2.0 token endpoint: client credentials in HTTP Basic; tokens tok-1, tok-2 ..."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.expires_in: float | str | None = 3600
        self.pieces = False  # the answer written in two pieces, 50 ms apart
        self.padding = 0  # bytes of filler in the answer
        self.revoked = False
        self.delay = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post())
        user, _, password = (
            base64.b64decode(request.headers.get("Authorization", "Basic ").removeprefix("Basic "))
            .decode()
            .partition(":")
        )
        self.requests.append(
            {**{k: str(v) for k, v in form.items()}, "id": unquote(user), "pw": unquote(password)}
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.revoked or unquote(password) != CLIENT_SECRET:
            return web.json_response(
                # echoing what it was sent, as some do: eventbus must not repeat it
                {
                    "error": "invalid_client",
                    "error_description": f"client revoked (sent {unquote(password)}, {password}, "
                    f"{request.headers.get('Authorization')})",
                },
                status=401,
            )
        body: dict[str, Any] = {"access_token": f"tok-{len(self.requests)}", "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if self.padding:
            body["padding"] = "x" * self.padding
        if not self.pieces:
            return web.json_response(body)
        data = json.dumps(body).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await asyncio.sleep(0.05)
        await response.write(data[len(data) // 2 :])
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/token"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def idp() -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


def _event(i: int = 0) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "/t", "type": "t", "data": {"i": i}}


def _spec(
    function: Receiver, pki: Pki, auth: dict[str, Any] | None, **extra: Any
) -> HttpTargetSpec:
    tls = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
    raw: dict[str, Any] = {"name": "fn", "url": function.url("/fn"), "tls": tls, **extra}
    if auth is not None:
        raw["auth"] = auth
    return HttpTargetSpec.model_validate(raw)


async def _deliver(target: HttpTarget, i: int = 0) -> Outcome:
    event = _event(i)
    return await target.deliver(event, event, is_cloudevent=True, attempt=1)


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        (
            {"basic": {"username": "eventbus", "password": PASSWORD}},
            "Authorization",
            "Basic " + base64.b64encode(f"eventbus:{PASSWORD}".encode()).decode(),
        ),
        ({"api_key": {"header": "X-Fn-Key", "value": API_KEY}}, "X-Fn-Key", API_KEY),
        ({"bearer": BEARER}, "Authorization", f"Bearer {BEARER}"),
    ],
)
async def test_static_credentials_arrive_over_mutual_tls(
    function: Receiver,
    pki: Pki,
    auth: dict[str, Any],
    header: str,
    expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="eventbus")
    async with HttpTarget(_spec(function, pki, auth, headers={"X-Static": "yes"})) as target:
        outcome = await _deliver(target)
    assert outcome.delivered, outcome.error
    (request,) = function.requests
    assert request.headers[header] == expected
    assert request.headers["X-Static"] == "yes"
    assert not any(s in caplog.text for s in SECRETS)


@pytest.mark.parametrize(
    "auth",
    [
        {"basic": {"username": "eventbus", "password": PASSWORD}},
        {"api_key": {"header": "X-Fn-Key", "value": API_KEY}},
        {"bearer": BEARER},
        "oauth2",
    ],
)
async def test_a_function_echoing_the_credentials_has_them_masked_in_the_error(
    function: Receiver,
    pki: Pki,
    idp: TokenEndpoint,
    auth: dict[str, Any] | str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The function's answer goes into the attempt's error (audit trail, dead letters): one
    # that echoes its request wrote the credentials there as sent.
    monkeypatch.setenv("FN_TOKEN", LONG_TOKEN)
    spec = _spec(
        function,
        pki,
        _oauth(idp) if auth == "oauth2" else auth,
        headers={"X-Auth-Token": {"env": "FN_TOKEN"}, "X-Team": "billing"},
    )
    async with HttpTarget(spec) as target:
        assert (await _deliver(target)).delivered
        headers = function.requests[0].headers
        echo = "\n".join(f"{k}: {v}" for k, v in headers.items())
        function.respond(Response(400, body=echo.encode()))
        outcome = await _deliver(target, 1)
        assert outcome.error is not None
        assert "X-Team: billing" in outcome.error and "X-Auth-Token: ***" in outcome.error
        authorization = headers.get("Authorization", "")
        credentials = [*SECRETS, LONG_TOKEN, "tok-1", authorization.partition(" ")[2]]
        assert not [c for c in credentials if c and c in outcome.error], outcome.error
        # a long one across the cut of the answer (1024 bytes, then masked): its start was
        # kept in the error
        token = headers["X-Auth-Token"]
        pad = MAX_ERROR_CHARS - len(token) // 2 - len("got ")
        function.respond(Response(400, body=b"x" * pad + f"got {token}".encode()))
        cut = await _deliver(target, 2)
        assert cut.error is not None and token[:6] not in cut.error, cut.error


HEADER_TOKEN = "h3ader-T0ken-from-env"
COOKIE = "session=c00kie-from-file"
LITERAL = "literal-Cred3ntial"


async def test_header_values_are_secrets_from_env_and_file(
    function: Receiver, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="eventbus")
    cookie = tmp_path / "cookie"
    cookie.write_text(COOKIE + "\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "t.yaml").write_text(
        "targets:\n"
        "  - name: fn\n"
        "    type: http\n"
        f"    url: {function.url('/fn')}\n"
        f"    tls: {{ca: {pki.ca}, cert: {pki.client_cert}, key: {pki.client_key}}}\n"
        "    headers:\n"
        "      X-Team: billing\n"
        "      X-Api-Token: {env: FN_TOKEN}\n"
        f"      Cookie: {{file: {cookie}}}\n"
        f"      X-Auth-Extra: {LITERAL}\n"
    )
    spec = load_connectors(tmp_path / "c", env={"FN_TOKEN": HEADER_TOKEN}).targets["fn"]
    assert isinstance(spec, HttpTargetSpec)
    # A plain header written in the file is fine; a credential is not.
    assert [r.getMessage() for r in caplog.records if "literal" in r.getMessage()] == [
        f"{tmp_path}/c/t.yaml:10: targets.0.headers.X-Auth-Extra: a secret given as a literal "
        "(target 'fn'); use {env: NAME} or {file: PATH}"
    ]
    async with HttpTarget(spec) as target:
        outcome = await _deliver(target)
    assert outcome.delivered, outcome.error
    (request,) = function.requests
    assert request.headers["X-Team"] == "billing"
    assert request.headers["X-Api-Token"] == HEADER_TOKEN
    assert request.headers["Cookie"] == COOKIE
    assert request.headers["X-Auth-Extra"] == LITERAL
    shown = repr(spec) + spec.model_dump_json() + caplog.text
    assert not any(v in shown for v in (HEADER_TOKEN, COOKIE, LITERAL, "billing"))


async def test_without_the_client_certificate_the_function_is_not_reached(
    function: Receiver, pki: Pki
) -> None:
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": function.url("/fn"), "tls": {"ca": str(pki.ca)}}
    )
    async with HttpTarget(spec) as target:
        outcome = await _deliver(target)
    assert not outcome.delivered and function.requests == []


async def test_a_server_alert_refusing_the_client_is_named_and_final(pki: Pki) -> None:
    # A server that wants a client certificate ends the handshake with an alert saying so:
    # the delivery said "server disconnected before answering" and was retried until it was
    # dead-lettered. (asyncio's TLS servers close without the alert; OpenSSL's own send it.)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    context = _server_context(pki, client_cert=True)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            with tls, contextlib.suppress(OSError):
                try:
                    tls.do_handshake()
                except ssl.SSLError:
                    # the alert is out; closed gracefully, what the client sent read first
                    # (closed with it unread, the kernel resets the connection, alert unread)
                    tls.shutdown(socket.SHUT_WR)
                    while tls.recv(65536):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": f"https://127.0.0.1:{port}/fn", "tls": {"ca": str(pki.ca)}}
    )
    try:
        async with HttpTarget(spec) as target:
            outcome = await _deliver(target)
    finally:
        done.set()
        await asyncio.to_thread(thread.join, 10)
        listener.close()
    assert outcome.error is not None and not outcome.retryable, outcome
    assert "refused the TLS connection: tlsv13 alert certificate required" in outcome.error


async def test_a_function_certificate_from_another_ca_is_refused_for_good(
    function: Receiver, pki: Pki
) -> None:
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": function.url("/fn"), "tls": {"ca": str(pki.other_ca)}}
    )
    async with HttpTarget(spec) as target:
        outcome = await _deliver(target)
    assert not outcome.delivered and not outcome.retryable
    assert outcome.error is not None and outcome.error.startswith("TLS certificate rejected")


def _oauth(idp: TokenEndpoint, **extra: Any) -> dict[str, Any]:
    return {
        "oauth2": {
            "token_url": idp.url,
            "client_id": "eventbus",
            "client_secret": CLIENT_SECRET,
            "scopes": ["events.write", "events.read"],
            "audience": "https://fn.test",
            **extra,
        }
    }


async def test_500_concurrent_deliveries_fetch_one_token(
    function: Receiver, pki: Pki, idp: TokenEndpoint
) -> None:
    idp.delay = 0.2  # every delivery is waiting by the time the token comes
    async with HttpTarget(_spec(function, pki, _oauth(idp), concurrency=512)) as target:
        outcomes = await asyncio.gather(*(_deliver(target, i) for i in range(500)))
    assert all(o.delivered for o in outcomes), {o.error for o in outcomes}
    assert len(idp.requests) == 1
    (token_request,) = idp.requests
    assert token_request == {
        "grant_type": "client_credentials",
        "scope": "events.write events.read",
        "audience": "https://fn.test",
        "id": "eventbus",
        "pw": CLIENT_SECRET,
    }
    assert {r.headers["Authorization"] for r in function.requests} == {"Bearer tok-1"}


@pytest.mark.parametrize("lifetime", [1, "1", None])
async def test_a_token_is_renewed_before_it_expires(
    function: Receiver,
    pki: Pki,
    idp: TokenEndpoint,
    lifetime: float | str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # renewed at 90 % of its life; a string lifetime (as some providers send) was taken for
    # none, and a token without one was kept for ever (a Kafka connection never renewed it)
    idp.expires_in = lifetime
    monkeypatch.setattr(oauth_module, "TOKEN_TTL", 1.0)
    async with HttpTarget(_spec(function, pki, _oauth(idp))) as target:
        assert (await _deliver(target, 1)).delivered
        assert (await _deliver(target, 2)).delivered
        await asyncio.sleep(1.0)
        assert (await _deliver(target, 3)).delivered
    assert len(idp.requests) == 2
    tokens = [r.headers["Authorization"] for r in function.requests]
    assert tokens == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]


@pytest.mark.parametrize("padding", [0, 200_000])
async def test_a_token_answer_is_read_whole_however_it_arrives(
    function: Receiver, pki: Pki, idp: TokenEndpoint, padding: int
) -> None:
    # read(n) returned the first piece only: "no usable access_token" on every delivery
    idp.pieces, idp.padding = True, padding
    async with HttpTarget(_spec(function, pki, _oauth(idp))) as target:
        outcome = await _deliver(target)
    if padding:
        assert not outcome.delivered and outcome.retryable
        assert "larger than 65536 bytes" in (outcome.error or ""), outcome
    else:
        assert outcome.delivered, outcome.error
        assert [r.headers["Authorization"] for r in function.requests] == ["Bearer tok-1"]


async def test_a_401_fetches_one_new_token_and_sends_again(
    function: Receiver, pki: Pki, idp: TokenEndpoint
) -> None:
    async with HttpTarget(_spec(function, pki, _oauth(idp))) as target:
        function.script(401)
        outcome = await _deliver(target)
        assert outcome.delivered, outcome.error
        tokens = [r.headers["Authorization"] for r in function.requests]
        assert tokens == ["Bearer tok-1", "Bearer tok-2"]
        # A function that keeps refusing gets one retry per attempt, not a loop.
        function.reset()
        function.respond(Response(401, body=b"who are you"))
        outcome = await _deliver(target)
    assert not outcome.delivered and outcome.status == 401 and not outcome.retryable
    assert len(function.requests) == 2 and len(idp.requests) == 3


async def test_one_attempt_with_a_token_keeps_to_the_timeout(
    function: Receiver, pki: Pki, idp: TokenEndpoint
) -> None:
    # Token, request, new token, request again: each had the whole timeout (6 s for a 2 s one).
    idp.delay = 0.8
    async with HttpTarget(_spec(function, pki, _oauth(idp), timeout=2)) as target:
        function.script(Response(401, delay=0.8), Response(204, delay=0.8))
        outcome = await _deliver(target)  # it came at 3.2 s, delivered
    assert outcome.timed_out and outcome.error == "timeout after 2s", outcome


async def test_a_revoked_client_fails_for_good_with_the_endpoints_reason(
    function: Receiver, pki: Pki, idp: TokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="eventbus")
    idp.revoked = True
    async with HttpTarget(_spec(function, pki, _oauth(idp), concurrency=64)) as target:
        outcomes = await asyncio.gather(*(_deliver(target, i) for i in range(50)))
    assert function.requests == []
    assert {o.retryable for o in outcomes} == {False}
    assert {o.error for o in outcomes} == {
        f"HTTP target 'fn': OAuth2 token endpoint {idp.url} refused client 'eventbus': "
        "HTTP 401 invalid_client client revoked (sent ***, ***, Basic ***)"
    }
    assert len(idp.requests) == 1  # the waiting deliveries share the refusal
    assert CLIENT_SECRET not in caplog.text


async def test_an_unreachable_token_endpoint_is_retried(function: Receiver, pki: Pki) -> None:
    auth = {
        "oauth2": {
            "token_url": "http://127.0.0.1:1/token",
            "client_id": "c",
            "client_secret": CLIENT_SECRET,
        }
    }
    async with HttpTarget(_spec(function, pki, auth)) as target:
        outcome = await _deliver(target)
    assert not outcome.delivered and outcome.retryable
    assert outcome.error is not None and "OAuth2 token endpoint" in outcome.error
    assert CLIENT_SECRET not in outcome.error


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_client_secret_sent_over_plain_http_is_warned_about(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = OAuth2Spec.model_validate(
        {
            "token_url": f"{scheme}://idp.test/token",
            "client_id": "c",
            "client_secret": {"env": "HOME"},
        }
    )
    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        OAuth2Client(spec, "HTTP target 'fn'", 5.0)
    warned = [r.getMessage() for r in caplog.records]
    expected = ["HTTP target 'fn': the OAuth2 client secret is sent over plain http to idp.test"]
    assert warned == (expected if scheme == "http" else [])


def test_bad_auth_blocks_name_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "targets:\n"
        "  - name: two\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    auth: {bearer: x, basic: {username: u, password: p}}\n"
        "  - name: none\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    auth: {}\n"
        "  - name: header\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    auth: {api_key: {header: 'X Bad', value: {env: K}}}\n"
        "  - name: framing\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    auth: {api_key: {header: expect, value: chunked}}\n"
        "  - name: oauth\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    auth:\n"
        "      oauth2: {token_url: ftp://idp/, client_id: c, client_secret: {env: CS}}\n"
        "  - name: headers\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    headers: {X-Team: billing, X-Fn-Key: {env: FN_KEY}}\n"
        "  - name: userinfo\n"
        "    type: http\n"
        "    url: https://fn.test/\n"
        "    auth:\n"
        "      oauth2: {token_url: 'https://u:pw-in-url@idp/', client_id: c, client_secret: s}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_connectors(tmp_path, env={"K": "v", "CS": "v"})
    lines = str(info.value).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "t.yaml:5: targets.0.auth: Value error, write exactly one of basic, api_key, bearer, "
        "oauth2 (got basic, bearer) (target 'two')",
        "t.yaml:9: targets.1.auth: Value error, write exactly one of basic, api_key, bearer, "
        "oauth2 (target 'none')",
        "t.yaml:13: targets.2.auth.api_key.header: String should match pattern "
        "'^[!#$%&'*+.^_`|~0-9A-Za-z-]+$' (target 'header')",
        "t.yaml:17: targets.3.auth.api_key.header: Value error, 'expect' is a header "
        "the client or eventbus writes itself (target 'framing')",
        "t.yaml:22: targets.4.auth.oauth2.token_url: String should match pattern '^https?://' "
        "(target 'oauth')",
        "t.yaml:26: targets.5.headers.X-Fn-Key: Value error, environment variable FN_KEY is not "
        "set and no default is given (target 'headers')",
        "t.yaml:31: targets.6.auth.oauth2.token_url: Value error, credentials in the token_url "
        "are not sent: the client_id and client_secret authenticate the request "
        "(target 'userinfo')",
    ]
    assert "pw-in-url" not in str(info.value)


def test_auth_and_headers_may_not_both_set_a_header_and_tls_needs_https() -> None:
    spec = HttpTargetSpec.model_validate(
        {
            "name": "fn",
            "url": "https://fn.test/",
            "headers": {"authorization": "Bearer other"},
            "auth": {"bearer": BEARER},
        }
    )
    with pytest.raises(ConfigError, match="'Authorization' is set by both headers and auth"):
        HttpTarget(spec)
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": "http://fn.test/", "tls": {"ca": "/nope.pem"}}
    )
    with pytest.raises(ConfigError, match="HTTP target 'fn': tls needs an https:// url"):
        HttpTarget(spec)
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": "https://fn.test/", "tls": {"ca": "/nope.pem"}}
    )
    with pytest.raises(ConfigError, match=r"HTTP target 'fn': tls\.ca /nope\.pem: No such file"):
        HttpTarget(spec)


def test_a_credential_with_a_line_break_is_refused_without_showing_it() -> None:
    spec = HttpTargetSpec.model_validate(
        {"name": "fn", "url": "https://fn.test/", "auth": {"bearer": {"env": "TOKEN"}}},
        context={"env": {"TOKEN": BEARER + "\r\nX-Injected: yes"}},
    )
    with pytest.raises(ConfigError, match="'Authorization' contains a line break") as info:
        HttpTarget(spec)
    assert BEARER not in str(info.value)


async def test_an_invocation_whose_pool_fills_while_its_token_comes_is_answered_busy(
    function: Receiver, pki: Pki, idp: TokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool was looked at before the token was fetched: one that filled meanwhile had the
    # invocation wait for a connection up to its whole timeout, and only then answered busy.
    monkeypatch.setattr(http_module, "CONNECTION_LIMIT", 1)  # the loop's pool: made below
    idp.delay = 0.5
    async with Receiver() as slow:
        slow.respond(Response(204, delay=3))
        hog_spec = HttpTargetSpec(name="hog", url=slow.url("/hog"), timeout=10)
        async with (
            HttpTarget(_spec(function, pki, _oauth(idp), timeout=5)) as target,
            HttpTarget(hog_spec) as hog,
        ):
            event = _event()
            calling = asyncio.create_task(target.invoke(event, event, is_cloudevent=True))
            await eventually(lambda: bool(idp.requests), what="the invocation asking a token")
            hogging = asyncio.create_task(hog.deliver(event, event, is_cloudevent=True, attempt=1))
            await slow.wait_for(1)  # the pool's one connection taken
            answer = await calling
            hogging.cancel()
    assert answer.busy and answer.outcome.unsent, answer
    assert answer.outcome.duration_ms < 2500, answer.outcome  # not at its 5 s timeout
    assert function.requests == []
