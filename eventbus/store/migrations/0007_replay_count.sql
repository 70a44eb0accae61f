-- A replayed dead letter keeps its history and counts its replays: the retry row carries the
-- count (the dead letter's history goes with it), and a dead letter it becomes again has it.
ALTER TABLE delivery_retries ADD COLUMN replay_count integer NOT NULL DEFAULT 0;
