-- A key rotation that can be retried when its answer was lost (the new key is shown only there,
-- and the old key stops working as it is sent). A rotation sent with an `Idempotency-Key` keeps
-- the key it retired (id, prefix, Argon2 hash) and the SHA-256 of that Idempotency-Key, until
-- `rotation_retry_until` (`--key-rotation-retry-s`, 10 minutes): a rotation asked with the
-- retired key and the same Idempotency-Key in that time rotates again from it (the key of the
-- lost answer is retired too). Nothing else takes a retired key. A rotation without the header
-- clears them.
--
-- Only added (no table rewrite): an older node during a rolling upgrade neither reads nor writes
-- them; its rotations leave them as they were, and so a retry may still follow an older rotation.
ALTER TABLE organizations ADD COLUMN previous_key_id text;
ALTER TABLE organizations ADD COLUMN previous_key_prefix text;
ALTER TABLE organizations ADD COLUMN previous_key_hash text;
ALTER TABLE organizations ADD COLUMN rotation_idempotency bytea;
ALTER TABLE organizations ADD COLUMN rotation_retry_until timestamptz;
CREATE INDEX organizations_previous_key ON organizations (previous_key_id)
    WHERE previous_key_id IS NOT NULL;
