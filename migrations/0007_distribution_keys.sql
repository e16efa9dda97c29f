-- Every table that holds an organization's data carries `org_id`, and every primary and unique key
-- includes it: the data model can be distributed by organization on Citus (docs/scale-out.md),
-- where a distributed table's unique keys must contain its distribution column. On one PostgreSQL
-- nothing changes for the queries: each key keeps its old columns first, so every lookup and range
-- scan that used it still does.
--
-- `organizations` (the tenants themselves, looked up by key id) and `triggers_probe` (one row per
-- node's health probe) are reference tables in that design; `triggers_migrations` stays on the
-- coordinator.

-- Attempts learn their organization (the recorder writes it from now on).
ALTER TABLE delivery_attempts ADD COLUMN org_id uuid;
UPDATE delivery_attempts a SET org_id = e.org_id FROM events e WHERE e.id = a.event_id;
-- An attempt whose event is gone can't be read by any route: nothing to keep.
DELETE FROM delivery_attempts WHERE org_id IS NULL;
ALTER TABLE delivery_attempts ALTER COLUMN org_id SET NOT NULL;

-- A group commit's batch row names the organization of its first event.
ALTER TABLE delivery_batches ADD COLUMN org_id uuid;
UPDATE delivery_batches b SET org_id = e.org_id FROM events e WHERE e.id = b.first_event;
DELETE FROM delivery_batches WHERE org_id IS NULL;
ALTER TABLE delivery_batches ALTER COLUMN org_id SET NOT NULL;
ALTER TABLE delivery_batches DROP CONSTRAINT delivery_batches_pkey;
ALTER TABLE delivery_batches ADD PRIMARY KEY (id, org_id);

-- Partitioned tables: the new key is built on every partition, the old one dropped with them.
ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD PRIMARY KEY (id, org_id);
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey;
ALTER TABLE deliveries ADD PRIMARY KEY (event_id, endpoint_id, org_id);

ALTER TABLE endpoints DROP CONSTRAINT endpoints_pkey;
ALTER TABLE endpoints ADD PRIMARY KEY (id, org_id);
