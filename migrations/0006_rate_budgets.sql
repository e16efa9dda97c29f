-- Cluster-wide rate limits: one token bucket per organization, shared by every node. Nodes spend
-- from their own view and report their spend here (src/store/rate.rs); the balance that comes back
-- is every node's view. UNLOGGED: a bucket is a minute of state, not worth a WAL record per
-- report; after a crash of PostgreSQL (or on a promoted standby) the table is empty and every
-- bucket starts full again, as it does on a node's first sight of an organization.
CREATE UNLOGGED TABLE rate_budgets (
    org_id           uuid PRIMARY KEY,
    limit_per_minute integer NOT NULL,
    tokens           double precision NOT NULL,
    updated_at       timestamptz NOT NULL
);
