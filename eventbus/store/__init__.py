"""The Postgres store: audit trail, migrations, and the embedded PostgreSQL launcher."""

from eventbus.store._embedded import EmbeddedPostgres

__all__ = ["EmbeddedPostgres"]
