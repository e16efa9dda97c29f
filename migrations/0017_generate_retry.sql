-- A key generation that can be retried when its answer was lost (the key is shown only there).
-- A generation sent with an `Idempotency-Key` keeps the SHA-256 of that Idempotency-Key and of
-- the request's body until `creation_retry_until` (`--key-rotation-retry-s`, 10 minutes): the
-- same request in that time answers with the organization the first made and a new key (the key
-- of the lost answer is retired), not a second organization; the same Idempotency-Key with
-- another body is refused (422). Once the time has passed, the Idempotency-Key is free again.
--
-- Only added (no table rewrite): an older node during a rolling upgrade neither reads nor writes
-- them, and makes a new organization for every generation, as before.
ALTER TABLE organizations ADD COLUMN creation_idempotency bytea;
ALTER TABLE organizations ADD COLUMN creation_body bytea;
ALTER TABLE organizations ADD COLUMN creation_retry_until timestamptz;
CREATE UNIQUE INDEX organizations_creation_idempotency ON organizations (creation_idempotency)
    WHERE creation_idempotency IS NOT NULL;
