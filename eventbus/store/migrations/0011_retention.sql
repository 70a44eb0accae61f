-- Retention (eventbus.store._retention, docs/audit.md): pruning by age reads each table by its
-- time, and keeps an event's trail while a dead letter of it exists (looked up by the event).
-- delivery_retries_event (0005) serves the same lookup for waiting retries; the audit
-- tables' time indexes exist since 0001.
CREATE INDEX IF NOT EXISTS dead_letters_event ON dead_letters (event_source, event_id);
CREATE INDEX IF NOT EXISTS source_dead_letters_received ON source_dead_letters (received_at);
