-- The `Idempotency-Key` of the create that made an endpoint, and the SHA-256 of that request's
-- body. A create retried with the same key (its answer lost to a timeout, or a 503 sent after the
-- commit) is answered with the endpoint the first made, not a second endpoint to the same
-- receiver; the same key with another body is refused (422). A key is the organization's while
-- its endpoint exists: a deleted endpoint (status 3, removed) lets it go.
--
-- Only added (no table rewrite): an older node during a rolling upgrade neither reads nor
-- writes them, and creates endpoints without a key, as before.
ALTER TABLE endpoints ADD COLUMN idempotency_key text;
ALTER TABLE endpoints ADD COLUMN idempotency_body bytea;
CREATE UNIQUE INDEX endpoints_idempotency ON endpoints (org_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status <> 3;
