"""Standard Webhooks signing for outgoing deliveries (https://www.standardwebhooks.com/).

Place in the pipeline: the HTTP target signs each request body just before it is sent, so a
function can prove the request came from this bus and was not replayed. ``verify_webhook`` is the
receiving side, for users' functions and for tests.

Headers: ``webhook-id`` (the CloudEvent id, percent-encoded as the ``ce-id`` header carries it:
see :func:`webhook_id`), ``webhook-timestamp`` (unix seconds) and ``webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``. A secret written as ``whsec_<base64>``
is the base64 of the HMAC key, as the spec serializes it; any other secret is used as UTF-8
bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from eventbus._errors import CloudEventError, ConfigError
from eventbus._rfc3339 import unix_seconds
from eventbus.cloudevents import header_value

__all__ = ["decode_secret", "sign_webhook", "signature", "verify_webhook", "webhook_id"]

_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """Return the HMAC key behind ``secret``.

    Raises ``ConfigError`` if the secret is empty or its ``whsec_`` part is not valid base64.
    """
    if not secret:
        raise ConfigError("webhook secret is empty")
    if not secret.startswith(_PREFIX):
        return secret.encode()
    try:
        key = base64.b64decode(secret[len(_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ConfigError("webhook secret after 'whsec_' is not valid base64") from exc
    if not key:
        raise ConfigError("webhook secret after 'whsec_' is empty")
    return key


def webhook_id(event_id: str) -> str:
    """The ``webhook-id`` of a delivery: the event's id as the ``ce-id`` header carries it.

    Percent-encoding (as the CloudEvents HTTP binding does) keeps the header ASCII, so every
    receiver reads back the string that was signed: ASGI servers, among others, decode header
    bytes as Latin-1, and a raw UTF-8 id would reach them altered. ASCII ids without space,
    ``"`` or ``%`` are unchanged.
    """
    return header_value(event_id, percent=True)


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` value for ``body`` under the raw HMAC ``key``."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value (``v1,<base64>``) for one request.

    Raises ``ConfigError`` if ``secret`` is unusable (see ``decode_secret``).
    """
    return signature(decode_secret(secret), msg_id, timestamp, body)


def _reject(detail: str) -> CloudEventError:
    return CloudEventError(detail, status=401, title="Invalid webhook signature")


def verify_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance: float = 300
) -> None:
    """Check a signed request: returns None if one ``v1`` signature matches and the timestamp is
    within ``tolerance`` seconds of now.

    ``headers`` may use any letter case; ``body`` must be the raw bytes as received.
    Raises ``CloudEventError`` (status 401) naming the reason when the request is not authentic,
    and ``ConfigError`` if ``secret`` itself is unusable.
    """
    key = decode_secret(secret)
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        raw_timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise _reject(f"missing {exc.args[0]} header") from None
    timestamp = unix_seconds(raw_timestamp.strip())
    if timestamp is None:
        raise _reject(f"webhook-timestamp is not Unix seconds: {raw_timestamp.strip()[:40]!r}")
    if abs(time.time() - timestamp) > tolerance:
        raise _reject(f"webhook-timestamp {timestamp} is more than {tolerance:g}s from now")
    expected = signature(key, msg_id, timestamp, body).encode()
    # The header may carry several space-separated signatures (key rotation); any v1 match
    # counts. Compared as bytes: compare_digest refuses str with non-ASCII (a TypeError).
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return
    raise _reject("no webhook-signature matches the body")
