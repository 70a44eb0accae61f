"""The package's public names are deliberate: adding or removing one is a visible change."""

import eventbus
import eventbus.delivery


def test_public_names_are_pinned() -> None:
    assert eventbus.__all__ == [
        "BusError",
        "BusUnavailable",
        "CloudEventError",
        "ConfigError",
        "DeliveryError",
        "EventBusError",
        "PatternError",
        "RuleError",
        "RuleSetError",
        "StoreDataError",
        "StoreError",
        "StoreUnavailable",
        "__version__",
    ]
    for name in eventbus.__all__:
        assert hasattr(eventbus, name)


def test_all_lists_are_sorted() -> None:
    # isort style, as ruff keeps them: CONSTANTS, then Classes, then functions
    def order(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)

    for module in (eventbus, eventbus.delivery):
        assert module.__all__ == sorted(module.__all__, key=order)
