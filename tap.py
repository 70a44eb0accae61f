import asyncio, nats, json
async def main():
    f = open("/tmp/review-queues/bus.jsonl", "a")
    async def cb(m):
        f.write(json.dumps({"via": (m.headers or {}).get("Eventbus-Via") or str(m.headers), "ev": json.loads(m.data)}) + "\n"); f.flush()
    nc = await nats.connect("nats://127.0.0.1:14222", max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    await nc.subscribe("eventbus.events", cb=cb)
    await asyncio.Event().wait()
asyncio.run(main())
