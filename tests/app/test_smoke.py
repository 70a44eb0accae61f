from tests.fixtures.receiver import Receiver

RULES = """
- name: orders
  match:
    type: [com.example.order.created]
  targets: [fn]
"""


async def test_http_event_is_routed(eventbus, receiver: Receiver) -> None:
    svc = await eventbus(
        rules=RULES, targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}]
    )
    status, body = await svc.post_event(
        {
            "specversion": "1.0",
            "id": "e1",
            "source": "shop",
            "type": "com.example.order.created",
            "data": {"a": 1},
        }
    )
    assert status == 202, body
    reqs = await receiver.wait_for(1, timeout=10)
    assert reqs[0].cloudevent["id"] == "e1"
