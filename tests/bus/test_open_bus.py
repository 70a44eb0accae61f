"""``open_bus`` picks the backend from its config; both configs refuse unusable settings; a
payload the bus holds is read under the rules its event was accepted by."""

from __future__ import annotations

import orjson
import pytest

from eventbus._errors import CloudEventError, ConfigError
from eventbus.bus import KafkaBus, KafkaBusConfig, NatsBus, NatsBusConfig, open_bus
from eventbus.bus._base import wire_decode
from eventbus.cloudevents import validate


def test_open_bus_picks_the_backend_from_the_config() -> None:
    assert isinstance(open_bus(NatsBusConfig(url="nats://127.0.0.1:1")), NatsBus)
    assert isinstance(
        open_bus(KafkaBusConfig(bootstrap_servers="127.0.0.1:1", partitions=1)), KafkaBus
    )


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: NatsBusConfig(url="nats://x", max_in_flight=0), "max_in_flight"),
        (lambda: NatsBusConfig(url="nats://x", fetch_batch=-1), "fetch_batch"),
        (lambda: NatsBusConfig(url="nats://x", ack_wait=0.0), "ack_wait"),
        (lambda: KafkaBusConfig(bootstrap_servers="x", partitions=0), "partitions"),
        (
            lambda: KafkaBusConfig(bootstrap_servers="x", partitions=1, max_in_flight=0),
            "max_in_flight",
        ),
        (lambda: NatsBusConfig(url=""), "url must be"),
        (lambda: KafkaBusConfig(bootstrap_servers="", partitions=1), "bootstrap_servers must"),
    ],
)
def test_configs_reject_non_positive_settings(make: object, field: str) -> None:
    assert callable(make)
    with pytest.raises(ConfigError, match=field):
        make()


def test_an_event_the_bus_holds_is_read_under_the_rules_it_was_accepted_by() -> None:
    # An object under text/plain is refused at the door now; one answered 202 before that
    # rule, waiting on the bus, is still routed (it was set aside, never delivered).
    held = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    held |= {"datacontenttype": "text/plain", "data": {"a": 1}}
    event, why = wire_decode(orjson.dumps(held))
    assert why is None and event == held
    with pytest.raises(CloudEventError, match="must be a string"):
        validate(held)
    # so is one whose data_base64 under a JSON type is not JSON
    held = {k: v for k, v in held.items() if k != "data"} | {"data_base64": "/w=="}
    held["datacontenttype"] = "application/json"
    event, why = wire_decode(orjson.dumps(held))
    assert why is None and event == held
    with pytest.raises(CloudEventError, match="must hold JSON text"):
        validate(held)


def _nested(levels: int) -> object:
    data: object = 1
    for _ in range(levels):
        data = {"a": data}
    return data


@pytest.mark.parametrize(
    ("extra", "refused_now"),
    [
        ({f"x{i}": "v" for i in range(60)}, "more than 50 extension attributes"),
        ({"data": _nested(100)}, "more than 64 levels deep"),
        ({"big": "v" * 9000}, "as binary-mode headers"),
        ({"datacontenttype": "text/plain; charset=us-ascii", "data": "café"}, "ascii"),
    ],
)
def test_an_event_accepted_before_a_limit_came_is_delivered_as_it_was(
    extra: dict[str, object], refused_now: str
) -> None:
    # answered 202 by an older release and still on the bus when it was upgraded: each was set
    # aside as "not a valid CloudEvent", never delivered
    held = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"} | extra
    event, why = wire_decode(orjson.dumps(held))
    assert why is None and event == held
    with pytest.raises(CloudEventError, match=refused_now):
        validate(held)


def test_a_bus_message_nested_past_what_the_service_can_carry_is_set_aside() -> None:
    held = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": _nested(201)}
    event, why = wire_decode(orjson.dumps(held))
    assert event == {} and why is not None and "more than 200 levels deep" in why
