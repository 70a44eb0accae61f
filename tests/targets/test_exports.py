"""Every target adapter satisfies the ``Target`` protocol (checked by mypy through these tests)."""

from eventbus.targets import (
    HttpTarget,
    HttpTargetSpec,
    KafkaTarget,
    KafkaTargetSpec,
    NatsTarget,
    NatsTargetSpec,
    Target,
)


def test_http_target_is_a_target() -> None:
    # Checked by mypy: the assignment fails type checking if HttpTarget drifts from Target.
    target: Target = HttpTarget(HttpTargetSpec(name="fn", url="http://127.0.0.1:1/"))
    assert target.name == "fn"


def test_kafka_and_nats_targets_are_targets() -> None:
    # Checked by mypy, as above: these assignments fail type checking if an adapter drifts.
    kafka: Target = KafkaTarget(
        KafkaTargetSpec(name="k", bootstrap_servers="127.0.0.1:1", topic="t")
    )
    nats: Target = NatsTarget(NatsTargetSpec(name="n", url="nats://127.0.0.1:1", subject="s"))
    assert (kafka.name, nats.name) == ("k", "n")
