"""Pins the public names of ``eventbus.targets``: the router and delivery layer import these."""

import eventbus.targets


def test_public_names() -> None:
    assert eventbus.targets.__all__ == [
        "HttpTarget",
        "HttpTargetConfig",
        "Outcome",
        "Target",
        "sign_webhook",
        "verify_webhook",
    ]
    for name in eventbus.targets.__all__:
        assert getattr(eventbus.targets, name) is not None
