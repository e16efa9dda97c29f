-- Claimed first attempts are leased like a group commit's deliveries: by one batch row, not a
-- write per delivery. A claim takes due `deliveries` rows that have no attempt yet (a backlog: a
-- paused endpoint resumed, deliveries a node had no room for, a batch taken over) out of the
-- table and names them in one `delivery_batches` row; a success is then an appended attempt row
-- only, as for a fresh event, where before it cost an update of the row at the claim (new
-- versions in two indexes) and its delete at the outcome. Anything but a success gives the
-- delivery its row again (the recorder's materialization); a batch row that expires (its node
-- died) gives every member still owed its row back, due at once.
--
-- A group commit's batch row has no members (its events are found by `batch_id`); a claim's
-- has them, in three parallel arrays, and its lease in `members_until`: its `lease_until` is
-- 'infinity', so a node of an older build (during a rolling upgrade), which knows only
-- `lease_until` and would look for the batch's events by `batch_id`, never takes it over and
-- drops its members.
ALTER TABLE delivery_batches ADD COLUMN members_event uuid[];
ALTER TABLE delivery_batches ADD COLUMN members_endpoint uuid[];
ALTER TABLE delivery_batches ADD COLUMN members_org uuid[];
ALTER TABLE delivery_batches ADD COLUMN members_until timestamptz;
-- When the claim was made: a member is owed unless an attempt made since then succeeded (a
-- success from before, such as the previous round's of a redelivery, does not count).
ALTER TABLE delivery_batches ADD COLUMN members_since timestamptz;
