-- Sources that read input every instance could see (a directory, a log file, a bucket) run in
-- one instance at a time: the owner holds the source's lease and renews it; another instance
-- takes it over once it has run out.
CREATE TABLE source_leases (
    source      text        PRIMARY KEY,
    owner       text        NOT NULL,
    expires_at  timestamptz NOT NULL
);
