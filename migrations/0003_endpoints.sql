-- Endpoints: several webhooks per organization, each with its own patterns, secret, health and
-- deliveries. The v1 webhook of an organization becomes its default endpoint.
--
-- Delivery bookkeeping is designed around its cost (measured, see BENCHMARKS.md): an update of
-- the wide event row costs PostgreSQL ~19 us and a narrow row ~11 us, an appended log row ~4 us.
-- So the event row is never updated by delivery, and the common case (every endpoint takes the
-- event at the first attempt) writes one attempt row per endpoint and nothing else:
--   * an event's delivery state is *derived*: from its per-endpoint `deliveries` row when there
--     is one, else from its successful attempt in `delivery_attempts`;
--   * the lease a node holds on the events it committed is one `delivery_batches` row per group
--     commit, not a write per event; the claimer of an expired batch turns what is still owed
--     into `deliveries` rows;
--   * a `deliveries` row exists only when a delivery needs state of its own: after a failed
--     attempt (its retries and lease), while it waits (paused endpoint, open circuit, no room in
--     memory), after a redelivery, or once claimed from an expired batch.

CREATE TABLE endpoints (
    id                          uuid PRIMARY KEY,
    org_id                      uuid NOT NULL,
    -- The v1 webhook (/api/webhook/config) of the organization: at most one per organization.
    is_default                  boolean NOT NULL DEFAULT false,
    url                         text NOT NULL,
    -- NULL: every type except the operational triggers.* ones.
    event_types                 text[],
    description                 text,
    rate_limit_per_second       integer,
    -- 0 active, 1 paused, 2 disabled (410 Gone, or failing too long), 3 removed (kept: a removed
    -- default endpoint keeps the organization's secret, and history keeps its id)
    status                      smallint NOT NULL DEFAULT 0,
    signing_secret              text NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    disabled_reason             text,
    -- Health, written only when it changes (a failure, the first success after failures).
    consecutive_failures        integer NOT NULL DEFAULT 0,
    failing_since               timestamptz,
    last_success_at             timestamptz,
    last_failure_at             timestamptz,
    circuit_open_until          timestamptz,
    created_at                  timestamptz NOT NULL,
    updated_at                  timestamptz NOT NULL
);
CREATE INDEX endpoints_org ON endpoints (org_id);
CREATE UNIQUE INDEX endpoints_default ON endpoints (org_id) WHERE is_default;

-- The endpoints an event matched when it was committed (NULL: none), and the delivery batch
-- that leased it to the node that committed it.
ALTER TABLE events ADD COLUMN endpoints uuid[];
ALTER TABLE events ADD COLUMN batch_id uuid;

-- One row per group commit with deliverable events: the committing node's lease on all of them.
-- Its events are those with this batch_id between first_event and last_event (ids are
-- time-ordered, so the range is narrow; no index on events.batch_id is paid for per event).
-- The row exists while its node may still deliver; a claimer that finds it expired turns what
-- is still owed into deliveries rows and deletes it.
CREATE TABLE delivery_batches (
    id          uuid PRIMARY KEY,
    lease_until timestamptz NOT NULL,
    first_event uuid NOT NULL,
    last_event  uuid NOT NULL
);

CREATE TABLE deliveries (
    event_id        uuid NOT NULL,
    endpoint_id     uuid NOT NULL,
    org_id          uuid NOT NULL,
    status          smallint NOT NULL DEFAULT 0,   -- 0 pending, 1 delivered, 2 failed
    attempts        integer NOT NULL DEFAULT 0,    -- every round
    retry_base      integer NOT NULL DEFAULT 0,    -- attempts when the current round began
    -- When the next attempt is due, or while a node holds it the end of that node's lease.
    -- NULL: settled, or parked (paused or disabled endpoint, an acked event) until resumed.
    next_attempt_at timestamptz,
    delivered_at    timestamptz,
    failed_at       timestamptz,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_failed ON deliveries (org_id, event_id) WHERE status = 2;
CREATE INDEX deliveries_recover ON deliveries (endpoint_id, failed_at) WHERE status = 2;
CREATE INDEX deliveries_parked ON deliveries (endpoint_id) WHERE status = 0 AND next_attempt_at IS NULL;

ALTER TABLE delivery_attempts ADD COLUMN endpoint_id uuid;
-- The first 1 KiB of the receiver's answer (UTF-8, replacement characters), NULL without one.
ALTER TABLE delivery_attempts ADD COLUMN response_body text;

-- v1 webhooks become default endpoints with their secrets (a deleted webhook whose secret is
-- kept becomes a removed default endpoint, so a new configuration gets the same secret).
INSERT INTO endpoints (id, org_id, is_default, url, status, signing_secret, created_at, updated_at)
SELECT gen_random_uuid(), o.id, true, COALESCE(o.webhook_url, ''),
       CASE WHEN o.webhook_url IS NULL THEN 3 ELSE 0 END, o.signing_secret,
       COALESCE(o.webhook_updated_at, o.created_at), COALESCE(o.webhook_updated_at, o.created_at)
FROM organizations o WHERE o.signing_secret IS NOT NULL;

-- v1 events with delivery state: their default endpoint is their one endpoint, and their state
-- (status, attempts, schedule) moves to a deliveries row, so pending ones keep their schedule.
UPDATE events e SET endpoints = ARRAY[p.id]
FROM endpoints p
WHERE p.org_id = e.org_id AND p.is_default AND (e.next_attempt_at IS NOT NULL OR e.attempts > 0);
INSERT INTO deliveries (event_id, endpoint_id, org_id, status, attempts, retry_base,
                        next_attempt_at, delivered_at, failed_at)
SELECT e.id, e.endpoints[1], e.org_id, e.status,
       e.attempts, e.retry_base, e.next_attempt_at, e.delivered_at,
       CASE WHEN e.status = 2 THEN now() END
FROM events e WHERE e.endpoints IS NOT NULL;
UPDATE delivery_attempts a SET endpoint_id = e.endpoints[1]
FROM events e WHERE e.id = a.event_id AND e.endpoints IS NOT NULL;
DELETE FROM delivery_attempts WHERE endpoint_id IS NULL;
ALTER TABLE delivery_attempts ALTER COLUMN endpoint_id SET NOT NULL;
-- The log is appended with COPY and read by event: a plain index on the event is all it needs
-- (a unique key on (event, endpoint, attempt) costs every append a wider index entry and a
-- uniqueness check, for a race that the leases already rule out).
ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_pkey;
CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id);

-- An event's status column now holds only what is not derived:
--   0 pending with no endpoint (the inbox's), 1 acknowledged, 3 derived from its deliveries.
UPDATE events SET status = 1 WHERE acknowledged_at IS NOT NULL;
UPDATE events SET status = 3 WHERE acknowledged_at IS NULL AND endpoints IS NOT NULL;
UPDATE events SET status = 0 WHERE acknowledged_at IS NULL AND endpoints IS NULL;
DROP INDEX events_due;
ALTER TABLE events DROP COLUMN next_attempt_at;
ALTER TABLE events DROP COLUMN attempts;
ALTER TABLE events DROP COLUMN retry_base;

-- One delivery's state and when it was delivered: its row when it has one, else delivered when
-- an attempt succeeded, else pending. Status 0 pending, 1 delivered, 2 failed. Written as
-- single-SELECT table functions so the planner inlines them into the queries that use them.
CREATE FUNCTION triggers_delivery(ev uuid, ep uuid)
RETURNS TABLE (status smallint, delivered_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(d.status, CASE WHEN ok.at IS NULL THEN 0 ELSE 1 END)::smallint,
           COALESCE(d.delivered_at, ok.at)
    FROM (SELECT 1) one
    LEFT JOIN deliveries d ON d.event_id = ev AND d.endpoint_id = ep
    LEFT JOIN LATERAL (
        SELECT a.at FROM delivery_attempts a
        WHERE a.event_id = ev AND a.endpoint_id = ep AND a.response_status BETWEEN 200 AND 299
        ORDER BY a.attempt DESC LIMIT 1) ok ON d.event_id IS NULL
$$;

-- An event's state as the API shows it. Acknowledged: delivered. Otherwise, over the endpoints it
-- matched that still exist: delivered to every one: delivered; any delivery failed: failed; else
-- (also with no endpoint) pending. `attempts` counts the attempt log, so it always equals the
-- number of attempts listed in the same read.
CREATE FUNCTION triggers_event_state(st smallint, ev uuid, eps uuid[], acked_at timestamptz)
RETURNS TABLE (status smallint, attempts integer, delivered_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN st <> 3 THEN st
                WHEN bool_or(d.status = 2) THEN 2::smallint
                WHEN bool_and(d.status = 1) THEN 1::smallint
                ELSE 0::smallint END,
           CASE WHEN eps IS NULL THEN 0
                ELSE (SELECT count(*)::integer FROM delivery_attempts a WHERE a.event_id = ev) END,
           CASE WHEN st = 1 THEN acked_at
                WHEN st = 3 AND bool_and(d.status = 1) THEN max(d.delivered_at) END
    FROM (SELECT s.status, s.delivered_at
          FROM unnest(eps) AS u(id)
          JOIN endpoints p ON p.id = u.id AND p.status <> 3
          CROSS JOIN LATERAL triggers_delivery(ev, p.id) s
          WHERE st = 3) d
$$;

-- The webhook lives in endpoints now.
ALTER TABLE organizations DROP COLUMN webhook_url;
ALTER TABLE organizations DROP COLUMN signing_secret;
ALTER TABLE organizations DROP COLUMN webhook_updated_at;
