-- Two indexes changed after their migration had been applied by some databases (the files were
-- edited in place, so those databases kept the first form):
--
-- * 0006's events_caused_by first held the rows whose event carries eventbuscauseid; the trail
--   query now reads only rows accepted as replies (via = 'reply') and could not use the old
--   index: every trail lookup read the events table from its newest row. Rebuilt where it has
--   the old predicate (one pass over events, once).
-- * 0001 first made events_type_received_at, which nothing reads (0005's events_type_received
--   serves type queries). Dropped where it exists.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_indexes
        WHERE schemaname = current_schema() AND indexname = 'events_caused_by'
          AND indexdef NOT LIKE '%WHERE (via = ''reply''::text)'
    ) THEN
        DROP INDEX events_caused_by;
        CREATE INDEX events_caused_by ON events
            ((event->>'eventbuscausesource'), (event->>'eventbuscauseid'), received_at, seq)
            WHERE via = 'reply';
    END IF;
END
$$;

DROP INDEX IF EXISTS events_type_received_at;
