"""The Postgres store: the audit trail and the tables other components keep in Postgres.

:class:`Store` is opened once by the composition root: it connects, applies the versioned
migrations in ``migrations/`` (see :func:`migrate`) and runs the :class:`AuditWriter`, which
batches audit rows into COPYs. :class:`EmbeddedPostgres` runs a real PostgreSQL under a data
directory when no external database is configured, closed to everyone without its password.

Every component that keeps a table of its own in Postgres (the delivery store, the sources'
checkpoints and dead letters) uses the same two helpers: :func:`run_db` runs a statement and
translates asyncpg's errors into the eventbus tree (reads the API serves within
``READ_TIMEOUT``), and :func:`dumps_jsonb` / :func:`loads_jsonb` carry any JSON value through a
``jsonb`` column losslessly.
"""

from eventbus.store._audit import Attempt, AttemptOutcome, AuditWriter
from eventbus.store._embedded import EmbeddedPostgres
from eventbus.store._failures import READ_TIMEOUT, STALLED_AFTER, Outstanding, run_db
from eventbus.store._jsonb import dumps_jsonb, loads_jsonb
from eventbus.store._migrate import migrate
from eventbus.store._pool import (
    CAUSE_ID,
    CAUSE_SOURCE,
    EventCursor,
    EventTrail,
    Store,
    cause_of,
    set_aside,
)
from eventbus.store._retention import Pruner, RetentionPolicy

__all__ = [
    "CAUSE_ID",
    "CAUSE_SOURCE",
    "READ_TIMEOUT",
    "STALLED_AFTER",
    "Attempt",
    "AttemptOutcome",
    "AuditWriter",
    "EmbeddedPostgres",
    "EventCursor",
    "EventTrail",
    "Outstanding",
    "Pruner",
    "RetentionPolicy",
    "Store",
    "cause_of",
    "dumps_jsonb",
    "loads_jsonb",
    "migrate",
    "run_db",
    "set_aside",
]
