"""Pin the public names of eventbus.store: the router, API and CLI import exactly these."""

import eventbus.store


def test_exported_members() -> None:
    assert eventbus.store.__all__ == sorted(eventbus.store.__all__)
    assert eventbus.store.__all__ == [
        "Attempt",
        "AttemptOutcome",
        "AuditWriter",
        "EmbeddedPostgres",
        "EventTrail",
        "Store",
        "migrate",
        "set_aside",
    ]
    for name in eventbus.store.__all__:
        assert getattr(eventbus.store, name).__module__.startswith("eventbus.store.")
