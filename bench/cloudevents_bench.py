"""Benchmark of CloudEvents reading: parse + validate one 1 KiB event in every binding and content
mode, in µs per event, printed as a markdown table (the section "CloudEvents parsing" of
bench/RESULTS.md is this output). ``orjson.loads`` of the same structured body is the floor.

The event is fixed (no randomness); each row takes the best of ``--repeat`` timings of
``--number`` calls, so background load inflates figures less than a mean would.

    python bench/cloudevents_bench.py
    python bench/cloudevents_bench.py --number 20000 --repeat 7
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as h
from eventbus.cloudevents import (
    from_http,
    from_kafka,
    from_nats,
    to_http,
    to_http_batch,
    to_kafka,
    to_nats,
    validate,
)

EVENT = {
    "specversion": "1.0",
    "id": "b7a1c3d2-5e4f-4a6b-8c9d-0e1f2a3b4c5d",
    "source": "https://storage.example.com/buckets/uploads",
    "type": "com.example.object.created",
    "subject": "images/2024/06/cat.jpg",
    "time": "2024-06-01T12:34:56.789Z",
    "datacontenttype": "application/json",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "data": {
        "bucket": "uploads",
        "key": "images/2024/06/cat.jpg",
        "size": 48213,
        "etag": "9b2cf535f27731c974343645a3985328",
        "contentType": "image/jpeg",
        "owner": {"id": "u-1234", "name": "Ada Lovelace", "email": "ada@example.com"},
        "tags": ["cats", "upload", "public"],
        "metadata": {f"field{i}": f"value number {i} " + "x" * 20 for i in range(9)},
    },
}


def workloads() -> dict[str, Callable[[], object]]:
    structured_headers, structured_body = to_http(EVENT, structured=True)
    binary_headers, binary_body = to_http(EVENT)
    batch_headers, batch_body = to_http_batch([EVENT] * 10)
    kafka_binary = to_kafka(EVENT)
    kafka_structured = to_kafka(EVENT, structured=True)
    nats_binary = to_nats(EVENT, structured=False)
    nats_structured = to_nats(EVENT)
    return {
        "orjson.loads only (floor)": lambda: orjson.loads(structured_body),
        "validate (dict already parsed)": lambda: validate(EVENT, size=len(structured_body)),
        "HTTP structured": lambda: from_http(structured_headers, structured_body),
        "HTTP binary": lambda: from_http(binary_headers, binary_body),
        "HTTP batch of 10 (per event)": lambda: from_http(batch_headers, batch_body),
        "Kafka structured": lambda: from_kafka(kafka_structured[1], None, kafka_structured[2]),
        "Kafka binary": lambda: from_kafka(kafka_binary[1], None, kafka_binary[2]),
        "NATS structured": lambda: from_nats(*nats_structured),
        "NATS binary": lambda: from_nats(*nats_binary),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=10_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per row; best is kept")
    args = parser.parse_args()

    size = len(orjson.dumps(EVENT))
    print(f"{h.machine()} Event {size} bytes.")
    print()
    print("| mode | µs/event | events/s |")
    print("|---|---:|---:|")
    for name, call in workloads().items():
        per_call = min(timeit.repeat(call, number=args.number, repeat=args.repeat)) / args.number
        if name.startswith("HTTP batch"):
            per_call /= 10
        print(f"| {name} | {per_call * 1e6:.2f} | {1 / per_call:,.0f} |")


if __name__ == "__main__":
    main()
