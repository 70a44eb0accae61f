-- Searching the accepted events (GET /events): newest first by when the bus stored them, by
-- source or type, within a time range, a page at a time (keyset: after the last row's
-- received_at and seq). Each index serves one filter in that order, so a page reads only its
-- own rows however long the trail; without a filter, events_received_at serves the query.
--
-- Built in the migration's transaction: on a long existing trail the first start of this
-- version blocks audit writes while they are built.
CREATE INDEX events_type_received ON events (type, received_at, seq);
CREATE INDEX events_source_received ON events (source, received_at, seq);
