-- Organizations, their one active API key and their webhook.
CREATE TABLE organizations (
    id                    uuid PRIMARY KEY,
    name                  text NOT NULL,
    tier                  text NOT NULL CHECK (tier IN ('free', 'pro', 'business', 'enterprise')),
    rate_limit_per_minute integer NOT NULL CHECK (rate_limit_per_minute > 0),
    -- The public 16-character key id is what a request's key is looked up by.
    key_id                text NOT NULL UNIQUE,
    -- Argon2id PHC string of the 39-character secret, with its own random salt.
    key_hash              text NOT NULL,
    key_prefix            text NOT NULL,
    rotated_at            timestamptz,
    webhook_url           text,
    -- whsec_ + base64 of 32 random bytes; created with the first webhook, kept for life.
    signing_secret        text,
    webhook_updated_at    timestamptz,
    created_at            timestamptz NOT NULL
);

-- One row per event, carrying its delivery state. No foreign key to organizations: a key check
-- per row would cost the group-commit COPY a lookup each, and organizations are never deleted.
CREATE TABLE events (
    id              uuid PRIMARY KEY,           -- UUIDv7: the index stays append-only
    org_id          uuid NOT NULL,
    type            text NOT NULL,
    payload         json NOT NULL,              -- the bytes received, as they were
    dedup_id        text,
    status          smallint NOT NULL DEFAULT 0, -- 0 pending, 1 delivered, 2 failed
    attempts        integer NOT NULL DEFAULT 0,  -- delivery attempts, all rounds
    retry_base      integer NOT NULL DEFAULT 0,  -- attempts when the current round began (redeliver)
    -- When a delivery is due. While a node works on the event it holds a lease: this is then the
    -- lease's end, after which any node may claim it. NULL: no delivery scheduled.
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL,
    delivered_at    timestamptz,
    acknowledged_at timestamptz
);

-- Exact dedup across restarts and nodes; events without a dedup_id don't pay for it.
CREATE UNIQUE INDEX events_org_dedup ON events (org_id, dedup_id) WHERE dedup_id IS NOT NULL;
-- The inbox: one organization's events of one status, newest first.
CREATE INDEX events_inbox ON events (org_id, status, id);
-- Due deliveries; only events with a delivery scheduled are in it.
CREATE INDEX events_due ON events (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

CREATE TABLE delivery_attempts (
    event_id        uuid NOT NULL,
    attempt         integer NOT NULL,
    at              timestamptz NOT NULL,
    response_status smallint,
    error           text,
    duration_ms     integer NOT NULL,
    PRIMARY KEY (event_id, attempt)
);
