"""CloudEvents 1.0 for eventbus: the event model, its HTTP, Kafka, NATS and MQTT bindings, and the
adapter mapping of bucket notifications (S3, MinIO, Alibaba OSS).

Everything that enters the pipeline (ingest API, sources, bus consumers) becomes a plain ``dict``
in the CloudEvents JSON form here: attributes at the top level, the payload under ``data`` (a
JSON value or a string) or ``data_base64`` (binary). Readers validate; writers assume a valid
event. Errors are :class:`eventbus._errors.CloudEventError` carrying the HTTP status to answer.

    validate, parse_json, encode, decode, new_event, event_key   the event      (_event)
    MAX_DATA_DEPTH, MAX_EXTENSIONS, MAX_HEADER_BYTES              what an event may carry
    header_value                                                  an attribute as a header
    parse_http, from_http, to_http, to_http_batch                 HTTP binding   (_bindings)
    DEFAULT_MAX_BATCH_ENTRIES, check_entries                      batch size
    from_kafka, to_kafka                                          Kafka binding
    from_nats, to_nats                                            NATS binding
    from_mqtt                                                     MQTT binding (5: binary)
    notification_to_events, s3_records_to_events,                 bucket notifications
    oss_records_to_events, s3_event                               (_notifications)

Binary content mode carries attributes as header strings, so an integer or boolean extension
read back from binary mode is a string: the receiving side cannot know the original type.
"""

from __future__ import annotations

from eventbus.cloudevents._bindings import (
    BATCH_CONTENT_TYPE,
    DEFAULT_MAX_BATCH_ENTRIES,
    STRUCTURED_CONTENT_TYPE,
    HttpParse,
    check_entries,
    from_http,
    from_kafka,
    from_mqtt,
    from_nats,
    kafka_key_attribute,
    kafka_record_time,
    parse_http,
    to_http,
    to_http_batch,
    to_kafka,
    to_nats,
)
from eventbus.cloudevents._event import (
    DEFAULT_MAX_EVENT_SIZE,
    MAX_DATA_DEPTH,
    MAX_EXTENSIONS,
    MAX_HEADER_BYTES,
    MAX_IDENTITY_BYTES,
    REQUIRED_ATTRIBUTES,
    SPEC_VERSION,
    TEXT_CHARSETS,
    as_attribute,
    attribute_text,
    charset_of,
    decode,
    encode,
    event_key,
    format_time,
    header_value,
    is_json,
    json_body,
    load_json,
    media_type,
    new_event,
    parse_json,
    validate,
)
from eventbus.cloudevents._notifications import (
    notification_to_events,
    oss_records_to_events,
    s3_event,
    s3_records_to_events,
)

__all__ = [
    "BATCH_CONTENT_TYPE",
    "DEFAULT_MAX_BATCH_ENTRIES",
    "DEFAULT_MAX_EVENT_SIZE",
    "MAX_DATA_DEPTH",
    "MAX_EXTENSIONS",
    "MAX_HEADER_BYTES",
    "MAX_IDENTITY_BYTES",
    "REQUIRED_ATTRIBUTES",
    "SPEC_VERSION",
    "STRUCTURED_CONTENT_TYPE",
    "TEXT_CHARSETS",
    "HttpParse",
    "as_attribute",
    "attribute_text",
    "charset_of",
    "check_entries",
    "decode",
    "encode",
    "event_key",
    "format_time",
    "from_http",
    "from_kafka",
    "from_mqtt",
    "from_nats",
    "header_value",
    "is_json",
    "json_body",
    "kafka_key_attribute",
    "kafka_record_time",
    "load_json",
    "media_type",
    "new_event",
    "notification_to_events",
    "oss_records_to_events",
    "parse_http",
    "parse_json",
    "s3_event",
    "s3_records_to_events",
    "to_http",
    "to_http_batch",
    "to_kafka",
    "to_nats",
    "validate",
]
