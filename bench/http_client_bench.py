"""CPU per request of the HTTP target's client against aiohttp's, in one run.

A function endpoint (aiohttp, answering 204) runs in a child process; this process sends the
same POST (a 300-byte CloudEvent in binary mode: eleven headers and a JSON body) ``--requests``
times with ``--concurrency`` in flight, on uvloop, through:

- ``aiohttp``: ``ClientSession.post`` with the body and headers already built, reading the
  answer (the reference: what the target used before, and what bench/forwarder.py uses);
- ``pool``: the target's own client (``eventbus.targets._http1.Pool``), same bytes;
- ``target``: ``HttpTarget.deliver`` end to end: the headers built from the event, the
  request written, the answer classified into an outcome.

CPU is this process's (user + system), so the endpoint's work is not counted. Each client runs
``--repeat`` times, taking turns; the table gives the median and the range.

    python bench/http_client_bench.py --requests 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from aiohttp import web

from eventbus.targets import HttpTarget, HttpTargetSpec
from eventbus.targets._http1 import Origin, Pool

EVENT = {
    "specversion": "1.0",
    "id": "0b7e5c1e-8f3a-4f59-9d4c-2f1e6a7b8c9d",
    "source": "/bench/uploads",
    "type": "com.example.object.created",
    "subject": "images/cat.png",
    "time": "2026-12-03T06:00:00Z",
    "datacontenttype": "application/json",
    "data": {"bucket": "images", "key": "cat.png", "size": 48213, "etag": "9b2cf535f27731c9"},
}


def _serve(port: int) -> None:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/fn", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _drive(send: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> float:
    """Seconds of this process's CPU for ``requests`` calls of ``send``."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await send()

    for _ in range(200):  # warm up connections and caches
        await send()
    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - start


async def _one(kind: str, url: str, port: int, requests: int, concurrency: int) -> float:
    headers, body = HttpTarget(HttpTargetSpec(name="fn", url=url))._request(EVENT, EVENT, True)[:2]
    if kind == "aiohttp":
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency), auto_decompress=False
        ) as session:

            async def send() -> None:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 204

            return await _drive(send, requests, concurrency)
    if kind == "pool":
        pool = Pool(concurrency, 15)
        origin = Origin("127.0.0.1", port, None)
        lines = [f"POST /fn HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        head = "".join(lines).encode()

        async def send_raw() -> None:
            resp = await pool.request(origin, head, body, max_body=1 << 20)
            assert resp.status == 204

        try:
            return await _drive(send_raw, requests, concurrency)
        finally:
            await pool.close()
    async with HttpTarget(HttpTargetSpec(name="fn", url=url, concurrency=concurrency)) as target:

        async def deliver() -> None:
            outcome = await target.deliver(EVENT, EVENT, is_cloudevent=True, attempt=1)
            assert outcome.delivered

        return await _drive(deliver, requests, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,))
    server.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/fn"
        kinds = ("aiohttp", "pool", "target")
        results: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.repeat):
            for kind in kinds:
                cpu = uvloop.run(_one(kind, url, port, args.requests, args.concurrency))
                results[kind].append(cpu / args.requests * 1e6)
    finally:
        server.terminate()
        server.join(10)
    print(
        f"# {os.cpu_count()} CPUs, {args.requests} requests x {args.repeat}, "
        f"{args.concurrency} in flight, uvloop {uvloop.__version__}, aiohttp {aiohttp.__version__}"
    )
    reference = statistics.median(results["aiohttp"])
    print("| client | CPU per request, µs (median) | range | vs aiohttp |")
    print("|---|---:|---:|---:|")
    for kind in kinds:
        runs = results[kind]
        median = statistics.median(runs)
        print(
            f"| {kind} | {median:.1f} | {min(runs):.1f}-{max(runs):.1f} | "
            f"{median / reference:.2f}x |"
        )


if __name__ == "__main__":
    main()
