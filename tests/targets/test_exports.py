"""Pins the public names of ``eventbus.targets``: the router and delivery layer import these."""

import eventbus.targets
from eventbus.targets import HttpTarget, HttpTargetConfig, Target


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


def test_http_target_is_a_target() -> None:
    # Checked by mypy: the assignment fails type checking if HttpTarget drifts from Target.
    target: Target = HttpTarget(HttpTargetConfig(name="fn", url="http://127.0.0.1:1/"))
    assert target.name == "fn"
