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
