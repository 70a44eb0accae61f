"""``open_bus`` picks the backend from its config; both configs refuse unusable settings."""

from __future__ import annotations

import pytest

from eventbus._errors import ConfigError
from eventbus.bus import KafkaBus, KafkaBusConfig, NatsBus, NatsBusConfig, open_bus


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
