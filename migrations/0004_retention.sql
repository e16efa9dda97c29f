-- Retention: events and their delivery records are partitioned by event id, one partition per
-- UTC day, so expiring a day is dropping three tables, never a row-by-row DELETE.
--
-- Ids are UUIDv7: their first 48 bits are the creation time in milliseconds, and PostgreSQL
-- compares uuids byte by byte, so a range of ids is a range of time. A day's bound is the uuid of
-- its first millisecond with every other bit zero (`triggers_day_bound`). Partitioning by id keeps
-- every primary key as it was (the partition key is in it), and lookups by id prune to one
-- partition.
--
-- What this migration does to an existing database, without moving a row: each table becomes the
-- first partition (`<table>_initial`) of a new partitioned table, covering every id before
-- tomorrow (UTC). The server creates the daily partitions after it (a week ahead) and drops those
-- older than --retention-days; the initial partitions go as a whole when tomorrow has expired.
-- ATTACH checks that every existing row is in range: one scan of each table, once.
--
-- Dedup: a unique index on a partitioned table must contain the partition key, so `(org_id,
-- dedup_id)` can't stay unique on `events`. It moves to `dedup_keys`, one narrow row per event
-- that carries a dedup_id, unique on (org_id, dedup_id). When a day's events go, the day's keys go
-- with them (a ranged DELETE on `dedup_keys_event`; only events with a dedup_id have a key), so a
-- dedup_id is unique per organization within the retention window.

CREATE FUNCTION triggers_day_bound(day date) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (lpad(to_hex((extract(epoch FROM day::timestamp) * 1000)::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

CREATE TABLE dedup_keys (
    org_id   uuid NOT NULL,
    dedup_id text NOT NULL,
    event_id uuid NOT NULL,
    PRIMARY KEY (org_id, dedup_id)
);
CREATE INDEX dedup_keys_event ON dedup_keys (event_id);
INSERT INTO dedup_keys (org_id, dedup_id, event_id)
SELECT org_id, dedup_id, id FROM events WHERE dedup_id IS NOT NULL;
DROP INDEX events_org_dedup;

DO $$
DECLARE
    bound uuid := triggers_day_bound(((now() AT TIME ZONE 'UTC')::date + 1));
BEGIN
    ALTER TABLE events RENAME TO events_initial;
    ALTER INDEX events_pkey RENAME TO events_initial_pkey;
    ALTER INDEX events_inbox RENAME TO events_initial_inbox;
    CREATE TABLE events (LIKE events_initial INCLUDING DEFAULTS) PARTITION BY RANGE (id);
    ALTER TABLE events ADD PRIMARY KEY (id);
    CREATE INDEX events_inbox ON events (org_id, status, id);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_initial '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', bound);

    ALTER TABLE deliveries RENAME TO deliveries_initial;
    ALTER INDEX deliveries_pkey RENAME TO deliveries_initial_pkey;
    ALTER INDEX deliveries_due RENAME TO deliveries_initial_due;
    ALTER INDEX deliveries_failed RENAME TO deliveries_initial_failed;
    ALTER INDEX deliveries_recover RENAME TO deliveries_initial_recover;
    ALTER INDEX deliveries_parked RENAME TO deliveries_initial_parked;
    CREATE TABLE deliveries (LIKE deliveries_initial INCLUDING DEFAULTS) PARTITION BY RANGE (event_id);
    ALTER TABLE deliveries ADD PRIMARY KEY (event_id, endpoint_id);
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
    CREATE INDEX deliveries_failed ON deliveries (org_id, event_id) WHERE status = 2;
    CREATE INDEX deliveries_recover ON deliveries (endpoint_id, failed_at) WHERE status = 2;
    CREATE INDEX deliveries_parked ON deliveries (endpoint_id)
        WHERE status = 0 AND next_attempt_at IS NULL;
    EXECUTE format('ALTER TABLE deliveries ATTACH PARTITION deliveries_initial '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', bound);

    ALTER TABLE delivery_attempts RENAME TO delivery_attempts_initial;
    ALTER INDEX delivery_attempts_event RENAME TO delivery_attempts_initial_event;
    CREATE TABLE delivery_attempts (LIKE delivery_attempts_initial INCLUDING DEFAULTS)
        PARTITION BY RANGE (event_id);
    CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id);
    EXECUTE format('ALTER TABLE delivery_attempts ATTACH PARTITION delivery_attempts_initial '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', bound);
END $$;
