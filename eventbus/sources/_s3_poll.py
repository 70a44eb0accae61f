"""The ``s3-poll`` source: new or changed objects in an S3-compatible bucket become events.

    bucket listing (every ``interval`` s) ─> compare with checkpoints ─> ctx.emit ─> checkpoint

For buckets that cannot send notifications (or whose notifications cannot reach us). Each
object's ETag and LastModified are checkpointed (key ``o:<object key>``) after its event is
on the bus, so a restart emits nothing twice and misses nothing; a crash between the two
re-emits that one object (at-least-once). Events have the shape of the S3 adapter's
``ObjectCreated:Put`` events (one mapping, in ``eventbus.cloudevents``). Deleted objects are
not reported.

boto3 is synchronous: its calls run in a worker thread so the event loop never blocks.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

import pydantic

from eventbus._errors import BusError, ConfigError, StoreError
from eventbus._tasks import in_daemon_thread
from eventbus.cloudevents import s3_event
from eventbus.config import Secret, SourceSpec, TlsSpec
from eventbus.sources._base import SourceContext
from eventbus.sources._changes import poll_changes

__all__ = ["S3PollSource", "S3PollSourceSpec"]

_NAMESPACE = uuid.UUID("5a3c9b1e-2f0d-4c4e-9a53-0b7e2f6d1c11")

READ_TIMEOUT = 10.0
"""Seconds an S3 request waits for the endpoint's answer (botocore's default: 60)."""


_GONE_KEPT = 600.0
"""Seconds a key gone from the listing is remembered (the bus's duplicate window is 2 min)."""


class S3PollSourceSpec(SourceSpec):
    """Settings of a ``type: s3-poll`` source.

    ``tls`` (with an ``https://`` endpoint, or AWS's): ``ca`` verifies the endpoint, ``cert``
    and ``key`` files are the client certificate, ``insecure_skip_verify`` turns checking off.
    botocore takes no key password, no key given as PEM text and no other server name: those
    are refused here rather than ignored.
    """

    bucket: str = pydantic.Field(min_length=1)
    prefix: str = ""
    interval: float = pydantic.Field(default=30.0, gt=0)
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: Secret | None = None
    tls: TlsSpec | None = None
    start_at: Literal["beginning", "end"] = "beginning"
    """``end``: the objects already there at the source's first start are not reported."""

    @pydantic.model_validator(mode="after")
    def _tls_botocore_takes(self) -> S3PollSourceSpec:
        tls = self.tls
        if tls is None:
            return self
        if self.endpoint_url is not None and not self.endpoint_url.startswith("https://"):
            raise ValueError("tls needs an https:// endpoint_url")
        if tls.key is not None and not isinstance(tls.key, Path):
            raise ValueError("tls.key must be a file for s3-poll (botocore reads keys from files)")
        if tls.key_password is not None or tls.server_name is not None:
            raise ValueError(
                "s3-poll's tls takes no key_password or server_name (botocore does not)"
            )
        return self


def _botocore_tls(
    tls: TlsSpec | None, where: str
) -> tuple[str | bool | None, tuple[str, str] | None]:
    """boto3's ``verify`` and botocore's ``client_cert`` for a ``tls`` block. Its files are read
    now (a ConfigError naming ``where`` and the field if one cannot be), and turning checking
    off is warned about, by building the block's context, which botocore does not take."""
    if tls is None:
        return None, None
    tls.context(where)
    ca = None if tls.ca is None else str(tls.ca)
    verify: str | bool | None = False if tls.insecure_skip_verify else ca
    client_cert = None if tls.cert is None else (str(tls.cert), str(tls.key))
    return verify, client_cert


class BucketError(Exception):
    """Listing the bucket failed for a reason that may pass (network, 5xx, throttling)."""


class S3PollSource:
    """Polls one bucket prefix; see the module docstring for the guarantees.

    Raises ConfigError when botocore rejects the endpoint URL or region.
    """

    one_instance = True  # under a lease: see SourceRunner

    def __init__(self, config: S3PollSourceSpec) -> None:
        self.name = config.name
        self.type = config.type
        self.config = config
        secret = config.secret_access_key
        verify, client_cert = _botocore_tls(config.tls, f"s3-poll source {config.name!r}")
        # Imported with the first s3-poll source, not with the package: boto3 takes longer to
        # import (about 0.15 s) than the rest of the sources together, for every start.
        import boto3
        import botocore.config
        import botocore.exceptions

        try:
            self._client = boto3.client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                aws_access_key_id=config.access_key_id,
                aws_secret_access_key=None if secret is None else secret.reveal(),
                verify=verify,
                # An endpoint that accepts connections and never answers: botocore's 60 s read
                # timeout, three tries, kept the source showing running for two minutes. Two
                # tries of 10 s (a page of 1,000 keys takes well under a second); the poll's
                # own backoff retries after that.
                config=botocore.config.Config(
                    retries={"mode": "standard", "total_max_attempts": 2},
                    connect_timeout=5,
                    read_timeout=READ_TIMEOUT,
                    client_cert=client_cert,
                ),
            )
        except (ValueError, botocore.exceptions.BotoCoreError) as exc:
            # botocore checks endpoint_url and region only here; report them like other fields.
            raise ConfigError(f"source {self.name!r} ({self.type}): {exc}") from exc
        self._gone: dict[str, float] = {}  # key -> when a listing no longer had it

    async def run(self, ctx: SourceContext) -> None:
        """Poll until cancelled. Failures (bucket unreachable, missing or denied, the bus or the
        database down) are reported in ``ctx.status`` and retried with backoff."""
        await poll_changes(
            ctx,
            prefix="o:",
            interval=self.config.interval,
            transient=(BucketError, BusError, StoreError),
            scan=self._scan,
            order=lambda obj: (obj["LastModified"], obj["Key"]),
            event=self._event,
            start_at_end=self.config.start_at == "end",
            went=self._went,
        )

    async def _scan(self) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        # Not in asyncio's thread pool: a listing waiting on a frozen endpoint held the
        # service's exit for its timeouts (117 s after SIGTERM in a review).
        objects = await in_daemon_thread(self._list_all, f"s3-poll {self.name}")
        return [
            (
                obj["Key"],
                {"etag": obj["ETag"], "last_modified": obj["LastModified"].isoformat()},
                obj,
            )
            for obj in objects
        ]

    def _went(self, keys: list[str]) -> None:
        """Remember when ``keys`` went from the listing, for :data:`_GONE_KEPT` s: an object
        that comes back (its delete marker removed, a version restored) has the ETag and
        LastModified it had, and its event the id of the one before, which the bus dropped as
        a copy within its duplicate window."""
        now = time.time()
        self._gone = {k: at for k, at in self._gone.items() if now - at < _GONE_KEPT}
        self._gone.update(dict.fromkeys(keys, now))

    def _list_all(self) -> list[dict[str, Any]]:
        """Every object under the prefix (all pages). Runs in a worker thread."""
        import botocore.exceptions  # loaded by __init__ already

        objects: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self.config.prefix}
        try:
            # Bounded by the bucket's size: each page advances the continuation token.
            while True:
                page = self._client.list_objects_v2(**kwargs)
                objects.extend(page.get("Contents", []))
                if not page.get("IsTruncated"):
                    return objects
                kwargs["ContinuationToken"] = page["NextContinuationToken"]
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"):
                # Retried (backoff up to 30 s), not failed for good: a bucket made after the
                # source, keys that take seconds to be known, a policy fixed meanwhile.
                raise BucketError(f"bucket {self.config.bucket!r}: {code}") from exc
            raise BucketError(f"listing bucket {self.config.bucket!r}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise BucketError(f"listing bucket {self.config.bucket!r}: {exc}") from exc

    async def _event(self, obj: dict[str, Any], known: bool) -> dict[str, Any]:
        # ``known`` is not asked: S3 reports an overwritten object as ObjectCreated:Put too.
        modified: datetime = obj["LastModified"].astimezone(UTC)
        etag = obj["ETag"].strip('"')
        record = {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": self.config.region,
            "eventTime": modified.isoformat().replace("+00:00", "Z"),
            "eventName": "ObjectCreated:Put",
            "s3": {
                "s3SchemaVersion": "1.0",
                "bucket": {"name": self.config.bucket, "arn": f"arn:aws:s3:::{self.config.bucket}"},
                "object": {
                    "key": quote_plus(obj["Key"], safe="/"),
                    "size": obj["Size"],
                    "eTag": etag,
                },
            },
        }
        # Derived from the object version, so a re-emitted event after a crash has the same id;
        # one that came back after it was gone names when it went (see _went)
        version = f"{self.config.bucket}/{obj['Key']}#{etag}@{modified}"
        gone = self._gone.get(obj["Key"])
        if gone is not None and time.time() - gone < _GONE_KEPT:
            version += f"~{gone!r}"
        event_id = str(uuid.uuid5(_NAMESPACE, version))
        return s3_event(record, event_id)
