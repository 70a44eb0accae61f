-- Linking trails: an event a function answered with (a reply, put on the bus) carries the
-- event it answers in its eventbuscausesource and eventbuscauseid attributes, and the trail of
-- that event lists such replies (GET /events/trail: caused). Only rows accepted as replies
-- count (a producer could send the attributes too), so the index holds only their rows, and
-- the trail reads only the replies it lists.
CREATE INDEX events_caused_by ON events
    ((event->>'eventbuscausesource'), (event->>'eventbuscauseid'), received_at, seq)
    WHERE via = 'reply';

-- The trail of one event shows its deliveries waiting to retry (GET /retries?source=&id=).
CREATE INDEX delivery_retries_event ON delivery_retries (event_source, event_id);
