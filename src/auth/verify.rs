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

/// Verification state shared by the store pool's tasks.
pub struct Verifier {
    verify_slots: Semaphore,
    hash_slots: Semaphore,
    /// Failed keys per client address.
    pub failures: FailureThrottle,
    verified: Mutex<(HashMap<KeyHash, OrgInfo>, Changes)>,
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

    fn verified(&self) -> std::sync::MutexGuard<'_, (HashMap<KeyHash, OrgInfo>, Changes)> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key this node verified before, if it still stands.
    pub fn cached(&self, hash: KeyHash) -> Option<OrgInfo> {
        self.verified().0.get(&hash).copied()
    }

    /// The invalidation epoch; take it before looking a key up, hand it to [`Verifier::remember`].
    pub fn epoch(&self) -> u64 {
        self.verified().1.epoch()
    }

    /// Remember a verified key unless its organization changed since `epoch`.
    pub fn remember(&self, hash: KeyHash, org: OrgInfo, epoch: u64) {
        let mut guard = self.verified();
        let (map, changes) = &mut *guard;
        if changes.changed_since(org.id, epoch) {
            return;
        }
        if map.len() >= self.verified_max {
            if let Some(k) = map.keys().next().copied() {
                map.remove(&k);
            }
        }
        map.insert(hash, org);
    }

    /// Forget what is known about `org` (every organization with `None`).
    pub fn org_changed(&self, org: Option<OrgId>) {
        let mut guard = self.verified();
        let (map, changes) = &mut *guard;
        changes.record(org);
        match org {
            Some(org) => map.retain(|_, info| info.id != org),
            None => map.clear(),
        }
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
        v.remember(h, org, e);
        assert_eq!(v.cached(h), Some(org));
        v.org_changed(Some(org.id));
        assert_eq!(v.cached(h), None);
        // A verification that raced with the change is not remembered.
        v.remember(h, org, e);
        assert_eq!(v.cached(h), None);
    }
}
