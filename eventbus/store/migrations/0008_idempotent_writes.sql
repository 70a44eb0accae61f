-- Writes whose commit may have landed when the connection broke (PostgreSQL killed in that
-- moment) are made again with a key that finds the first one: a retry row or a dead letter
-- by its write_key, an audit batch by its id in audit_batches. Made again without one, a
-- delivery was scheduled twice (and delivered twice), an audit batch written twice.
ALTER TABLE delivery_retries ADD COLUMN write_key uuid;
CREATE UNIQUE INDEX delivery_retries_write_key ON delivery_retries (write_key);
ALTER TABLE dead_letters ADD COLUMN write_key uuid;
CREATE UNIQUE INDEX dead_letters_write_key ON dead_letters (write_key);
CREATE TABLE audit_batches (
    id uuid PRIMARY KEY,
    written_at timestamptz NOT NULL DEFAULT now()
);
