-- The signatures of the webhook requests each trigger published, for twice its scheme's
-- tolerance (eventbus.sources._webhook): a captured request sent again verifies until its
-- timestamp is too old, and each worker of `serve --workers N` (or an instance after a
-- restart) remembered only its own; past the bus's duplicate window (2 minutes) such a copy
-- was published again. Keyed by the trigger and the SHA-256 of the signature.
CREATE TABLE IF NOT EXISTS webhook_signatures (
    source text NOT NULL,
    digest bytea NOT NULL,
    event_id text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (source, digest)
);
CREATE INDEX IF NOT EXISTS webhook_signatures_expires_at ON webhook_signatures (expires_at);
