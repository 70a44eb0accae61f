-- A crash-safe audit trail.
--
-- The router records an event's acceptance when it takes the event off the durable bus, and
-- acknowledges the bus message only once the row is committed; a message redelivered after a
-- crash is recorded again under the same bus_ref, which this index turns into a no-op. Rows
-- written before this migration have no bus_ref (NULLs never conflict).
ALTER TABLE events ADD COLUMN bus_ref text;
CREATE UNIQUE INDEX events_bus_ref ON events (bus_ref);

-- Audit rows PostgreSQL or the driver could not take (a value out of a column's range, say),
-- kept with the error instead of blocking every row behind them. `record` is the row as
-- ASCII text (Python repr), so whatever broke the row cannot break this one.
CREATE TABLE audit_quarantine (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    table_name  text        NOT NULL,
    record      text        NOT NULL,
    error       text        NOT NULL
);
CREATE INDEX audit_quarantine_at ON audit_quarantine (at);
