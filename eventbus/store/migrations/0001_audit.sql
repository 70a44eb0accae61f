-- The audit trail: what arrived, which rules matched, every delivery attempt, refused requests.
-- Append-only and written in batches with COPY by eventbus.store.AuditWriter; see docs/audit.md.
--
-- Columns copied from an event (source, id, type, ...) are nullable: an event missing one is
-- still recorded with what it has. (source, id) is deliberately not unique: at-least-once
-- delivery and replays legitimately record the same event more than once, one row each.
-- Every table has a bigint identity `seq` so rows with equal timestamps keep insertion order.

CREATE TABLE events (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text,
    id          text,
    type        text,
    subject     text,
    time        timestamptz,           -- the event's own `time` attribute, when it parses
    received_at timestamptz NOT NULL,  -- when eventbus accepted it
    via         text        NOT NULL,  -- http, kafka, source:<name>, reply, replay
    event       jsonb       NOT NULL,  -- the whole CloudEvent in JSON form
    size        integer                -- bytes as received (or of its JSON form)
);
CREATE INDEX events_source_id ON events (source, id);
CREATE INDEX events_received_at ON events (received_at);

CREATE TABLE matches (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text,
    id          text,
    rule        text        NOT NULL,
    target      text        NOT NULL,
    at          timestamptz NOT NULL
);
CREATE INDEX matches_source_id ON matches (source, id);
CREATE INDEX matches_at ON matches (at);

CREATE TABLE attempts (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text,
    id          text,
    rule        text        NOT NULL,
    target      text        NOT NULL,
    attempt     integer     NOT NULL,  -- 1 for the first try
    outcome     text        NOT NULL,  -- delivered, failed, retry-scheduled, dead-lettered, ...
    status      integer,               -- HTTP status, NULL for non-HTTP targets or no response
    duration_ms double precision NOT NULL,
    error       text,                  -- truncated to 2,048 characters
    at          timestamptz NOT NULL
);
CREATE INDEX attempts_source_id ON attempts (source, id);
CREATE INDEX attempts_at ON attempts (at);

CREATE TABLE refusals (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL,
    remote      text,                  -- client address as seen by the server, if known
    path        text        NOT NULL,
    reason      text        NOT NULL
);
CREATE INDEX refusals_at ON refusals (at);
