"""The registry of target types: ``type: <name>`` in connector YAML -> spec -> adapter.

Place in the pipeline: the composition root builds every configured target through
:func:`build_target` before the dispatcher starts, and never names a target type itself.
The registry proper is ``eventbus.config``'s (so ``load_connectors`` validates every target
with its type's spec and reports file and line); this module is its typed front door for
targets. The built-in types are registered in ``eventbus/targets/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from eventbus.config import TargetSpec, connector_adapter, register_connector
from eventbus.targets._base import Target

__all__ = ["build_target", "register_target"]

S = TypeVar("S", bound=TargetSpec)


def register_target(type_name: str, spec: type[S], adapter: Callable[[S], Target]) -> None:
    """Make ``type: <type_name>`` under ``targets:`` validate with ``spec`` (a TargetSpec with
    ``extra="forbid"``) and deliver through ``adapter(spec)``, which raises ConfigError for a
    setting the spec cannot check. Sets ``spec.type``. Raises ValueError when the type or the
    spec is already registered, or the spec does not forbid extra fields."""
    register_connector("target", type_name, spec, adapter)


def build_target(spec: TargetSpec) -> Target:
    """The adapter of one validated target definition (not yet opened: ``async with`` it).

    Raises ConfigError for a setting the adapter refuses.
    """
    adapter = cast(Callable[[TargetSpec], Target], connector_adapter("target", spec))
    return adapter(spec)
