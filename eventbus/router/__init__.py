"""The router and its live feed: see :mod:`eventbus.router._router` (consume, match, dispatch,
ack) and :mod:`eventbus.router._feed` (what watchers see, across the workers)."""

from eventbus.router._feed import LiveFeed, PeerFeed, Routed, Watcher
from eventbus.router._router import Router

__all__ = ["LiveFeed", "PeerFeed", "Routed", "Router", "Watcher"]
