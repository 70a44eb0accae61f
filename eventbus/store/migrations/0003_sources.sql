-- Sources: durable progress, unusable input, and exactly-once timer fires.

-- One row per (source, key): log offsets, bucket markers, directory snapshots.
CREATE TABLE IF NOT EXISTS source_checkpoints (
    source      text        NOT NULL,
    key         text        NOT NULL,
    value       jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, key)
);

-- Input that could not become a CloudEvent, kept with its error so the stream never blocks.
CREATE TABLE IF NOT EXISTS source_dead_letters (
    id          bigserial   PRIMARY KEY,
    source      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    payload     bytea       NOT NULL,
    error       text        NOT NULL,
    meta        jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS source_dead_letters_source_id ON source_dead_letters (source, id);

-- A schedule's tick fires once across instances: the first INSERT of (schedule, fire_time) wins.
CREATE TABLE IF NOT EXISTS timer_fires (
    schedule    text        NOT NULL,
    fire_time   timestamptz NOT NULL,
    instance    text        NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_time)
);
