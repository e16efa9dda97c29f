//! Key verification in the store pool: Argon2id on blocking threads, never on an ingress core, at
//! most `argon2_concurrency` at once; a throttle on failures per client address, so a flood of bad
//! keys costs a map lookup each, not 20 ms of CPU; and the node's cache of verified keys, shared by
//! its cores, so a key pays for Argon2 once per node (not once per core) and a key verified before
//! a flood of bad ones keeps working whichever core its next request lands on.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use tokio::sync::Semaphore;

use super::cache::{Changes, KeyHash};
use super::key::{ApiKey, OrgInfo};
use super::throttle::FailureThrottle;
use crate::config::ARGON2_SLOT_WAIT;
use crate::ids::OrgId;

/// Why a key was not accepted (the database's own trouble is the caller's to report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown key id, wrong secret, or a malformed key.
    Refused,
    /// This client address failed too often; it may try again after this many seconds.
    Throttled {
        /// Seconds until the next try is checked.
        retry_after_s: u32,
    },
}

/// Hash a secret with Argon2id (default parameters: 19 MiB, 2 passes) and a fresh random salt.
/// Blocking: call it on a blocking thread.
pub fn hash_secret(secret: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("argon2: {e}"))
}

/// Check a secret against a stored Argon2 PHC string. Blocking.
pub fn secret_matches(secret: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(secret.as_bytes(), phc)
        .is_ok()
}

/// A key this node verified: its organization, the Argon2 hash it matched, and the change epoch
/// when it was stored (a later change to its organization makes it stale).
struct Known {
    org: OrgInfo,
    phc: String,
    epoch: u64,
}

/// What the node knows of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remembered {
    /// Verified, and its organization has not changed since: use it.
    Fresh(OrgInfo),
    /// Verified against this Argon2 hash, but its organization may have changed since (or every
    /// cache was flushed): if the organization's row still holds the same hash, the key is still
    /// its key, and no Argon2 run is needed to say so.
    Stale {
        /// The hash the key matched.
        phc: String,
    },
    /// Not verified on this node.
    Unknown,
}

/// Verification state shared by the store pool's tasks.
pub struct Verifier {
    verify_slots: Semaphore,
    hash_slots: Semaphore,
    /// Failed keys per client address.
    pub failures: FailureThrottle,
    verified: Mutex<(HashMap<KeyHash, Known>, Changes)>,
    verified_max: usize,
    hash_a: ahash::RandomState,
    hash_b: ahash::RandomState,
}

impl Verifier {
    /// Argon2 verifications (`verify_concurrency` at once) apart from hashes of new keys
    /// (`hash_concurrency`), so key creation can't starve verification; `failures` throttles
    /// failed keys by address; `verified_max` keys remembered.
    pub fn new(
        verify_concurrency: usize,
        hash_concurrency: usize,
        failures: FailureThrottle,
        verified_max: usize,
    ) -> Self {
        Verifier {
            verify_slots: Semaphore::new(verify_concurrency),
            hash_slots: Semaphore::new(hash_concurrency),
            failures,
            verified: Mutex::new((HashMap::new(), Changes::default())),
            verified_max,
            hash_a: ahash::RandomState::new(),
            hash_b: ahash::RandomState::new(),
        }
    }

    /// This node's hash of a key.
    pub fn hash_key(&self, key: &ApiKey) -> KeyHash {
        let h = |s: &ahash::RandomState| {
            let mut h = s.build_hasher();
            h.write(key.as_str().as_bytes());
            h.finish()
        };
        (u128::from(h(&self.hash_a)) << 64) | u128::from(h(&self.hash_b))
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, (HashMap<KeyHash, Known>, Changes)> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What this node knows of a key.
    pub fn cached(&self, hash: KeyHash) -> Remembered {
        let guard = self.verified();
        let (map, changes) = &*guard;
        match map.get(&hash) {
            Some(k) if !changes.changed_since(k.org.id, k.epoch) => Remembered::Fresh(k.org),
            Some(k) => Remembered::Stale { phc: k.phc.clone() },
            None => Remembered::Unknown,
        }
    }

    /// The invalidation epoch; take it before looking a key up, hand it to [`Verifier::remember`].
    pub fn epoch(&self) -> u64 {
        self.verified().1.epoch()
    }

    /// Remember a key verified against `phc`, unless its organization changed since `epoch`
    /// (then the answer may describe a key just rotated away).
    pub fn remember(&self, hash: KeyHash, org: OrgInfo, phc: &str, epoch: u64) {
        let mut guard = self.verified();
        let (map, changes) = &mut *guard;
        if changes.changed_since(org.id, epoch) {
            return;
        }
        if map.len() >= self.verified_max && !map.contains_key(&hash) {
            if let Some(k) = map.keys().next().copied() {
                map.remove(&k);
            }
        }
        let epoch = changes.epoch();
        map.insert(
            hash,
            Known {
                org,
                phc: phc.to_string(),
                epoch,
            },
        );
    }

    /// `org` changed (every organization with `None`): what is known of its keys becomes stale,
    /// to be checked against the database before it is used again.
    pub fn org_changed(&self, org: Option<OrgId>) {
        self.verified().1.record(org);
    }

    /// `Some(seconds)` when `peer` has used up its failures and must wait before trying again.
    pub fn throttled(&self, peer: IpAddr) -> Option<u32> {
        self.failures.throttled(peer)
    }

    /// Count one failed key from `peer`.
    pub fn record_failure(&self, peer: IpAddr) {
        self.failures.record_failure(peer);
    }

    /// Check `secret` against `phc` on a blocking thread, waiting at most `ARGON2_SLOT_WAIT` for
    /// a verification slot.
    pub async fn check(&self, secret: String, phc: String) -> Result<bool, SlotsBusy> {
        let _slot = slot(&self.verify_slots).await?;
        Ok(
            tokio::task::spawn_blocking(move || secret_matches(&secret, &phc))
                .await
                .unwrap_or(false),
        )
    }

    /// Hash a new secret on a blocking thread, in the key-creation slots.
    pub async fn hash(&self, secret: String) -> Result<Result<String, String>, SlotsBusy> {
        let _slot = slot(&self.hash_slots).await?;
        Ok(tokio::task::spawn_blocking(move || hash_secret(&secret))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r))
    }
}

/// Every Argon2 slot stayed busy for `ARGON2_SLOT_WAIT`: the caller answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotsBusy;

async fn slot(slots: &Semaphore) -> Result<tokio::sync::SemaphorePermit<'_>, SlotsBusy> {
    match tokio::time::timeout(ARGON2_SLOT_WAIT, slots.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(SlotsBusy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_check_round_trip_with_random_salts() {
        let a = hash_secret("s3cret").unwrap();
        let b = hash_secret("s3cret").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "each hash has its own salt");
        assert!(secret_matches("s3cret", &a));
        assert!(!secret_matches("s3cre7", &a));
        assert!(!secret_matches("s3cret", "not a phc string"));
    }

    #[test]
    fn verified_keys_are_shared_until_their_org_changes() {
        let v = Verifier::new(1, 1, FailureThrottle::new(3, 10), 10);
        let key = ApiKey::generate().unwrap();
        let org = OrgInfo::test(OrgId(uuid::Uuid::from_u128(1)));
        let h = v.hash_key(&key);
        let e = v.epoch();
        v.remember(h, org, "$argon2id$x", e);
        assert_eq!(v.cached(h), Remembered::Fresh(org));
        v.org_changed(Some(org.id));
        let stale = Remembered::Stale {
            phc: "$argon2id$x".into(),
        };
        assert_eq!(v.cached(h), stale, "kept, to be checked without Argon2");
        // A verification that raced with the change is not remembered.
        v.remember(h, org, "$argon2id$y", e);
        assert_eq!(v.cached(h), stale);
        // One that began after it is.
        v.remember(h, org, "$argon2id$y", v.epoch());
        assert_eq!(v.cached(h), Remembered::Fresh(org));
        v.org_changed(None);
        assert!(matches!(v.cached(h), Remembered::Stale { .. }));
    }
}
