-- The write keys of retry chains that ended (delivered or dead-lettered), kept a day: a bus
-- message whose process died after writing its retry row, before its ack, is delivered again
-- (after the bus's ack wait); when the chain that row began ended meanwhile (on another
-- instance), the redelivery found no row under its key and began a second chain: twice the
-- attempts and two dead letters for one message. It finds the chain's end here instead.
CREATE TABLE IF NOT EXISTS delivery_ends (
    write_key uuid PRIMARY KEY,
    ended_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS delivery_ends_ended_at ON delivery_ends (ended_at);
