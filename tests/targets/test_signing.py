"""Standard Webhooks signing and verification: pure code, no servers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from eventbus._errors import CloudEventError, ConfigError
from eventbus.targets import sign_webhook, verify_webhook

# The example published with the Standard Webhooks reference libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers_for(
    secret: str, body: bytes, *, msg_id: str = "evt-1", ts: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_webhook(secret, msg_id, ts, body),
    }


def test_spec_vector() -> None:
    assert sign_webhook(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_whsec_secret_is_base64_key_computed_independently() -> None:
    key = b"independent key bytes"
    secret = "whsec_" + base64.b64encode(key).decode()
    digest = hmac.new(key, b"id-9.1700000000.hello", hashlib.sha256).digest()
    assert (
        sign_webhook(secret, "id-9", 1700000000, b"hello")
        == "v1," + base64.b64encode(digest).decode()
    )


def test_raw_secret_is_used_as_utf8_bytes() -> None:
    digest = hmac.new(b"plain-secret", b"a.1.b", hashlib.sha256).digest()
    assert sign_webhook("plain-secret", "a", 1, b"b") == "v1," + base64.b64encode(digest).decode()


def test_verify_accepts_signed_request_in_any_header_case() -> None:
    body = b'{"x":1}'
    headers = {k.upper(): v for k, v in headers_for(SPEC_SECRET, body).items()}
    verify_webhook(SPEC_SECRET, headers, body)


def test_verify_accepts_a_timestamp_with_spaces_around_it() -> None:
    body = b"payload"
    headers = headers_for(SPEC_SECRET, body)
    headers["webhook-timestamp"] = f" {headers['webhook-timestamp']} "
    verify_webhook(SPEC_SECRET, headers, body)


def test_verify_accepts_one_matching_signature_among_several() -> None:
    body = b"payload"
    headers = headers_for(SPEC_SECRET, body)
    headers["webhook-signature"] = "v1,AAAA v1a,BBBB " + headers["webhook-signature"]
    verify_webhook(SPEC_SECRET, headers, body)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.pop("webhook-id"), "missing webhook-id"),
        (lambda h: h.pop("webhook-timestamp"), "missing webhook-timestamp"),
        (lambda h: h.pop("webhook-signature"), "missing webhook-signature"),
        (lambda h: h.update({"webhook-timestamp": "soon"}), "not Unix seconds"),
        # an OverflowError and a TypeError, not a 401
        (lambda h: h.update({"webhook-timestamp": "9" * 400}), "not Unix seconds"),
        (lambda h: h.update({"webhook-timestamp": " +1_7"}), "not Unix seconds"),
        (lambda h: h.update({"webhook-signature": "v1,\u00e9"}), "no webhook-signature matches"),
        (lambda h: h.update({"webhook-id": "other"}), "no webhook-signature matches"),
        (lambda h: h.update({"webhook-signature": "v2,abc"}), "no webhook-signature matches"),
    ],
)
def test_verify_rejects_bad_headers(mutate: object, reason: str) -> None:
    body = b"payload"
    headers = headers_for(SPEC_SECRET, body)
    mutate(headers)  # type: ignore[operator]
    with pytest.raises(CloudEventError, match=reason) as info:
        verify_webhook(SPEC_SECRET, headers, body)
    assert info.value.status == 401


def test_verify_rejects_tampered_body_and_wrong_secret() -> None:
    headers = headers_for(SPEC_SECRET, b"original")
    with pytest.raises(CloudEventError, match="no webhook-signature matches"):
        verify_webhook(SPEC_SECRET, headers, b"tampered")
    other = "whsec_" + base64.b64encode(b"another key").decode()
    with pytest.raises(CloudEventError, match="no webhook-signature matches"):
        verify_webhook(other, headers, b"original")


@pytest.mark.parametrize("offset", [-301, 301])
def test_verify_rejects_timestamp_outside_tolerance(offset: int) -> None:
    headers = headers_for(SPEC_SECRET, b"x", ts=int(time.time()) + offset)
    with pytest.raises(CloudEventError, match="from now"):
        verify_webhook(SPEC_SECRET, headers, b"x")
    verify_webhook(SPEC_SECRET, headers, b"x", tolerance=400)


@pytest.mark.parametrize(
    ("secret", "reason"),
    [("", "empty"), ("whsec_", "empty"), ("whsec_not*base64!", "not valid base64")],
)
def test_unusable_secret_is_a_config_error(secret: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        sign_webhook(secret, "id", 1, b"")
    with pytest.raises(ConfigError, match=reason):
        verify_webhook(secret, headers_for(SPEC_SECRET, b""), b"")
