-- Cluster-wide endpoint rate limits: one token bucket per rate-limited endpoint, shared by every
-- node, as `rate_budgets` is for organizations. Each node's delivery pool spends from its own view
-- of the bucket (a turn taken or reserved is spent) and reports what it spent every 100 ms
-- (src/delivery/budget.rs); the balance that comes back is its view. `rate` is per second; a
-- bucket holds at most one second's worth and goes no lower than minus a minute's worth.
-- UNLOGGED: after a crash of PostgreSQL (or on a promoted standby) every bucket starts full, as it
-- does on a node's first sight of an endpoint.
--
-- Only added: older nodes never read or write it, and keep their limits per node, so during a
-- rolling upgrade an endpoint may get its limit once per older node on top of the newer nodes'
-- shared one. Nothing an older node reads or writes changes.
-- Its key includes the organization, as every key of an organization's data does (0007).
CREATE UNLOGGED TABLE endpoint_budgets (
    endpoint_id uuid NOT NULL,
    org_id      uuid NOT NULL,
    rate        integer NOT NULL,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (endpoint_id, org_id)
);
