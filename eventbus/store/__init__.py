"""The Postgres store: the audit trail and the tables other components keep in Postgres.

:class:`Store` is opened once by the composition root: it connects, applies the versioned
migrations in ``migrations/`` (see :func:`migrate`) and runs the :class:`AuditWriter`, which
batches audit rows into COPYs. :class:`EmbeddedPostgres` runs a real PostgreSQL under a data
directory when no external database is configured, closed to everyone without its password.
"""

from eventbus.store._audit import Attempt, AttemptOutcome, AuditWriter
from eventbus.store._embedded import EmbeddedPostgres
from eventbus.store._migrate import migrate
from eventbus.store._pool import EventTrail, Store, set_aside

__all__ = [
    "Attempt",
    "AttemptOutcome",
    "AuditWriter",
    "EmbeddedPostgres",
    "EventTrail",
    "Store",
    "migrate",
    "set_aside",
]
