-- Delivery guarantees: the durable retry schedule, dead letters and disabled targets.

-- A delivery waiting for its next attempt (after a retryable failure, or while the target's
-- circuit is open). Instances claim due rows with FOR UPDATE SKIP LOCKED and a lease
-- (locked_until), so a crashed claimant's rows become due again once the lease expires.
CREATE TABLE delivery_retries (
    id               bigserial PRIMARY KEY,
    due_at           timestamptz NOT NULL,
    event_source     text        NOT NULL,
    event_id         text        NOT NULL,
    event            jsonb       NOT NULL,
    rule             text        NOT NULL,
    target           text        NOT NULL,
    payload          jsonb       NOT NULL,   -- {"v": <payload>} so scalars and strings fit
    is_cloudevent    boolean     NOT NULL,
    delivery         jsonb,                  -- the route's delivery override, if any
    attempts         integer     NOT NULL DEFAULT 0,
    first_attempt_at timestamptz NOT NULL DEFAULT now(),
    history          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    waiting_for      text        NOT NULL DEFAULT 'retry',  -- retry | circuit | replay
    locked_by        text,
    locked_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_retries_due ON delivery_retries (due_at);
CREATE INDEX delivery_retries_target ON delivery_retries (target);

-- A delivery that ended without success: the original event, what the target was to receive,
-- every attempt and why retrying stopped. Replay moves it back into delivery_retries.
CREATE TABLE dead_letters (
    id               bigserial PRIMARY KEY,
    created_at       timestamptz NOT NULL DEFAULT now(),
    event_source     text        NOT NULL,
    event_id         text        NOT NULL,
    event_type       text,
    event            jsonb       NOT NULL,
    rule             text        NOT NULL,
    target           text        NOT NULL,
    payload          jsonb       NOT NULL,
    is_cloudevent    boolean     NOT NULL,
    delivery         jsonb,
    attempts         integer     NOT NULL,
    history          jsonb       NOT NULL,
    last_status      integer,
    final_error      text,
    reason           text        NOT NULL,  -- attempts-exhausted | too-old | non-retryable | gone | target-disabled | unknown-target
    first_attempt_at timestamptz NOT NULL,
    replay_count     integer     NOT NULL DEFAULT 0
);
CREATE INDEX dead_letters_created ON dead_letters (created_at);
CREATE INDEX dead_letters_rule ON dead_letters (rule, created_at);
CREATE INDEX dead_letters_target ON dead_letters (target, created_at);
CREATE INDEX dead_letters_status ON dead_letters (last_status);

-- Targets switched off after answering 410 Gone (when their policy says so).
CREATE TABLE disabled_targets (
    target      text PRIMARY KEY,
    reason      text        NOT NULL,
    disabled_at timestamptz NOT NULL DEFAULT now()
);
